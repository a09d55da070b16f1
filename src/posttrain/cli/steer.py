"""`posttrain steer`: fit steering directions per instruction type, and measure steering and InstABoost."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from posttrain.cli.common import TemplateOpt, err, fail, out, user_errors

steer_app = typer.Typer(
    help="Activation steering (Stolfo et al.) and instruction attention boosting (InstABoost) at inference time: fit, evaluate; use with `eval ifeval --steer` and `serve --steer`.",
    no_args_is_help=True,
)

#: Format instructions whose check needs no parameter (a direction cannot carry "exactly 3 bullets"): Stolfo et al.'s kind
DEFAULT_TYPES = (
    "change_case:english_lowercase",
    "change_case:english_capital",
    "punctuation:no_comma",
    "startend:quotation",
    "detectable_format:title",
    "detectable_format:json_format",
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="The model: a zoo or fetched name, a model directory or a hub id.")]
PromptsOpt = Annotated[
    Path | None,
    typer.Option("--prompts", help="Verifiable prompts as JSON lines with 'query', 'instruction', 'instruction_id_list' (one type) and 'kwargs' \\[default: posttrain's built-in prompts].", exists=True, dir_okay=False),
]
TypesOpt = Annotated[str | None, typer.Option("--types", help="Comma-separated instruction types \\[default: six parameter-free format types].")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Sequences decoded together.", min=1)]
MaxPerplexityOpt = Annotated[
    float,
    typer.Option("--max-perplexity", help="Fluency bound: perplexity at most this many times the unsteered answers' to the instructed prompts (fit rejects a layer or m beyond it; eval marks it).", min=1),
]
MaxRepetitionOpt = Annotated[float, typer.Option("--max-repetition", help="Fluency bound: a share of repeated word 4-grams at most this much above theirs.", min=0)]
Bf16Opt = Annotated[bool | None, typer.Option("--bf16/--fp32", help="bf16 for generation \\[default: bf16 where the hardware has native bf16].")]


def _types(types: str | None) -> list[str]:
    from posttrain.synth.verifiable import TYPE_BY_ID

    chosen = [t.strip() for t in types.split(",") if t.strip()] if types else list(DEFAULT_TYPES)
    unknown = [t for t in chosen if t not in TYPE_BY_ID]
    if unknown:
        fail(f"unknown instruction types {unknown}; known: {', '.join(TYPE_BY_ID)}")
    return chosen


def _builtin(split: str, n: int, types: list[str], seed: int) -> list[Any]:
    from posttrain.steer.fit import examples_from_records
    from posttrain.synth.verifiable import build_prompts

    examples = []
    for t in types:
        examples += examples_from_records(build_prompts(split, n, seed, 1, [t], parts=True), f"built-in {split} prompts")
    return examples


def _from_file(path: Path, types: list[str] | None) -> list[Any]:
    from posttrain.data.sources import read_jsonl
    from posttrain.steer.fit import examples_from_records

    items = list(read_jsonl(path))
    bad = [item for item in items if item.problem is not None]
    if bad:
        fail(str(bad[0].problem))
    examples = examples_from_records([item.value for item in items], str(path))
    return [ex for ex in examples if types is None or ex.type in types]


def _validation_query(query: str) -> bool:
    """A quarter of a prompt file's queries (by a hash of the text: the same on any machine) choose; the rest fit."""
    return hashlib.blake2b(query.encode(), digest_size=8).digest()[0] % 4 == 0


def _engine(model: str, batch_size: int, template: str | None) -> Any:
    from posttrain.generate import Engine

    err.print(f"loading {escape(model)} ...", highlight=False)
    return Engine.from_name(model, batch_size=batch_size, template=template)


@steer_app.command("fit")
def fit(
    model: ModelOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="The steering file to write (safetensors).")] = Path("steering.safetensors"),
    prompts: PromptsOpt = None,
    types: TypesOpt = None,
    limit: Annotated[int, typer.Option("--limit", help="Fit prompts per type (built-in prompts: training-split queries).", min=2)] = 48,
    validation: Annotated[int, typer.Option("--validation", help="Validation prompts per type, other queries than the fit's: they choose the layer and the boost.", min=1)] = 16,
    layers: Annotated[str | None, typer.Option("--layers", help="Comma-separated candidate layers \\[default: six from a fifth to seven tenths of the depth].")] = None,
    boost_prompts: Annotated[int, typer.Option("--boost-prompts", help="Validation prompts per type on which InstABoost's m is searched (1, 3, ..., 19).", min=1)] = 6,
    max_perplexity: MaxPerplexityOpt = 2.0,
    max_repetition: MaxRepetitionOpt = 0.10,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    batch_size: BatchOpt = 64,
    bf16: Bf16Opt = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    template: TemplateOpt = None,
) -> None:
    """Fit a direction per instruction type and layer; choose each type's layer and InstABoost's m on validation prompts.

    Built-in prompts: queries of the training split (never the held-out queries `steer eval` uses), one
    instruction each; the first --limit per type fit, the next --validation choose. Writes one
    safetensors file with the directions, the choices and what they measured.
    """
    from posttrain.config import resolve_bf16
    from posttrain.generate import SamplingParams
    from posttrain.steer.fit import fit_steering
    from posttrain.steer.fluency import Bounds

    chosen = _types(types)
    with user_errors():
        if prompts is None:
            examples = _builtin("train", limit + validation, chosen, seed)
            per_type: dict[str, list[Any]] = {}
            for ex in examples:
                per_type.setdefault(ex.type, []).append(ex)
            fit_set = [ex for exs in per_type.values() for ex in exs[:limit]]
            val_set = [ex for exs in per_type.values() for ex in exs[limit:]]
        else:
            examples = _from_file(prompts, chosen if types else None)
            fit_set = [ex for ex in examples if not _validation_query(ex.query)]
            val_set = [ex for ex in examples if _validation_query(ex.query)]
        if not fit_set or not val_set:
            fail(f"need fit and validation prompts; have {len(fit_set)} and {len(val_set)}")
        layer_list = [int(x) for x in layers.split(",")] if layers else None
        engine = _engine(model, batch_size, template)
        params = SamplingParams(max_new_tokens=max_new_tokens, bf16=resolve_bf16(bf16))
        err.print(f"fit: {len(fit_set)} prompts, validation: {len(val_set)} prompts, {len({ex.type for ex in fit_set})} types", highlight=False)
        started = time.perf_counter()
        steering = fit_steering(
            engine, model, fit_set, val_set, params, layers=layer_list, boost_per_type=boost_prompts, bounds=Bounds(max_perplexity, max_repetition)
        )
        steering.save(output)
    _show_fit(steering.report)
    err.print(f"{time.perf_counter() - started:.0f} s; wrote {escape(str(output))}", highlight=False)


def _show_fit(report: dict[str, Any]) -> None:
    """Two tables: each type's chosen layer with its figures, and every layer tried."""
    types = report["types"]
    chosen = Table(title="steering fit: each type's layer, chosen on validation prompts (strict pass %; steered: the query alone, steered)")
    for column in ("type", "no instr.", "instr.", "layer", "steered", "ppl", "rep."):
        chosen.add_column(column, justify="left" if column == "type" else "right", no_wrap=column == "type")
    for name, t in types.items():
        best = t["layers"][str(t["layer"])]
        layer = str(t["layer"]) + ("" if t["fluent_layer_found"] else " (none fluent)")
        chosen.add_row(
            escape(name), f"{100 * t['absent']['pass']:.0f}", f"{100 * t['instructed']['pass']:.0f}", layer,
            f"{100 * best['pass']:.0f}", f"{best['perplexity']:.2f}", f"{best['repetition']:.3f}",
        )  # fmt: skip
    out.print(chosen)
    layers = list(next(iter(types.values()))["layers"]) if types else []
    tried = Table(title="layers tried: strict pass % of the query alone, steered (* = outside the fluency bounds)")
    tried.add_column("type", no_wrap=True)
    for layer in layers:
        tried.add_column(f"L{layer}", justify="right")
    for name, t in types.items():
        tried.add_row(escape(name), *(f"{100 * t['layers'][k]['pass']:.0f}{'' if t['layers'][k]['fluent'] else '*'}" for k in layers))
    out.print(tried)
    boost = report["boost"]
    factors = ", ".join(f"m={m}: {100 * s['pass']:.0f}%{'' if s['fluent'] else '*'}" for m, s in boost["factors"].items())
    out.print(f"InstABoost on instructed validation prompts (strict pass %): {factors}; chosen m = {boost['chosen']:g}")


@steer_app.command("eval")
def evaluate(
    model: ModelOpt,
    steer: Annotated[Path, typer.Option("--steer", help="The steering file (`posttrain steer fit`).", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for results.json, outputs.jsonl, report.html and plot.png.")] = Path("runs/steer-eval"),
    prompts: PromptsOpt = None,
    types: TypesOpt = None,
    limit: Annotated[int, typer.Option("--limit", help="Prompts per type (built-in prompts: held-out queries, 74 at most).", min=1)] = 40,
    mode: Annotated[str, typer.Option("--mode", help="adjust (set the projection to c̄, Stolfo's) or add (add weight × the mean difference).")] = "adjust",
    weight: Annotated[float | None, typer.Option("--weight", help="Steering weight \\[default: 1 for adjust, the file's for add].")] = None,
    instaboost: Annotated[float | None, typer.Option("--instaboost", help="InstABoost's m \\[default: the one the fit chose].", min=1)] = None,
    max_perplexity: MaxPerplexityOpt = 2.0,
    max_repetition: MaxRepetitionOpt = 0.10,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 192,
    batch_size: BatchOpt = 64,
    bf16: Bf16Opt = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    template: TemplateOpt = None,
) -> None:
    """Strict pass rate per type for: no instruction; + steering; instruction; + steering; + InstABoost; with fluency and 95% bootstrap intervals.

    Built-in prompts use held-out queries only (never seen by `steer fit`). Writes a table (report.html),
    a bar chart (plot.png), the figures (results.json) and every generation (outputs.jsonl).
    """
    from posttrain.config import resolve_bf16
    from posttrain.generate import SamplingParams
    from posttrain.steer.evaluate import LABELS, write_report
    from posttrain.steer.evaluate import evaluate as run_eval
    from posttrain.steer.fluency import Bounds
    from posttrain.steer.vectors import SteeringSet

    if mode not in ("add", "adjust"):
        fail(f"--mode must be add or adjust, not {mode!r}")
    with user_errors():
        steering = SteeringSet.load(steer)
        chosen = _types(types) if types else [t for t in DEFAULT_TYPES if t in steering.directions] or list(steering.directions)
        examples = _builtin("heldout", limit, chosen, seed) if prompts is None else _from_file(prompts, chosen)
        engine = _engine(model, batch_size, template)
        params = SamplingParams(max_new_tokens=max_new_tokens, bf16=resolve_bf16(bf16))
        started = time.perf_counter()
        results, outputs = run_eval(
            engine, steering, examples, params, mode=mode, weight=weight, boost=instaboost, bounds=Bounds(max_perplexity, max_repetition)  # type: ignore[arg-type]
        )
        results["settings"]["seconds"] = round(time.perf_counter() - started, 1)
        paths = write_report(results, outputs, output)
    table = Table(title=f"steer eval: strict pass % [95% CI], {escape(steering.model)}; * = outside the fluency bounds")
    table.add_column("type")
    for c in LABELS.values():
        table.add_column(c, justify="right")
    rows = [(n, t["conditions"]) for n, t in results["types"].items()] + [("all types (pooled)", results["average"])]
    for name, row in rows:
        cells = []
        for c in LABELS:
            cell = row[c]
            cells.append(f"{100 * cell['pass']:.1f} [{100 * cell['ci'][0]:.0f}, {100 * cell['ci'][1]:.0f}]{'' if cell.get('fluent', True) else '*'}")
        table.add_row(escape(name), *cells)
    out.print(table)
    fluency = Table(title="fluency: perplexity under the unsteered model / share of repeated 4-grams")
    fluency.add_column("type")
    for c in LABELS.values():
        fluency.add_column(c, justify="right")
    for name, row in rows:
        fluency.add_row(escape(name), *(f"{row[c]['perplexity']:.2f} / {row[c]['repetition']:.3f}" for c in LABELS))
    out.print(fluency)
    out.print(
        "gains in strict pass rate, all types pooled [95% CI, paired over prompts]: "
        + " · ".join(f"{k.replace('_', ' ')} {100 * v['gain']:+.1f} [{100 * v['ci'][0]:+.1f}, {100 * v['ci'][1]:+.1f}]" for k, v in results["gains"].items())
    )
    err.print(f"{results['settings']['seconds']:.0f} s; wrote {', '.join(escape(str(p)) for p in paths)}", highlight=False)
