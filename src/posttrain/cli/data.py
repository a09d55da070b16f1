"""`posttrain data ...`: read, check, convert, inspect and tokenize instruction data."""

from __future__ import annotations

import json
import statistics
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from posttrain.cli.common import TemplateOpt, err, out, user_errors

data_app = typer.Typer(help="Read, check, convert and tokenize instruction data.", no_args_is_help=True)


class Format(str, Enum):
    alpaca = "alpaca"
    sharegpt = "sharegpt"
    messages = "messages"
    prompt_completion = "prompt_completion"
    preference = "preference"
    ifeval = "ifeval"


class OnError(str, Enum):
    stop = "stop"
    skip = "skip"


class TrainOn(str, Enum):
    all_assistant = "all_assistant"
    last_assistant = "last_assistant"
    all = "all"


class Overlong(str, Enum):
    truncate = "truncate"
    drop = "drop"


FileArg = Annotated[str, typer.Argument(help="A .json, .jsonl or .parquet file, a local Hugging Face dataset directory, or a hub id.")]
FormatOpt = Annotated[Optional[Format], typer.Option("--format", "-f", help="Force the input format instead of detecting it from the first record.")]
OnErrorOpt = Annotated[OnError, typer.Option("--on-error", help="stop: list problems and fail. skip: drop bad records, write them with reasons to a rejects file.")]
RejectsOpt = Annotated[Optional[Path], typer.Option("--rejects", help="Where --on-error skip writes bad records \\[default: FILE.rejects.jsonl beside the output, or in the current directory].")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Split of a dataset directory or hub dataset \\[default: train].")]
SubsetOpt = Annotated[Optional[str], typer.Option("--subset", help="A hub dataset's subset (its configuration name), where it has several.")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit of a hub dataset \\[default: main].")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Tokenizer to use: a local model directory, a zoo name (tiny-llama, tiny-qwen2) or a hub id.")]
TrainOnOpt = Annotated[TrainOn, typer.Option("--train-on", help="Which tokens are trained: every assistant turn, the last one only, or all tokens.")]
MaxLenOpt = Annotated[Optional[int], typer.Option("--max-length", help="Longest example in tokens; longer ones are handled by --overlong.", min=2)]
NumProcOpt = Annotated[Optional[int], typer.Option(help="Processes for rendering \\[default: cores, up to 8].")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(help="Tokenized-data cache \\[default: ~/.cache/posttrain/tokenized].")]
OverlongOpt = Annotated[Overlong, typer.Option("--overlong", help="truncate: cut to --max-length (dropped if nothing trained remains). drop: drop the example.")]


def _rejects_path(file: str, rejects: Path | None) -> Path:
    return rejects or Path(Path(file).name + ".rejects.jsonl")


def _report_rejects(report, rejects: Path | None) -> None:
    from posttrain.data.formats import write_rejects

    if report.rejected:
        path = _rejects_path(report.source, rejects)
        write_rejects(path, report)
        err.print(f"[yellow]skipped {len(report.rejected)} bad record(s) of {report.read}[/]; they and their reasons are in {escape(str(path))}")


def _read(file: str, format: Format | None, on_error: OnError, rejects: Path | None, split: str | None, subset: str | None = None, revision: str | None = None):
    from posttrain.data.formats import ReadReport, read_records

    report = ReadReport(file)
    records = read_records(file, format=format.value if format else None, on_error=on_error.value, split=split, subset=subset, revision=revision, report=report)
    _report_rejects(report, rejects)
    return records, report


@data_app.command()
def validate(
    file: FileArg, format: FormatOpt = None, on_error: OnErrorOpt = OnError.stop, rejects: RejectsOpt = None, split: SplitOpt = None,
    subset: SubsetOpt = None, revision: RevisionOpt = None,
) -> None:  # fmt: skip
    """Check every record of FILE and report each problem with its line, field, what was expected and what was found."""
    with user_errors():
        records, report = _read(file, format, on_error, rejects, split, subset, revision)
    out.print(f"{escape(file)}: {report.read} records read, format [bold]{report.format}[/], {report.kept} valid, {len(report.rejected)} rejected")


@data_app.command()
def convert(
    file: FileArg,
    to: Annotated[Format, typer.Option("--to", help="Output format.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .jsonl file.")],
    format: FormatOpt = None,
    on_error: OnErrorOpt = OnError.stop,
    rejects: RejectsOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    revision: RevisionOpt = None,
) -> None:
    """Convert FILE to another format (e.g. ShareGPT to OpenAI-style messages), one JSON object a line."""
    from posttrain.data.convert import to_format
    from posttrain.records import write_jsonl

    with user_errors():
        records, report = _read(file, format, on_error, rejects, split, subset, revision)
        converted = [to_format(r, to.value) for r in records]
        n = write_jsonl(output, converted)
    out.print(f"wrote {n} {to.value} records to {escape(str(output))} (read {report.read} {report.format} records, rejected {len(report.rejected)})")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True)


def _prepare(file, model, template, train_on, max_length, overlong, format, on_error, rejects, split, num_proc, cache_dir, subset=None, revision=None):
    from posttrain.data.cache import prepare
    from posttrain.data.chat import RenderOptions
    from posttrain.data.formats import ReadReport
    from posttrain.models.load import load_tokenizer

    options = RenderOptions(train_on=train_on.value, max_length=max_length, overlong=overlong.value, template=template)
    tokenizer = load_tokenizer(model)
    report = ReadReport(file)
    with _progress() as bar:
        task = bar.add_task("tokenizing", total=None)
        data = prepare(
            file,
            tokenizer,
            options,
            format=format.value if format else None,
            on_error=on_error.value,
            split=split,
            subset=subset,
            revision=revision,
            cache=cache_dir,
            num_proc=num_proc,
            progress=lambda done, total: bar.update(task, advance=done, total=total),
            report=report,
        )
    if data.from_cache and data.read.get("rejected"):
        _read(file, format, on_error, rejects, split, subset, revision)  # cached tokens, but the rejects file is still wanted
    else:
        _report_rejects(report, rejects)
    return tokenizer, options, data


def _stats_table(data, title: str) -> Table:
    s = data.stats
    lengths = data.lengths().tolist() or [0]
    table = Table(title=title, show_header=False)
    table.add_row("records read", str(data.read.get("read", "?")) + (f" ({data.read.get('rejected')} rejected)" if data.read.get("rejected") else ""))
    table.add_row("format", str(data.read.get("format")))
    table.add_row("examples kept", f"{s.kept} of {s.examples}")
    table.add_row("tokens: total / mean / median / max", f"{s.tokens:,} / {statistics.fmean(lengths):.1f} / {statistics.median(lengths):.0f} / {max(lengths)}")
    table.add_row("trained tokens", f"{s.trained_tokens:,} ({s.trained_tokens / max(s.tokens, 1):.1%} of all)")
    table.add_row("over --max-length: truncated", str(s.truncated))
    table.add_row("over --max-length: dropped", str(s.dropped_overlong))
    table.add_row("dropped, nothing left to train", str(s.dropped_nothing_trained))
    ends = ", ".join(f"{tok!r} ×{n}" for tok, n in s.turn_end_tokens.most_common(4))
    table.add_row("trained turns end with", escape(ends) or "-")
    table.add_row("cache", ("reused " if data.from_cache else "written ") + data.key)
    return table


def highlight(tokenizer, input_ids, labels) -> Text:
    """The example as text, trained tokens on a green background, special tokens in bold.

    Runs of tokens with the same style are decoded together, so characters split across byte-level
    tokens come out whole.
    """
    text = Text()
    special = set(tokenizer.all_special_ids)
    styles = [("black on green" if int(label) != -100 else "dim") + (" bold" if int(t) in special else "") for t, label in zip(input_ids, labels)]
    start = 0
    for k in range(1, len(styles) + 1):
        if k == len(styles) or styles[k] != styles[start]:
            piece = tokenizer.decode([int(t) for t in input_ids[start:k]], clean_up_tokenization_spaces=False)
            text.append(piece, style=styles[start])
            start = k
    return text


@data_app.command()
def inspect(
    file: FileArg,
    model: ModelOpt,
    n: Annotated[int, typer.Option("--n", "-n", help="How many rendered examples to show.")] = 2,
    template: TemplateOpt = None,
    train_on: TrainOnOpt = TrainOn.all_assistant,
    max_length: MaxLenOpt = None,
    overlong: OverlongOpt = Overlong.truncate,
    format: FormatOpt = None,
    on_error: OnErrorOpt = OnError.stop,
    rejects: RejectsOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    revision: RevisionOpt = None,
    num_proc: NumProcOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Show FILE as the model will see it: rendered examples with the trained tokens highlighted, and statistics."""
    with user_errors():
        tokenizer, options, data = _prepare(file, model, template, train_on, max_length, overlong, format, on_error, rejects, split, num_proc, cache_dir, subset, revision)
    for i in range(min(n, len(data))):
        ex = data[i]
        out.rule(f"example {i}: {len(ex['input_ids'])} tokens, {(ex['labels'] != -100).sum()} trained")
        out.print(highlight(tokenizer, ex["input_ids"], ex["labels"]))
    out.print(Text.assemble(("trained", "black on green"), " = in the loss;  ", ("dim", "dim"), " = context only"))
    out.print(_stats_table(data, f"{escape(file)} with {escape(model)} ({options.train_on})"))


@data_app.command()
def render(
    file: FileArg,
    model: ModelOpt,
    output: Annotated[Path, typer.Option("--out", "-o", help="Output .jsonl: one {\"input_ids\", \"labels\"} object per example.")],
    template: TemplateOpt = None,
    train_on: TrainOnOpt = TrainOn.all_assistant,
    max_length: MaxLenOpt = None,
    overlong: OverlongOpt = Overlong.truncate,
    format: FormatOpt = None,
    on_error: OnErrorOpt = OnError.stop,
    rejects: RejectsOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    revision: RevisionOpt = None,
    num_proc: NumProcOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Tokenize FILE and write token ids with labels (the token where trained, -100 where not; unshifted)."""
    with user_errors():
        _, options, data = _prepare(file, model, template, train_on, max_length, overlong, format, on_error, rejects, split, num_proc, cache_dir, subset, revision)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as f:
        for i in range(len(data)):
            ex = data[i]
            f.write(json.dumps({"input_ids": ex["input_ids"].tolist(), "labels": ex["labels"].tolist()}) + "\n")
    err.print(_stats_table(data, f"{escape(file)} → {escape(str(output))}"))


def _read_items(file: str, format: Format | None, on_error: OnError, rejects: Path | None, split: str | None, subset: str | None, revision: str | None):
    """Every good record of FILE with the raw item it came from (its place, and its value as read, for the cleaned output)."""
    from posttrain.data.formats import ReadReport, iter_read

    report = ReadReport(file)
    items = list(iter_read(file, format=format.value if format else None, on_error=on_error.value, split=split, subset=subset, revision=revision, report=report))
    _report_rejects(report, rejects)
    return items, report


class DedupField(str, Enum):
    prompt = "prompt"
    response = "response"


@data_app.command()
def dedup(
    file: FileArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the kept records here, each as it was read, one JSON object a line.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write one JSON line per cluster: size, the kept record's line, the dropped lines with their similarity.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Near duplicates: Jaccard similarity of word shingles at or above this.", min=0.01, max=1.0)] = 0.8,
    field: Annotated[
        list[DedupField] | None, typer.Option("--field", help="What is compared: the user turns (prompt), the assistant turns (response); repeatable \\[default: both].")
    ] = None,
    shingle: Annotated[int, typer.Option("--shingle", help="Words per shingle (a shorter text is one shingle).", min=1)] = 5,
    num_perm: Annotated[int, typer.Option("--num-perm", help="MinHash permutations.", min=16)] = 128,
    format: FormatOpt = None,
    on_error: OnErrorOpt = OnError.stop,
    rejects: RejectsOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    revision: RevisionOpt = None,
) -> None:
    """Find exact and near duplicates in FILE; keep the first record of each cluster.

    Compared: each record's user turns, then its assistant turns (--field picks a side), lower-cased, punctuation deleted.
    Exact duplicates have the same text; near ones are proposed by MinHash LSH (datasketch), then each is confirmed
    with the actual Jaccard similarity of the two records' word shingles: nothing is dropped below --threshold.
    """
    from posttrain.data.dedup import dedup as find_duplicates
    from posttrain.data.quality import write_values
    from posttrain.records import write_jsonl

    fields = [f.value for f in field] if field else ["prompt", "response"]
    with user_errors():
        items, _ = _read_items(file, format, on_error, rejects, split, subset, revision)
        with _progress() as bar:
            task = bar.add_task("deduplicating", total=len(items))
            result = find_duplicates(
                [record for _, record in items], fields=fields, threshold=threshold, shingle=shingle, num_perm=num_perm,
                progress=lambda n: bar.update(task, advance=n),
            )  # fmt: skip
        if output is not None:
            write_values(output, (items[i][0].value for i in result.kept))
        if report is not None:
            locations = [raw.location for raw, _ in items]
            write_jsonl(report, (c.to_dict(locations) for c in result.clusters))
    out.print(
        f"{escape(file)}: {result.records} records in, {result.exact} exact duplicates, {result.near} near duplicates "
        f"(Jaccard ≥ {threshold} over {shingle}-word shingles of the {' and '.join(fields)}), {len(result.kept)} kept, in {len(result.clusters)} cluster(s) of more than one"
    )
    if result.without_text:
        out.print(f"{result.without_text} record(s) have no {' or '.join(fields)} text to compare: kept, not counted as duplicates")
    if output is not None:
        out.print(f"kept records: {escape(str(output))}")
    if report is not None:
        out.print(f"clusters: {escape(str(report))}")


@data_app.command()
def decontaminate(
    file: FileArg,
    against: Annotated[list[str], typer.Option("--against", help="An eval file: IFEval, MT-Bench, AlpacaEval, or any format posttrain reads (its user turns). Repeatable.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Write the clean records here, each as it was read, one JSON object a line.")],
    report: Annotated[Path, typer.Option("--report", help="Write one JSON line per contaminated record: its line, the eval item, the matching n-gram.")],
    n: Annotated[int, typer.Option("--n", help="Words per n-gram (13 as GPT-3 and lm-evaluation-harness).", min=1)] = 8,
    format: FormatOpt = None,
    on_error: OnErrorOpt = OnError.stop,
    rejects: RejectsOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    revision: RevisionOpt = None,
) -> None:
    """Remove the records of FILE that hold text of an eval set's items.

    Contaminated: any message of the record shares a word n-gram with an eval item, or equals an eval item's whole text,
    both normalised as lm-evaluation-harness's decontamination does (lower-case, punctuation deleted, split on spaces).
    """
    from collections import Counter

    from posttrain.data.decontaminate import EvalIndex
    from posttrain.data.decontaminate import decontaminate as scan
    from posttrain.data.quality import write_values
    from posttrain.records import write_jsonl

    with user_errors():
        index = EvalIndex.from_files(against, n)
        items, _ = _read_items(file, format, on_error, rejects, split, subset, revision)
        with _progress() as bar:
            task = bar.add_task("checking", total=len(items))
            result = scan([(raw.location, record) for raw, record in items], index, progress=lambda k: bar.update(task, advance=k))
        write_values(output, (items[i][0].value for i in result.kept))
        write_jsonl(report, (c.to_dict() for c in result.found))
    by_match = Counter(c.match for c in result.found)
    by_file = Counter(c.item.location.source for c in result.found)
    out.print(f"eval: {len(index.items)} texts from {len(against)} file(s), {len(index.grams):,} distinct {n}-grams")
    out.print(
        f"{escape(file)}: {result.checked} records in, {len(result.found)} contaminated ({by_match['ngram']} by a shared {n}-gram, "
        f"{by_match['exact']} by an exact prompt match), {len(result.kept)} kept"
    )
    for source in index.sources:
        out.print(f"  against {escape(source)}: {by_file[source]} record(s)")
    out.print(f"clean records: {escape(str(output))}; report: {escape(str(report))}")
