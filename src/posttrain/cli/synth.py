"""`posttrain synth`: make instruction data with a teacher (AutoIF today): parse, validate, call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from posttrain.cli.common import TemplateOpt, UnsafeOpt, err, fail, out, user_errors

synth_app = typer.Typer(help="Synthesize instruction data with a teacher model (in this process or on an OpenAI-compatible endpoint).", no_args_is_help=True)


@synth_app.command("autoif")
def autoif(
    teacher: Annotated[str, typer.Option("--teacher", help="The teacher: a zoo or fetched name, a model directory or a hub id. With --base-url: the endpoint's name for it.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory: stages/, requests/ (the cache), sft.jsonl, dpo.jsonl, verifiers.jsonl, prompts.jsonl, report.html.")] = Path("runs/autoif"),
    n_instructions: Annotated[int, typer.Option("--n-instructions", help="Instructions that get verifier functions: --seed-share of them drawn from the seeds, the rest written by the teacher.", min=1)] = 50,
    seed_share: Annotated[float, typer.Option("--seed-share", help="Share of --n-instructions drawn from the seeds (1: no new instructions).", min=0.01, max=1)] = 0.5,
    seeds: Annotated[Optional[Path], typer.Option("--seeds", help="Seed instructions, one a line \\[default: posttrain's 40 format-only instructions].", exists=True, dir_okay=False)] = None,
    queries: Annotated[Optional[Path], typer.Option("--queries", help="User queries to pair instructions with: one a line (.txt) or JSON lines with 'query' \\[default: posttrain's everyday queries, training split].", exists=True, dir_okay=False)] = None,
    student: Annotated[Optional[str], typer.Option("--student", help="The model whose responses are verified (the one you will train) \\[default: the teacher].")] = None,
    functions: Annotated[int, typer.Option("--functions", help="Function-writing replies per instruction (AutoIF samples 8; each reply gives a function and 3 cases, and cross-validation needs 10 distinct cases).", min=1)] = 8,
    min_functions: Annotated[int, typer.Option("--min-functions", help="Cross-validation needs at least this many distinct compiling functions (AutoIF: 3).", min=1)] = 3,
    min_cases: Annotated[int, typer.Option("--min-cases", help="... and this many distinct test cases (AutoIF: 10).", min=1)] = 10,
    min_accuracy: Annotated[float, typer.Option("--min-accuracy", help="A function is kept at this accuracy on the kept cases (AutoIF's code: 0.8).", min=0, max=1)] = 0.8,
    back_translation: Annotated[bool, typer.Option("--back-translation/--no-back-translation", help="Restate each instruction from its functions and drop it when a restatement contradicts it.")] = True,
    queries_per_instruction: Annotated[int, typer.Option("--queries-per-instruction", help="Queries paired with each instruction (AutoIF: 16).", min=1)] = 4,
    responses: Annotated[int, typer.Option("--responses", help="Responses sampled per prompt.", min=1)] = 4,
    min_pass_rate: Annotated[float, typer.Option("--min-pass-rate", help="SFT keeps responses whose share of passing functions is above this (AutoIF's paper: 0.5).", min=0, max=0.99)] = 0.5,
    quality: Annotated[bool, typer.Option("--quality/--no-quality", help="Have the teacher score kept responses 0-10 and keep those at --quality-min.")] = False,
    quality_min: Annotated[float, typer.Option("--quality-min", min=0, max=10)] = 8.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Teacher budget per reply.", min=1)] = 384,
    response_max_new_tokens: Annotated[int, typer.Option("--response-max-new-tokens", help="Student budget per response.", min=1)] = 256,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    timeout: Annotated[float, typer.Option("--timeout", help="Sandbox seconds per function call.", min=0.01)] = 5.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences decoded together (in-process models).", min=1)] = 32,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 for generation \\[default: where the hardware has native bf16].")] = None,
    template: TemplateOpt = None,
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="Generate on this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1).")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="With --base-url: the environment variable holding the API key.")] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option("--concurrency", help="With --base-url: requests in flight.", min=1)] = 8,
    unsafe_exec: UnsafeOpt = False,
) -> None:
    """AutoIF: instructions, verifier functions the teacher writes (cross-validated in the sandbox), verified responses.

    Writes SFT records, DPO pairs, a verifier library and verifiable prompts, and a report of what each
    stage kept and dropped. Rerunning the same command resumes: finished stages and requests are reused.
    """
    from posttrain.generate.client import EndpointError
    from posttrain.synth.autoif_run import AutoIFConfig, run
    from posttrain.verify.sandbox import SandboxUnavailable

    cfg = AutoIFConfig(
        teacher=teacher, student=student, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
        seeds=str(seeds) if seeds else None, queries=str(queries) if queries else None, n_instructions=n_instructions,
        seed_share=seed_share,
        functions_per_instruction=functions, min_functions=min_functions, min_cases=min_cases, min_accuracy=min_accuracy,
        back_translation=back_translation, queries_per_instruction=queries_per_instruction, responses_per_query=responses,
        min_pass_rate=min_pass_rate, quality=quality, quality_min=quality_min, max_new_tokens=max_new_tokens,
        response_max_new_tokens=response_max_new_tokens, seed=seed, timeout_s=timeout, batch_size=batch_size, bf16=bf16,
        template=template, unsafe_exec=unsafe_exec, output_dir=str(output),
    )  # fmt: skip
    with user_errors():
        try:
            result = run(cfg, console=err)
        except (SandboxUnavailable, EndpointError) as e:
            fail(str(e))
    outputs = result["outputs"]
    out.print(
        f"wrote {outputs['sft']} SFT records, {outputs['dpo']} DPO pairs, {outputs['verifiers']} verifiers and {outputs['prompts']} "
        f"verifiable prompts to {escape(result['dir'])} (report: {escape(str(Path(result['dir']) / 'report.html'))})"
    )


@synth_app.command("self-instruct")
def self_instruct(
    teacher: Annotated[str, typer.Option("--teacher", help="The teacher: a zoo or fetched name, a model directory or a hub id. With --base-url: the endpoint's name for it.")],
    seed_tasks: Annotated[Path, typer.Option("--seed-tasks", help="Seed tasks in Self-Instruct's format: {instruction, instances: [{input, output}], is_classification} a line.", exists=True, dir_okay=False)],
    n: Annotated[int, typer.Option("--n", help="New instructions to keep.", min=1)] = 100,
    style: Annotated[str, typer.Option("--style", help="self-instruct (instructions, then classification and instances) or alpaca (20 instructions with input and output a request).")] = "self-instruct",
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory: data.jsonl (Alpaca format, for posttrain sft), instructions.jsonl, rejects.jsonl, report.html, requests/ (the cache).")] = Path("runs/self-instruct"),
    requests_per_round: Annotated[int, typer.Option("--requests-per-round", help="Instruction requests generated together.", min=1)] = 8,
    max_requests: Annotated[Optional[int], typer.Option("--max-requests", help="Stop after this many instruction requests \\[default: 10 × what n needs, at least 16; a bound on a teacher whose lists are mostly dropped].", min=1)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="\\[default: 0.7 self-instruct, 1.0 alpaca].", min=0)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="\\[default: 0.5 self-instruct, 1.0 alpaca].", min=0.01, max=1)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Per instruction request \\[default: 256 self-instruct, 1536 alpaca].", min=1)] = None,
    rouge_threshold: Annotated[float, typer.Option("--rouge-threshold", help="Drop an instruction whose ROUGE-L F with any in the pool is above this.", min=0.01, max=1)] = 0.7,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences decoded together (in-process models).", min=1)] = 64,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 for generation \\[default: where the hardware has native bf16].")] = None,
    template: TemplateOpt = None,
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="Generate on this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1).")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="With --base-url: the environment variable holding the API key.")] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option("--concurrency", help="With --base-url: requests in flight.", min=1)] = 8,
) -> None:
    """Self-Instruct (or Alpaca's variant): bootstrap new instructions from seed tasks, filter them, write instances.

    Every filter's drops are counted (report.html, funnel.json); replies that never parse go to rejects.jsonl.
    Rerunning the same command resumes: every finished request is cached.
    """
    from pydantic import ValidationError

    from posttrain.generate.client import EndpointError
    from posttrain.synth.self_instruct_run import SelfInstructConfig, run

    try:
        cfg = SelfInstructConfig(
            teacher=teacher, seed_tasks=str(seed_tasks), n=n, style=style, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
            requests_per_round=requests_per_round, max_requests=max_requests, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, rouge_threshold=rouge_threshold, seed=seed, batch_size=batch_size, bf16=bf16, template=template,
            output_dir=str(output),
        )  # fmt: skip
    except ValidationError as e:
        fail("; ".join(f"--{'-'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()))
    with user_errors():
        try:
            result = run(cfg, console=err)
        except EndpointError as e:
            fail(str(e))
    outputs = result["outputs"]
    out.print(
        f"kept {outputs['instructions']} new instructions, wrote {outputs['records']} records to {escape(str(Path(result['dir']) / 'data.jsonl'))} "
        f"({outputs['rejects']} rejected replies in rejects.jsonl; report: {escape(str(Path(result['dir']) / 'report.html'))})"
    )


@synth_app.command("evol")
def evol_instruct(
    teacher: Annotated[str, typer.Option("--teacher", help="The teacher: a zoo or fetched name, a model directory or a hub id. With --base-url: the endpoint's name for it.")],
    data: Annotated[Path, typer.Option("--data", help="Instructions to evolve: any format posttrain reads (the last user turn), or {\"prompt\"} lines.", exists=True, dir_okay=False)],
    rounds: Annotated[int, typer.Option("--rounds", help="Evolution rounds (WizardLM: 4).", min=1)] = 2,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N instructions.", min=1)] = None,
    operations: Annotated[Optional[list[str]], typer.Option("--operation", help="Operations to draw from (repeatable): constraints, deepen, concretize, reasoning, complicate_input, breadth \\[default: all].")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory: data.jsonl (Alpaca format with meta.lineage), eliminated.jsonl, rejects.jsonl, report.html, requests/.")] = Path("runs/evol"),
    temperature: Annotated[float, typer.Option("--temperature", help="For evolving (answers and judgements are greedy).", min=0)] = 0.7,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Budget of an evolved instruction.", min=1)] = 256,
    response_max_new_tokens: Annotated[int, typer.Option("--response-max-new-tokens", help="Budget of a response (a response cut at it is eliminated).", min=1)] = 512,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences decoded together (in-process models).", min=1)] = 64,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 for generation \\[default: where the hardware has native bf16].")] = None,
    template: TemplateOpt = None,
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="Generate on this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1).")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="With --base-url: the environment variable holding the API key.")] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option("--concurrency", help="With --base-url: requests in flight.", min=1)] = 8,
) -> None:
    """Evol-Instruct: evolve instructions in depth and in breadth for several rounds; eliminate failed evolutions by WizardLM's four rules.

    Every elimination is counted per round (report.html) and written to eliminated.jsonl with its rule; each
    output record keeps its lineage. Rerunning the same command resumes: every finished request is cached.
    """
    from pydantic import ValidationError

    from posttrain.generate.client import EndpointError
    from posttrain.synth.evol import OPERATIONS
    from posttrain.synth.evol_run import EvolConfig, run

    try:
        cfg = EvolConfig(
            teacher=teacher, data=str(data), rounds=rounds, limit=limit, operations=operations or list(OPERATIONS), base_url=base_url,
            api_key_env=api_key_env, concurrency=concurrency, temperature=temperature, max_new_tokens=max_new_tokens,
            response_max_new_tokens=response_max_new_tokens, seed=seed, batch_size=batch_size, bf16=bf16, template=template, output_dir=str(output),
        )  # fmt: skip
    except ValidationError as e:
        fail("; ".join(f"--{'-'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()))
    with user_errors():
        try:
            result = run(cfg, console=err)
        except EndpointError as e:
            fail(str(e))
    outputs = result["outputs"]
    out.print(
        f"wrote {outputs['records']} evolved records to {escape(str(Path(result['dir']) / 'data.jsonl'))}; {outputs['eliminated']} evolutions "
        f"eliminated (eliminated.jsonl), {outputs['rejects']} replies rejected (report: {escape(str(Path(result['dir']) / 'report.html'))})"
    )
