"""Raw records out of files and datasets, each with the place it came from.

Reads JSON (an array of objects, or an object holding one such array), JSONL, Parquet, a local Hugging
Face dataset directory (``save_to_disk`` output, or a folder of data files), or a hub id through
``datasets`` (or, when the hub cannot be reached, from its snapshot in the local hub cache). Undecodable
bytes and unparsable lines do not stop reading: they come out as problems at their line, so validation
can list every problem in a file at once.

Our own code for JSON/JSONL (rather than ``datasets.load_dataset("json")``) because people need line
numbers in errors, and Arrow's JSON reader neither reports them nor accepts records of differing shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain import hub
from posttrain.records import Location


# Keys whose list-of-objects value is part of a record, so an object holding one is a record, not a wrapper.
RECORD_LIST_KEYS = frozenset({"messages", "conversations", "chosen", "rejected", "prompt", "completion", "preferred_output", "non_preferred_output", "tools", "kwargs"})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input record, worded for the person who has to fix the file."""

    location: Location
    field: str | None
    expected: str
    found: str

    def __str__(self) -> str:
        where = f"{self.location}: field '{self.field}'" if self.field else f"{self.location}"
        return f"{where}: expected {self.expected}, found {self.found}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.location.source,
            "line": self.location.line,
            "row": self.location.row,
            "field": self.field,
            "expected": self.expected,
            "found": self.found,
            "message": str(self),
        }


@dataclass(frozen=True)
class RawItem:
    """A record as read (``value``), or the reason it could not be read (``problem``)."""

    location: Location
    value: Any = None
    problem: Problem | None = None


def describe(value: Any, limit: int = 60) -> str:
    """A short, typed rendering of a found value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        text = value if len(value) <= limit else value[: limit - 3] + "..."
        return "empty string" if not value else f"string {json.dumps(text, ensure_ascii=False)}"
    if isinstance(value, list):
        return f"list of {len(value)} items"
    if isinstance(value, dict):
        return f"object with keys {sorted(value)[:8]}"
    return type(value).__name__


def _decode_error(location: Location, err: UnicodeDecodeError, text_start: int = 0) -> Problem:
    return Problem(
        location,
        None,
        "UTF-8 text",
        f"byte 0x{err.object[err.start]:02x} at column {err.start - text_start + 1}, which is not valid UTF-8 "
        "(re-save the file as UTF-8)",
    )


def read_jsonl(path: Path) -> Iterator[RawItem]:
    source = str(path)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            location = Location(source, line=number)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield RawItem(location, problem=_decode_error(location, err))
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                yield RawItem(
                    location,
                    problem=Problem(location, None, "one JSON object per line", f"invalid JSON ({err.msg} at column {err.colno})"),
                )
                continue
            yield RawItem(location, value=value)


def read_json(path: Path) -> Iterator[RawItem]:
    """A JSON array of records, read element by element so each record knows its starting line."""
    source = str(path)
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        line_start = data.rfind(b"\n", 0, err.start) + 1
        location = Location(source, line=line)
        yield RawItem(location, problem=_decode_error(location, err, line_start))
        return
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos < len(text) and text[pos] == "{":
        # An object: either one record, or a wrapper such as {"data": [...]} holding the records.
        try:
            obj, _ = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            location = Location(source, line=err.lineno)
            yield RawItem(location, problem=Problem(location, None, "valid JSON", f"invalid JSON ({err.msg} at column {err.colno})"))
            return
        lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) != 1 or lists[0] in RECORD_LIST_KEYS:  # one record, not a wrapper around records
            yield RawItem(Location(source, line=text.count("\n", 0, pos) + 1), value=obj)
            return
        # Continue at the wrapped array's "[" so records keep their line numbers.
        match = re.compile(re.escape(json.dumps(lists[0])) + r"\s*:\s*\[").search(text, pos)
        if match is None:  # key written with escapes; fall back to unnumbered items
            for value in obj[lists[0]]:
                yield RawItem(Location(source), value=value)
            return
        pos = match.end() - 1
    if pos >= len(text) or text[pos] != "[":
        location = Location(source, line=text.count("\n", 0, pos) + 1)
        yield RawItem(location, problem=Problem(location, None, "a JSON array of records (or use .jsonl for one record a line)", "something else"))
        return
    pos = _skip_ws(text, pos + 1)
    line = text.count("\n", 0, pos) + 1
    while pos < len(text) and text[pos] != "]":
        location = Location(source, line=line)
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            yield RawItem(location, problem=Problem(Location(source, line=err.lineno), None, "valid JSON", f"invalid JSON ({err.msg} at column {err.colno}); reading stopped here"))
            return
        yield RawItem(location, value=value)
        line += text.count("\n", pos, end)
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            nxt = _skip_ws(text, pos + 1)
            line += text.count("\n", pos, nxt)
            pos = nxt


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_parquet(path: Path) -> Iterator[RawItem]:
    import pyarrow.parquet as pq

    source = str(path)
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for value in batch.to_pylist():
            yield RawItem(Location(source, row=row), value=value)
            row += 1


def read_dataset(name: str, split: str | None = None, *, subset: str | None = None, revision: str | None = None) -> Iterator[RawItem]:
    """A local Hugging Face dataset directory, or a hub dataset id, through ``datasets``.

    ``subset`` is the dataset's configuration name, ``revision`` a hub branch, tag or commit. With no
    ``split``, the ``train`` split; a dataset without one is refused with the list of its splits (never
    silently its first). When the hub cannot be reached (offline mode, or no connection), a hub dataset
    is read from its snapshot in the local hub cache (:func:`read_cached_hub_dataset`).
    """
    import datasets

    path = Path(name)
    if path.is_dir():
        if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            if subset:
                raise ValueError(f"{name}: a save_to_disk directory has no subsets (found subset {subset!r})")
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path), subset)
    elif hub.offline():  # datasets would refuse (OfflineModeIsEnabled) even with the repo in the hub cache
        yield from read_cached_hub_dataset(name, split, subset=subset, revision=revision)
        return
    else:
        try:
            ds = datasets.load_dataset(name, subset, split=split, revision=revision) if split else datasets.load_dataset(name, subset, revision=revision)
        except ConnectionError as err:  # the hub is out of reach: its cached snapshot, if any
            yield from read_cached_hub_dataset(name, split, subset=subset, revision=revision, error=err)
            return
    if isinstance(ds, datasets.DatasetDict):
        chosen = choose_split(name, list(ds), split)
        ds, source = ds[chosen], f"{name}[{chosen}]"
    else:
        source = f"{name}[{split}]" if split else name
    for row, value in enumerate(ds):
        yield RawItem(Location(source, row=row), value=value)


def choose_split(name: str, splits: list[str], split: str | None) -> str:
    """``split``, or ``train`` when none is named; FileNotFoundError listing ``splits`` when it is not among them."""
    if split is None:
        if "train" in splits:
            return "train"
        raise FileNotFoundError(f"{name} has no train split; name the split to read (data.split, or --split): it has {', '.join(sorted(splits))}")
    if split not in splits:
        raise FileNotFoundError(f"{name}: no split {split!r}; it has {', '.join(sorted(splits))}")
    return split


#: Data files the cached-snapshot reader reads (with our readers, which give line numbers).
CACHED_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq")


def read_cached_hub_dataset(
    name: str, split: str | None = None, *, subset: str | None = None, revision: str | None = None, error: BaseException | None = None
) -> Iterator[RawItem]:
    """A hub dataset's split from its snapshot in the local hub cache, without the hub.

    Splits map to data files as ``datasets`` maps them (``get_data_patterns``: ``train*``, ``test*``,
    ``data/train-*`` ...), through its ``DataFilesDict``. ``subset`` is a configuration of the README's
    ``configs:`` YAML (its ``data_files`` and ``data_dir``; with none named, the default one) or, in a repo
    without ``configs:``, a top-level folder of that name. The files are read by this module's JSONL,
    JSON and Parquet readers, so problems name file and line; other file types are refused by name.
    ``error`` is what made the hub unreachable, for the message when the dataset is not cached either.
    """
    from datasets.data_files import DataFilesDict, get_data_patterns, sanitize_patterns

    snapshot = hub.cached_snapshot(name, repo_type="dataset", revision=revision)
    if snapshot is None:
        raise FileNotFoundError(
            hub.unavailable(name, repo_type="dataset", revision=revision, error=error)
            or f"{name}: the hub cannot be reached and the dataset is not in the local hub cache ({hub.cache_dir()})"
        )
    base, patterns = snapshot, None
    configs = _readme_configs(snapshot)
    if configs:
        chosen = subset or configs.get_default_config_name()
        if chosen is None:
            raise FileNotFoundError(f"{name} has several subsets; name one (data.subset): {', '.join(sorted(configs))}")
        if chosen not in configs:
            raise FileNotFoundError(f"{name}: no subset {chosen!r}; its README lists {', '.join(sorted(configs))}")
        base = snapshot / (configs[chosen].get("data_dir") or "")
        if configs[chosen].get("data_files"):
            patterns = sanitize_patterns(configs[chosen]["data_files"])
    elif subset:
        base = snapshot / subset
        if not base.is_dir():
            folders = sorted(p.name for p in snapshot.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise FileNotFoundError(f"{name}: no subset {subset!r} (its README has no configs: and it has no folder {subset}/; folders: {', '.join(folders) or 'none'})")
    if patterns is None:
        patterns = get_data_patterns(str(base))
    files = {str(key): list(value) for key, value in DataFilesDict.from_patterns(patterns, base_path=str(base)).items()}
    chosen_split = choose_split(name, list(files), split)
    unreadable = [f for f in files[chosen_split] if not f.lower().endswith(CACHED_DATA_SUFFIXES)]
    if unreadable:
        raise ValueError(
            f"{name}: reading from the local hub cache takes {', '.join(CACHED_DATA_SUFFIXES)} files; split {chosen_split!r} has {', '.join(unreadable[:3])}"
            " (read it online, where datasets converts it, or convert it to JSONL)"
        )
    for file in files[chosen_split]:
        yield from read_raw(file)


def _readme_configs(snapshot: Path) -> Any:
    """The ``configs:`` of a dataset repo's README YAML, as ``datasets`` reads them (empty when there are none)."""
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    readme = snapshot / "README.md"
    return MetadataConfigs.from_dataset_card_data(DatasetCard.load(readme).data if readme.is_file() else DatasetCardData())


def read_raw(source: str | Path, split: str | None = None, *, subset: str | None = None, revision: str | None = None) -> Iterator[RawItem]:
    """Raw items from any supported source: a file by suffix (``.json``, ``.jsonl``, ``.parquet``), a dataset
    directory, or a hub dataset id (:func:`posttrain.hub.is_hub_id`) with its ``split``, ``subset`` and ``revision``."""
    path = Path(source)
    suffix = "".join(path.suffixes[-1:]).lower()
    if path.is_file():
        if suffix in (".jsonl", ".ndjson"):
            return read_jsonl(path)
        if suffix == ".json":
            return read_json(path)
        if suffix in (".parquet", ".pq"):
            return read_parquet(path)
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .json, .jsonl or .parquet")
    if path.is_dir():
        return read_dataset(str(path), split, subset=subset)
    if not hub.is_hub_id(str(source)):
        raise FileNotFoundError(f"{source}: no such file or directory")
    return read_dataset(str(source), split, subset=subset, revision=revision)  # a hub id such as "tatsu-lab/alpaca"
