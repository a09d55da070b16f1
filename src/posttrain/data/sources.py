"""Raw records out of files and datasets, each with the place it came from.

Reads JSON (an array of objects, or an object holding one such array), JSONL, Parquet, a local Hugging
Face dataset directory (``save_to_disk`` output, or a folder of data files), or a hub id through
``datasets``. Undecodable bytes and unparsable lines do not stop reading: they come out as problems
at their line, so validation can list every problem in a file at once.

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


def read_dataset(name: str, split: str | None = None) -> Iterator[RawItem]:
    """A local Hugging Face dataset directory or a hub id, through ``datasets``."""
    import datasets

    path = Path(name)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
    if isinstance(ds, datasets.DatasetDict):
        chosen = split or ("train" if "train" in ds else next(iter(ds)))
        if chosen not in ds:
            raise FileNotFoundError(f"{name}: no split {chosen!r}; it has {sorted(ds)}")
        ds, source = ds[chosen], f"{name}[{chosen}]"
    else:
        source = name
    for row, value in enumerate(ds):
        yield RawItem(Location(source, row=row), value=value)


def read_raw(source: str | Path, split: str | None = None) -> Iterator[RawItem]:
    """Raw items from any supported source, chosen by suffix (``.json``, ``.jsonl``, ``.parquet``) or kind."""
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
        return read_dataset(str(path), split)
    if path.suffix or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise FileNotFoundError(f"{source}: no such file or directory")
    return read_dataset(str(source), split)  # a hub id such as "tatsu-lab/alpaca"
