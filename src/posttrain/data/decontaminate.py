"""Decontamination: training records that hold the text of an evaluation set's items.

A training record is contaminated by an eval item when

- **n-gram overlap**: some piece of the record's text (:func:`posttrain.data.quality.segments`: each message,
  prompt, completion or side of a pair) shares a word n-gram with the item's text, both normalised as
  lm-evaluation-harness's decontamination does (:func:`posttrain.data.quality.words`: lower-case, punctuation
  deleted, whitespace-split; ``lm_eval/decontamination/janitor.py``). ``n = 8`` by default; GPT-3 (Brown et
  al. 2020, appendix C) and lm-eval's ``Janitor`` use 13, which finds less (every 13-gram holds eight
  8-grams) but reads more of an item as evidence;
- **exact prompt match**: a piece of the record's text equals the item's whole text after the same
  normalisation. This is what finds eval items shorter than n words, which have no n-gram.

An eval item is the text a model is asked to answer: IFEval's ``{"prompt"}``, each of MT-Bench's
``{"question_id", "turns": [...]}`` turns, AlpacaEval's ``{"instruction"}`` (with its ``input`` where
there is one), or the user turns of a record in any format posttrain reads (:mod:`posttrain.data.formats`).

As lm-eval's ``get_train_overlap`` does, the eval n-grams are indexed once (a dict from n-gram to the
first item holding it) and each training record is scanned once: a record's n-grams are made at C speed
(``zip`` over shifted word lists) and tested against the index as one set operation, so 52K records
against 1k items take seconds. Departures from lm-eval: a contaminated record is removed whole (lm-eval's
``Janitor.clean`` cuts 200 characters around each match and drops a document with more than 10 matches;
for instruction data a record is one example, and keeping what is left of it would train on a broken
one), and the normalisation's two Unicode departures named in :mod:`posttrain.data.quality`.
Our own code: lm-eval's is a script over n-gram dumps of the Pile, not a library call over records.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data.formats import CONVERTERS, DataError, RecordError, detect_format
from posttrain.data.quality import location_fields, segments, words
from posttrain.data.sources import Problem, RawItem, describe, read_raw
from posttrain.records import Location, Record

#: Bump when what counts as contamination changes: it is part of the tokenized-data cache key.
VERSION = 1
DEFAULT_N = 8


@dataclass(frozen=True)
class EvalItem:
    """One text of an evaluation set: where it is (file and line), its id there (IFEval's ``key``, MT-Bench's
    ``question_id`` and turn), and the text."""

    location: Location
    key: Any
    text: str

    def to_dict(self) -> dict[str, Any]:
        where = {"line": self.location.line} if self.location.line is not None else {"row": self.location.row}
        return {"file": self.location.source, **where, "key": self.key, "text": self.text}


class EvalDataError(DataError):
    """Bad lines in an eval file: every problem listed; an eval file is read whole or not at all."""

    def __init__(self, problems: list[Problem], source: str, max_listed: int = 20):
        self.problems, self.total = problems, len(problems)
        shown = "\n".join(f"  {p}" for p in problems[:max_listed])
        more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        Exception.__init__(self, f"eval file {source}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found:\n{shown}{more}")


EVAL_SHAPES = (
    'an eval item: {"prompt": text} (IFEval), {"turns": [text, ...]} (MT-Bench), {"instruction": text} (AlpacaEval), '
    "or a record of a format posttrain reads"
)


def _text(value: Any, location: Location, path: str, problems: list[Problem]) -> str | None:
    if isinstance(value, str) and value.strip():
        return value
    problems.append(Problem(location, path, "non-empty text", describe(value)))
    return None


def eval_items_of(item: RawItem, problems: list[Problem]) -> list[EvalItem]:
    """The eval texts of one raw line (several for MT-Bench's turns); problems are appended to ``problems``."""
    loc, value = item.location, item.value
    if item.problem is not None:
        problems.append(item.problem)
        return []
    if not isinstance(value, dict):
        problems.append(Problem(loc, None, "a JSON object (one eval item)", describe(value)))
        return []
    if "turns" in value:  # MT-Bench
        turns = value["turns"]
        if not isinstance(turns, list) or not turns:
            problems.append(Problem(loc, "turns", "a non-empty list of questions", describe(turns)))
            return []
        qid = value.get("question_id")
        texts = [(i, _text(t, loc, f"turns[{i}]", problems)) for i, t in enumerate(turns)]
        return [EvalItem(loc, f"{qid}/turn {i + 1}" if qid is not None else f"turn {i + 1}", t) for i, t in texts if t is not None]
    if "prompt" in value and not value.keys() & {"completion", "response", "chosen", "rejected"}:  # IFEval, prompt lines
        prompt, key = value["prompt"], value.get("key", value.get("id"))
        if isinstance(prompt, list):  # a prompt as messages: its user turns
            users = [(i, m.get("content")) for i, m in enumerate(prompt) if isinstance(m, dict) and m.get("role") == "user"]
            if not users:
                problems.append(Problem(loc, "prompt", "text, or messages with a user turn", describe(prompt)))
            texts = [(i, _text(content, loc, f"prompt[{i}].content", problems)) for i, content in users]
            return [EvalItem(loc, key, t) for _, t in texts if t is not None]
        text = _text(prompt, loc, "prompt", problems)
        return [EvalItem(loc, key, text)] if text is not None else []
    if "instruction" in value:  # AlpacaEval (its output, where given, is a reference model's answer, not the task)
        text = _text(value["instruction"], loc, "instruction", problems)
        extra = value.get("input")
        if extra is not None and not isinstance(extra, str):
            problems.append(Problem(loc, "input", "a string", describe(extra)))
        if text is None:
            return []
        return [EvalItem(loc, value.get("id"), f"{text}\n\n{extra}" if isinstance(extra, str) and extra.strip() else text)]
    kind = detect_format(value)
    if kind is None:
        problems.append(Problem(loc, None, EVAL_SHAPES, f"keys {sorted(value)}"))
        return []
    try:
        record = CONVERTERS[kind](value, loc)
    except RecordError as err:
        problems.extend(err.problems)
        return []
    users = [s for s in segments(record) if s.role == "user"]
    return [EvalItem(loc, value.get("id", value.get("key")), s.text) for s in users]


def read_eval_items(source: str | Path) -> list[EvalItem]:
    """Every eval text of ``source`` (a file posttrain reads: JSONL, JSON, Parquet, a dataset directory or hub id).

    Raises :class:`EvalDataError` listing every bad line (file, line, field, expected, found), and
    ValueError when the file holds no eval text at all.
    """
    problems: list[Problem] = []
    items: list[EvalItem] = []
    for raw in read_raw(source):
        items.extend(eval_items_of(raw, problems))
    if problems:
        raise EvalDataError(problems, str(source))
    if not items:
        raise ValueError(f"eval file {source}: no eval items in it ({EVAL_SHAPES})")
    return items


def ngrams(tokens: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    """The word n-grams of ``tokens`` in order (none when there are fewer than ``n``), as tuples."""
    return zip(*(tokens[i:] for i in range(n)))


@dataclass
class EvalIndex:
    """The eval items' n-grams (each mapped to the items holding it, in order) and whole normalised texts."""

    n: int
    items: list[EvalItem]
    grams: dict[tuple[str, ...], list[int]]
    exact: dict[str, int]
    sources: list[str] = field(default_factory=list)  # the eval files, as their items' locations name them

    @classmethod
    def build(cls, items: list[EvalItem], n: int = DEFAULT_N, sources: list[str] | None = None) -> EvalIndex:
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        grams: dict[tuple[str, ...], list[int]] = {}
        exact: dict[str, int] = {}
        for k, item in enumerate(items):
            tokens = words(item.text)
            if not tokens:
                continue
            exact.setdefault(" ".join(tokens), k)
            for gram in set(ngrams(tokens, n)):
                grams.setdefault(gram, []).append(k)
        return cls(n, items, grams, exact, sources or list(dict.fromkeys(i.location.source for i in items)))

    @classmethod
    def from_files(cls, sources: Iterable[str | Path], n: int = DEFAULT_N) -> EvalIndex:
        """The index of every eval text in ``sources``; its ``sources`` are the files as their items name them."""
        return cls.build([item for s in sources for item in read_eval_items(s)], n)

    def find(self, record: Record) -> Contamination | None:
        """How ``record`` matches, or None: an exact match of a whole piece (the first) before any n-gram; else
        the eval item sharing the most distinct n-grams with the record (the first such item on a tie; an n-gram
        of IFEval's instruction templates is held by many items) and the first of those n-grams in text order.
        ``shared_ngrams`` counts the record's distinct n-grams found in any eval item."""
        pieces = [(s, words(s.text)) for s in segments(record)]
        exact = next(((s, tokens, k) for s, tokens in pieces if tokens and (k := self.exact.get(" ".join(tokens))) is not None), None)
        keys = self.grams.keys()
        # The common case, a clean record, costs one C-level pass per piece: isdisjoint stops at the first
        # hit and builds no set. The details are worked out only for a record that has a hit.
        hits = [(s, tokens) for s, tokens in pieces if len(tokens) >= self.n and not keys.isdisjoint(ngrams(tokens, self.n))]
        if exact is None and not hits:
            return None
        shared = keys & {g for _, tokens in hits for g in ngrams(tokens, self.n)}
        if exact is not None:
            s, tokens, k = exact
            return Contamination(None, "exact", s.field, s.role, self.items[k], " ".join(tokens), len(shared))
        votes = Counter(k for g in shared for k in self.grams[g])
        item = min(votes, key=lambda k: (-votes[k], k))
        s, gram = next((s, g) for s, tokens in hits for g in ngrams(tokens, self.n) if g in shared and item in self.grams[g])
        return Contamination(None, "ngram", s.field, s.role, self.items[item], " ".join(gram), len(shared))

    def key(self) -> str:
        """What decontamination against these items depends on, for cache keys: the items' texts, n, and :data:`VERSION`."""
        h = hashlib.sha256(json.dumps({"n": self.n, "version": VERSION}).encode())
        for item in self.items:
            h.update(item.text.encode())
            h.update(b"\0")
        return h.hexdigest()


@dataclass
class Contamination:
    """A contaminated record: where it is, how it matched (``exact`` or ``ngram``), the record's field and role
    that matched, the eval item, the matching n-gram (or whole text) as normalised words, and how many
    distinct n-grams the record shares with the eval sets."""

    location: Location | None
    match: str
    field: str
    role: str
    item: EvalItem
    ngram: str
    shared_ngrams: int

    def to_dict(self) -> dict[str, Any]:
        where = location_fields(self.location) if self.location is not None else {}
        return {
            **where,
            "match": self.match,
            "field": self.field,
            "role": self.role,
            "eval": self.item.to_dict(),
            "ngram": self.ngram,
            "shared_ngrams": self.shared_ngrams,
        }


@dataclass
class DecontaminationResult:
    """What a scan found: the indices of clean records, and one :class:`Contamination` per contaminated record."""

    checked: int
    kept: list[int]
    found: list[Contamination]
    index: EvalIndex

    def summary(self, examples: int = 20) -> dict[str, Any]:
        """Counts for data_stats.json: records checked and removed, by match kind and by eval file, the first few places."""
        return {
            "against": self.index.sources,
            "n": self.index.n,
            "eval_items": len(self.index.items),
            "checked": self.checked,
            "removed": len(self.found),
            "by_match": dict(Counter(c.match for c in self.found)),
            "by_eval_file": dict(Counter(c.item.location.source for c in self.found)),
            "removed_at": [str(c.location) for c in self.found[:examples]],
        }


def decontaminate(
    records: Sequence[tuple[Location, Record]], index: EvalIndex, *, progress: Callable[[int], None] | None = None, every: int = 2048
) -> DecontaminationResult:
    """Scan ``records`` (each with its location) once against ``index``; ``progress(n)`` is called every ``every`` records."""
    kept: list[int] = []
    found: list[Contamination] = []
    for i, (location, record) in enumerate(records):
        hit = index.find(record)
        if hit is None:
            kept.append(i)
        else:
            hit.location = location
            found.append(hit)
        if progress is not None and (i + 1) % every == 0:
            progress(every)
    if progress is not None and len(records) % every:
        progress(len(records) % every)
    return DecontaminationResult(len(records), kept, found, index)


def decontaminate_items(
    items: Sequence[tuple[RawItem, Record]], against: Sequence[str | Path], n: int = DEFAULT_N, *, progress: Callable[[int], None] | None = None
) -> DecontaminationResult:
    """:func:`decontaminate` of records as :func:`posttrain.data.formats.iter_read` gives them, against eval files."""
    index = EvalIndex.from_files(against, n)
    return decontaminate([(raw.location, record) for raw, record in items], index, progress=progress)
