"""`posttrain sandbox check`: run a model-written ``evaluate(response)`` on responses, isolated; parse, validate, call."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from posttrain.cli.common import UnsafeOpt, err, fail

sandbox_app = typer.Typer(help="Run untrusted verifier code (a model's evaluate(response) functions) in the sandbox.", no_args_is_help=True)

TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Wall-clock seconds per call.", min=0.01)]


@sandbox_app.command("check")
def check(
    function: Annotated[Path, typer.Argument(help="A Python file that defines evaluate(response) -> bool.", exists=True, dir_okay=False)],
    responses: Annotated[Path, typer.Option("--responses", "-r", help='JSON lines, one {"response": "..."} each.', exists=True, dir_okay=False)],
    timeout: TimeoutOpt = 5.0,
    workers: Annotated[int, typer.Option("--workers", help="Sandboxes in parallel (0: one per core).", min=0)] = 0,
    unsafe_exec: UnsafeOpt = False,
) -> None:
    """Print one JSON line per response: {"ok": true|false, "result": true|false|null, "error": null|"..."}.

    Only a real True returned by evaluate counts as "result": true; an exception, a timeout, a crash or a
    non-bool return is "ok": false with the reason. The code sees no network, none of your files and no
    other process (see README: the sandbox).
    """
    from posttrain.data.sources import read_jsonl
    from posttrain.verify.sandbox import Limits, Sandbox, SandboxUnavailable

    texts, problems = [], []
    for item in read_jsonl(responses):
        if item.problem is not None:
            problems.append(str(item.problem))
        elif not isinstance(item.value, dict) or not isinstance(item.value.get("response"), str):
            problems.append(f"{item.location}: field 'response': expected a string")
        else:
            texts.append(item.value["response"])
    if problems:
        fail(f"{len(problems)} bad lines in {responses}:\n" + "\n".join(problems[:20]))
    try:
        with Sandbox(workers=workers, limits=Limits(timeout_s=timeout), unsafe_exec=unsafe_exec) as box:
            results = box.run(function.read_text(encoding="utf-8"), texts)
    except SandboxUnavailable as e:
        fail(str(e))
    for result in results:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
    passed = sum(r.passed for r in results)
    errors = sum(not r.ok for r in results)
    err.print(f"{len(results)} responses: {passed} true, {len(results) - passed - errors} false, {errors} errors ({box.isolation})", highlight=False)
