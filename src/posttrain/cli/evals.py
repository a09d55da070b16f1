"""`posttrain eval mt-bench | winrate | followbench | arena`: judged and multi-level evaluations, one results format.

Each command answers with the models (in this process, or on an OpenAI-compatible endpoint), judges
where it needs a judge (any model: in this process, or ``--judge-base-url``), and writes
``results.json``, ``items.jsonl`` and ``report.html`` under ``--output``. Every request is cached under
``OUTPUT/cache``, so a rerun into the same directory (after a crash, or with a larger ``--limit``) asks
only for what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from posttrain.cli.common import TemplateOpt, UnsafeOpt, VerifiersOpt, err, fail, out, use_verifiers, user_errors

JudgeOpt = Annotated[str, typer.Option("--judge", "-j", help="The judge: a zoo or fetched name, a model directory or a hub id; with --judge-base-url, the endpoint's name for it.")]
JudgePromptsOpt = Annotated[
    Path | None,
    typer.Option("--judge-prompts", help="Judge prompts in FastChat's judge_prompts.jsonl format (e.g. MT-Bench's own) \\[default: posttrain's, same format].", exists=True, dir_okay=False),
]
JudgeUrlOpt = Annotated[str | None, typer.Option("--judge-base-url", help="Ask the judge on this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1).")]
JudgeModeOpt = Annotated[
    str,
    typer.Option("--judge-mode", help="text: the judge writes its judgement, the verdict is parsed from it (FastChat's way). probs: the verdict is read from the judge's token probabilities after 'Rating: [[' or 'Verdict: [[' (in-process judges; what a small judge can give)."),
]
JudgeTokensOpt = Annotated[int, typer.Option("--judge-max-new-tokens", help="The judge's budget per judgement (a cut-off judgement without a verdict is counted unparsable).", min=1)]
BaseUrlOpt = Annotated[str | None, typer.Option("--base-url", help="Generate the answers on this OpenAI-compatible endpoint; the model names are its names.")]
ApiKeyOpt = Annotated[str, typer.Option("--api-key-env", help="With --base-url or --judge-base-url: the environment variable holding the API key.")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="With an endpoint: requests in flight.", min=1)]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Only the first N items (questions, prompts or query groups): a quick run.", min=1)]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Run directory: results.json, items.jsonl, report.html, and the request cache (a rerun resumes).")]
TokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Answer budget per turn.", min=1)]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Requests generated together (in-process models).", min=1)]
Bf16Opt = Annotated[bool | None, typer.Option("--bf16/--fp32", help="bf16 for generation \\[default: bf16 where the hardware has native bf16, else fp32].")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Sampling seed (answers at temperature > 0).")]


@dataclass
class Backends:
    """Opens cached backends for models and the judge, loading each in-process model once."""

    cache: Path
    base_url: str | None
    judge_base_url: str | None
    api_key_env: str
    concurrency: int
    batch_size: int
    bf16: bool
    template: str | None

    def __post_init__(self) -> None:
        self.engines: dict[str, Any] = {}

    def model(self, name: str) -> Any:
        from posttrain.eval.judge import open_backend

        return open_backend(name, self.cache, base_url=self.base_url, api_key_env=self.api_key_env, concurrency=self.concurrency,
                            batch_size=self.batch_size, bf16=self.bf16, template=self.template, engines=self.engines, console=err)  # fmt: skip

    def judge(self, name: str, prompts_file: Path | None, max_new_tokens: int, mode: str = "text") -> Any:
        from posttrain.eval.judge import DEFAULT_PROMPTS, Judge, open_backend, read_judge_prompts

        teacher = open_backend(name, self.cache, base_url=self.judge_base_url, api_key_env=self.api_key_env, concurrency=self.concurrency,
                               batch_size=self.batch_size, bf16=self.bf16, engines=self.engines, console=err)  # fmt: skip
        return Judge(teacher, read_judge_prompts(prompts_file) if prompts_file else DEFAULT_PROMPTS, max_new_tokens=max_new_tokens, mode=mode)


def _backends(output: Path, base_url: str | None, judge_base_url: str | None, api_key_env: str, concurrency: int, batch_size: int, bf16: bool | None, template: str | None) -> Backends:
    from posttrain.config import resolve_bf16

    return Backends(output / "cache", base_url, judge_base_url, api_key_env, concurrency, batch_size, resolve_bf16(bf16), template)


def show(results: Any, output: Path) -> None:
    """The headline table, the plotted metric per group, the notes, and where the report is."""
    headline = Table(title=f"{results.benchmark} (95% intervals)")
    columns = list(dict.fromkeys(k for ms in results.models.values() for k in ms))
    for column in ["model", *columns]:
        headline.add_column(column, justify="left" if column == "model" else "right")
    for model, metrics in results.models.items():
        headline.add_row(escape(model), *(str(metrics[c]) if c in metrics else "" for c in columns))
    metric = results.plot_metric
    if metric and results.groups:
        groups = list(dict.fromkeys(g for gs in results.groups.values() for g in gs))
        table = Table(title=f"{metric} by group")
        for column in ["group", *results.groups]:
            table.add_column(escape(column), justify="left" if column == "group" else "right")
        for g in groups:
            table.add_row(escape(g), *(str(results.groups[m][g][metric]) if g in results.groups[m] and metric in results.groups[m][g] else "" for m in results.groups))
        out.print(table)
    out.print(headline)
    for note in results.notes:
        err.print(f"[dim]{escape(note)}[/]", highlight=False)
    err.print(f"report: {escape(str(output / 'report.html'))}")


def _models(values: list[str] | None) -> list[str]:
    """``--model A --model B`` or ``--models A,B``: the names, in order, once each."""
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def eval_mt_bench(
    model: Annotated[list[str], typer.Option("--model", "-m", help="A model to evaluate (repeatable, or comma-separated).")],
    judge: JudgeOpt,
    questions: Annotated[Path, typer.Option("--questions", help="MT-Bench questions in FastChat's question.jsonl format (question_id, category, turns, optional reference).", exists=True, dir_okay=False)],
    judge_prompts: JudgePromptsOpt = None,
    judge_mode: JudgeModeOpt = "text",
    output: OutputOpt = Path("mt-bench"),
    limit: LimitOpt = None,
    max_new_tokens: TokensOpt = 1024,
    judge_max_new_tokens: JudgeTokensOpt = 512,
    batch_size: BatchOpt = 16,
    bf16: Bf16Opt = None,
    seed: SeedOpt = 0,
    template: TemplateOpt = None,
    base_url: BaseUrlOpt = None,
    judge_base_url: JudgeUrlOpt = None,
    api_key_env: ApiKeyOpt = "OPENAI_API_KEY",
    concurrency: ConcurrencyOpt = 8,
) -> None:
    """MT-Bench single-answer grading: both turns answered (at FastChat's per-category temperatures) and rated 1-10 by the judge; per category."""
    from posttrain.eval import mt_bench

    with user_errors():
        qs = mt_bench.read_questions(questions, limit=limit)
        backends = _backends(output, base_url, judge_base_url, api_key_env, concurrency, batch_size, bf16, template)
        the_judge = backends.judge(judge, judge_prompts, judge_max_new_tokens, judge_mode)
        items = {}
        for name in _models(model):
            answers = mt_bench.answer(backends.model(name), qs, max_new_tokens=max_new_tokens, seed=seed)
            items[name] = mt_bench.grade(the_judge, qs, answers, model=name)
        settings = {"questions": str(questions), "n_questions": len(qs), "max_new_tokens": max_new_tokens, "judge_prompts": str(judge_prompts or "posttrain's"), "judge_mode": judge_mode}
        results = mt_bench.results(items, judge=judge, settings=settings)
        results.write(output)
    show(results, output)


@dataclass(frozen=True)
class Asked:
    chat: list[dict[str, Any]]  # what the models are asked
    question: str  # what the judge is shown
    reference: str | None = None  # the reference answer, where the file has one


def read_asked(path: Path, limit: int | None, *, need_reference: bool = False) -> list[Asked]:
    """Prompts from MT-Bench questions (the first turn) or any prompt format ``posttrain`` reads; with ``need_reference``,
    each record's answer (its last assistant message, or completion) is the reference answer."""
    import json

    from posttrain.data.prompts import read_prompts
    from posttrain.eval.judge import question_text

    first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "")
    try:
        mt_bench_format = first.startswith("{") and "turns" in json.loads(first)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the first line is not JSON ({e.msg})") from None
    if mt_bench_format:
        if need_reference:
            raise ValueError(f"{path}: MT-Bench questions carry no reference answers to compare against; give a model or a file of answers as --reference")
        from posttrain.eval.mt_bench import read_questions

        return [Asked([{"role": "user", "content": q.turns[0]}], q.turns[0]) for q in read_questions(path, limit=limit)]
    asked = []
    for row, p in enumerate(read_prompts(path)[:limit]):
        chat = [{"role": "user", "content": p.prompt}] if isinstance(p.prompt, str) else list(p.prompt)
        reference = _answer_of(p.record) if need_reference else None
        if need_reference and not reference:
            raise ValueError(f"{path}: record {row} has no answer (a last assistant message or a completion) to serve as the reference")
        asked.append(Asked(chat, question_text(chat), reference))
    if not asked:
        raise ValueError(f"{path}: no prompts")
    return asked


def _answer_of(record: dict[str, Any]) -> str | None:
    if "messages" in record:
        return next((m.get("content") for m in reversed(record["messages"]) if m.get("role") == "assistant"), None)
    completion = record.get("completion")
    if isinstance(completion, list):
        return next((m.get("content") for m in reversed(completion) if m.get("role") == "assistant"), None)
    return completion if isinstance(completion, str) else None


def eval_winrate(
    model: Annotated[list[str], typer.Option("--model", "-m", help="A model to evaluate (repeatable, or comma-separated).")],
    reference: Annotated[str, typer.Option("--reference", help="What the models are compared with: a file of answers (any format with prompts and answers, e.g. GPT-4's) or a model that answers the same prompts.")],
    judge: JudgeOpt,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="The prompts, with a reference model: any prompt format, or MT-Bench questions (first turn). With a reference file, its own prompts are used.", exists=True, dir_okay=False)] = None,
    judge_prompts: JudgePromptsOpt = None,
    judge_mode: JudgeModeOpt = "text",
    output: OutputOpt = Path("winrate"),
    limit: LimitOpt = None,
    max_new_tokens: TokensOpt = 512,
    judge_max_new_tokens: JudgeTokensOpt = 512,
    batch_size: BatchOpt = 16,
    bf16: Bf16Opt = None,
    template: TemplateOpt = None,
    base_url: BaseUrlOpt = None,
    judge_base_url: JudgeUrlOpt = None,
    api_key_env: ApiKeyOpt = "OPENAI_API_KEY",
    concurrency: ConcurrencyOpt = 8,
) -> None:
    """Win rate against a reference (each pair judged in both orders) and AlpacaEval 2's length-controlled win rate, with intervals."""
    from posttrain.eval.pairwise import answers
    from posttrain.eval.winrate import winrate_results

    reference_file = Path(reference).is_file()
    if reference_file and prompts is not None:
        fail("with a reference file the prompts are the file's own: leave --prompts out")
    if not reference_file and prompts is None:
        fail(f"--reference {reference} is not a file, so it is a model: give --prompts FILE for it and the models to answer")
    with user_errors():
        asked = read_asked(Path(reference) if reference_file else prompts, limit, need_reference=reference_file)  # type: ignore[arg-type]
        backends = _backends(output, base_url, judge_base_url, api_key_env, concurrency, batch_size, bf16, template)
        chats = [a.chat for a in asked]
        if reference_file:
            reference_answers = [a.reference or "" for a in asked]
        else:
            reference_answers = answers(backends.model(reference), chats, max_new_tokens=max_new_tokens, what=f"answers of {reference}")
        the_judge = backends.judge(judge, judge_prompts, judge_max_new_tokens, judge_mode)
        model_answers = {m: answers(backends.model(m), chats, max_new_tokens=max_new_tokens, what=f"answers of {m}") for m in _models(model)}
        settings = {"prompts": str(prompts or reference), "n_prompts": len(asked), "max_new_tokens": max_new_tokens, "judge_mode": judge_mode}
        label = Path(reference).name if reference_file else reference
        results = winrate_results(the_judge, [a.question for a in asked], model_answers, reference_answers, reference=label, settings=settings)
        results.write(output)
    show(results, output)


def eval_followbench(
    model: Annotated[list[str], typer.Option("--model", "-m", help="A model to evaluate (repeatable, or comma-separated).")],
    queries: Annotated[int, typer.Option("--queries", help="Query groups built (each asked at every level).", min=1)] = 40,
    levels: Annotated[int, typer.Option("--levels", help="Levels: level k carries k constraints.", min=1, max=8)] = 5,
    split: Annotated[str, typer.Option("--split", help="Which of the built-in query and phrasing splits: heldout (never trained on by the demo) or train.")] = "heldout",
    output: OutputOpt = Path("followbench"),
    limit: LimitOpt = None,
    max_new_tokens: TokensOpt = 512,
    batch_size: BatchOpt = 16,
    bf16: Bf16Opt = None,
    seed: Annotated[int, typer.Option("--seed", help="Which constraints and queries are drawn.")] = 0,
    template: TemplateOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyOpt = "OPENAI_API_KEY",
    concurrency: ConcurrencyOpt = 8,
    verifiers: VerifiersOpt = None,
    unsafe_exec: UnsafeOpt = False,
) -> None:
    """FollowBench-style levels: each query asked with 1..L rule-checked constraints; HSR, SSR per level and CSL, no judge."""
    from posttrain.eval.followbench import build_levels, run_followbench
    from posttrain.eval.results import merge

    if split not in ("heldout", "train"):
        fail(f"--split is heldout or train, not {split!r}")
    use_verifiers(verifiers, unsafe_exec)
    with user_errors():
        groups = build_levels(queries, levels, split=split, seed=seed)  # type: ignore[arg-type]
        backends = _backends(output, base_url, None, api_key_env, concurrency, batch_size, bf16, template)
        parts = [run_followbench(backends.model(m), m, groups, max_new_tokens=max_new_tokens, limit=limit) for m in _models(model)]
        results = merge(parts)
        results.settings |= {"seed": seed}
        results.write(output)
    show(results, output)


def eval_arena(
    models: Annotated[list[str], typer.Option("--models", "-m", help="The contestants: comma-separated (--models A,B,C) or repeated (-m A -m B).")],
    judge: JudgeOpt,
    prompts: Annotated[Path, typer.Option("--prompts", help="The prompts: any prompt format, or MT-Bench questions (first turn).", exists=True, dir_okay=False)],
    judge_prompts: JudgePromptsOpt = None,
    judge_mode: JudgeModeOpt = "text",
    output: OutputOpt = Path("arena"),
    limit: LimitOpt = None,
    max_new_tokens: TokensOpt = 512,
    judge_max_new_tokens: JudgeTokensOpt = 512,
    batch_size: BatchOpt = 16,
    bf16: Bf16Opt = None,
    template: TemplateOpt = None,
    base_url: BaseUrlOpt = None,
    judge_base_url: JudgeUrlOpt = None,
    api_key_env: ApiKeyOpt = "OPENAI_API_KEY",
    concurrency: ConcurrencyOpt = 8,
) -> None:
    """Arena: every pair of models battles on every prompt (judged in both orders); Bradley-Terry ratings with bootstrap intervals."""
    from posttrain.eval.arena import arena_results
    from posttrain.eval.pairwise import answers

    names = _models(models)
    if len(names) < 2:
        fail(f"an arena needs at least two models, got {names}")
    with user_errors():
        asked = read_asked(prompts, limit)
        backends = _backends(output, base_url, judge_base_url, api_key_env, concurrency, batch_size, bf16, template)
        chats = [a.chat for a in asked]
        model_answers = {m: answers(backends.model(m), chats, max_new_tokens=max_new_tokens, what=f"answers of {m}") for m in names}
        the_judge = backends.judge(judge, judge_prompts, judge_max_new_tokens, judge_mode)
        results = arena_results(the_judge, [a.question for a in asked], model_answers, settings={"prompts": str(prompts), "max_new_tokens": max_new_tokens, "judge_mode": judge_mode})
        results.write(output)
    show(results, output)


def register(eval_app: typer.Typer) -> None:
    eval_app.command("mt-bench")(eval_mt_bench)
    eval_app.command("winrate")(eval_winrate)
    eval_app.command("followbench")(eval_followbench)
    eval_app.command("arena")(eval_arena)
