"""Tokenized data, made once and cached under a content hash.

The key covers everything the tokens depend on: the data's bytes, the tokenizer (its vocabulary,
merges and special tokens), the chat template text, the render options, the input format and
``TRANSFORM_VERSION`` (bumped whenever rendering changes). An unchanged second run loads the arrays and
tokenizes nothing; change any of those and it tokenizes again. Never keyed by a name that could later
mean something else.

In one process, records are rendered (Python and Jinja) and tokenized in chunks of ``CHUNK`` records, one
batch call per chunk, which the Rust tokenizer spreads over the cores. With ``num_proc > 1`` and more than one
chunk, a process pool renders *and* tokenizes smaller chunks, and sends back flat arrays. In a run of several
processes (torchrun), each tokenizes its own share of the records and the main process joins the shares
into one entry (:func:`prepare`'s ``group``), so the cache directory must be one every process can read.

An entry is three flat ``.npy`` arrays, read back memory-mapped: examples are paged in as a batch needs
them, and processes on one machine share one copy in the page cache instead of each holding the data set.
They are written a chunk at a time into the final file, so making an entry holds the tokens once, not twice.
Our own code, small, on numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain, pairwise
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from posttrain import hub
from posttrain.cache_root import cache_dir
from posttrain.data.chat import IGNORE, ChatRenderer, RenderOptions, RenderStats
from posttrain.data.decontaminate import EvalIndex, decontaminate
from posttrain.data.formats import ReadReport, iter_read, read_records

TRANSFORM_VERSION = 3
CHUNK = 1024
MIN_POOL_CHUNK = 128


@dataclass
class Chunk:
    """The kept examples of some records as flat arrays (``lengths[i]`` tokens each), with their stats."""

    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    stats: RenderStats


@dataclass
class TokenizedData:
    """Examples as flat arrays: example ``i`` is ``input_ids[offsets[i]:offsets[i+1]]``."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    stats: RenderStats
    from_cache: bool = False
    key: str = ""
    read: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.input_ids[a:b], "labels": self.labels[a:b]}

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_examples(cls, examples: list[dict], stats: RenderStats) -> TokenizedData:
        lengths = [len(ex["input_ids"]) for ex in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = lambda key: np.fromiter(chain.from_iterable(ex[key] for ex in examples), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat("input_ids"), flat("labels"), offsets, stats)

    @classmethod
    def from_chunks(cls, chunks: list[Chunk]) -> TokenizedData:
        stats = RenderStats()
        for c in chunks:
            stats.merge(c.stats)
        lengths = np.concatenate([c.lengths for c in chunks]) if chunks else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = lambda key: np.concatenate([getattr(c, key) for c in chunks]) if chunks else np.zeros(0, dtype=np.int32)
        return cls(flat("input_ids"), flat("labels"), offsets, stats)

    def save(self, path: Path) -> None:
        write_entry(path, [Chunk(self.input_ids, self.labels, self.lengths(), self.stats)], self.stats, self.read)

    @classmethod
    def load(cls, path: Path) -> TokenizedData:
        """An entry, its token arrays memory-mapped read-only (offsets, one number an example, in memory)."""
        meta = json.loads((path / "stats.json").read_text())
        return cls(
            np.load(path / "input_ids.npy", mmap_mode="r"),
            np.load(path / "labels.npy", mmap_mode="r"),
            np.load(path / "offsets.npy"),
            RenderStats.from_dict(meta["render"]),
            from_cache=True,
            key=path.name,
            read=meta.get("read", {}),
        )


def write_entry(path: Path, parts: list[Any], stats: RenderStats, read: dict[str, Any]) -> None:
    """Write ``parts`` (each with ``input_ids``, ``labels`` and per-example ``lengths`` arrays: :class:`Chunk` objects,
    or entries read back with lengths) end to end as one entry in ``path``, a part at a time into the
    final files (nothing is concatenated in memory)."""
    from numpy.lib.format import open_memmap

    path.mkdir(parents=True, exist_ok=True)
    lengths = np.concatenate([np.asarray(p.lengths, dtype=np.int64) for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    for name in ("input_ids", "labels"):
        out = open_memmap(path / f"{name}.npy", mode="w+", dtype=np.int32, shape=(total,))
        at = 0
        for part in parts:
            values = getattr(part, name)
            out[at : at + len(values)] = values
            at += len(values)
        out.flush()
        del out
    np.save(path / "offsets.npy", offsets)
    (path / "stats.json").write_text(json.dumps({"render": stats.to_dict(), "read": read}, indent=1))


class Group(Protocol):
    """The processes of one run preparing data together (:class:`posttrain.train.runtime.Runtime` is one)."""

    rank: int
    world: int

    def barrier(self) -> None: ...

    def any(self, flag: bool) -> bool: ...


def hash_source(source: str | Path, *, subset: str | None = None, split: str | None = None, revision: str | None = None) -> str:
    """Content hash of a file, of every file under a directory, or of what a hub dataset id is at.

    A hub dataset (:func:`posttrain.hub.is_hub_id`) is keyed by the commit its ``revision`` resolves to
    (asking the hub, or the local hub cache offline), with ``subset``, ``split`` and ``revision``: a new
    commit of the dataset is new data, without reading any of it here. A hub dataset whose commit cannot
    be known (not cached, hub out of reach) raises FileNotFoundError: it could not be read either.
    """
    h = hashlib.sha256()
    path = Path(source)
    if not path.exists():
        if not hub.is_hub_id(str(source)):
            raise FileNotFoundError(f"{source}: no such file or directory")
        commit = hub.resolved_commit(str(source), repo_type="dataset", revision=revision)
        if commit is None:
            raise FileNotFoundError(
                hub.unavailable(str(source), repo_type="dataset", revision=revision)
                or f"{source} is not in the local hub cache ({hub.cache_dir()}) and the hub did not say which commit it is at (no connection, or no such dataset or revision)"
            )
        h.update(json.dumps({"hub dataset": str(source), "commit": commit, "subset": subset, "split": split, "revision": revision}, sort_keys=True).encode())
        return h.hexdigest()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def hash_tokenizer(tokenizer: Any) -> str:
    backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer.get_vocab())
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((backend + special + type(tokenizer).__name__).encode()).hexdigest()


def cache_key(
    source: str | Path,
    tokenizer: Any,
    renderer: ChatRenderer,
    *,
    format: str | None,
    on_error: str,
    split: str | None = None,
    subset: str | None = None,
    revision: str | None = None,
    decontaminate: str | None = None,
) -> str:
    """The entry's key. ``decontaminate`` is the key of the eval items the records were checked against
    (:meth:`posttrain.data.decontaminate.EvalIndex.key`: their texts, n and the check's version), when they were."""
    parts = {
        "data": hash_source(source, subset=subset, split=split, revision=revision),
        "tokenizer": hash_tokenizer(tokenizer),
        "template": hashlib.sha256(renderer.template.encode()).hexdigest(),
        "options": [renderer.options.train_on, renderer.options.max_length, renderer.options.overlong],
        "format": format,
        "on_error": on_error,
        "split": split,
        "subset": subset,
        "revision": revision,
        "version": TRANSFORM_VERSION,
    }
    if decontaminate is not None:  # only then: keys made without it stay what they were
        parts["decontaminate"] = decontaminate
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


# Worker state for the pool (set once per process by the initializer).
_worker_renderer: ChatRenderer | None = None


def _init_worker(tokenizer: Any, options: RenderOptions) -> None:
    global _worker_renderer
    # Each worker tokenizes its own chunks on one core; the tokenizer's own threads would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_renderer = ChatRenderer(tokenizer, options)


def _work(records: list[dict]) -> Chunk:
    assert _worker_renderer is not None
    return tokenize_chunk(records, _worker_renderer)


def tokenize_chunk(records: list[dict], renderer: ChatRenderer) -> Chunk:
    """Render and tokenize ``records`` (one batch call); a preference record's two examples are kept or dropped together."""
    stats = RenderStats()
    groups = [renderer.to_texts(r) for r in records]
    flat = renderer.tokenize([r for group in groups for r in group], stats)
    kept: list[dict] = []
    at = 0
    for group in groups:
        made = flat[at : at + len(group)]
        at += len(group)
        if all(ex is not None for ex in made):
            kept.extend(made)
        else:
            partners = [ex for ex in made if ex is not None]
            stats.dropped_with_partner += len(partners)
            stats.kept -= len(partners)
            stats.tokens -= sum(len(ex["input_ids"]) for ex in partners)
            stats.trained_tokens -= sum(sum(label != IGNORE for label in ex["labels"]) for ex in partners)
    lengths = np.fromiter((len(ex["input_ids"]) for ex in kept), dtype=np.int64, count=len(kept))
    total = int(lengths.sum())
    flat_of = lambda key: np.fromiter(chain.from_iterable(ex[key] for ex in kept), dtype=np.int32, count=total)
    return Chunk(flat_of("input_ids"), flat_of("labels"), lengths, stats)


def tokenize_chunks(
    records: list[dict],
    renderer: ChatRenderer,
    *,
    num_proc: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Chunk]:
    """Render and tokenize ``records`` chunk by chunk, in order; in a pool of ``num_proc`` processes (default: the
    cores, at most 8) when there are more than ``CHUNK`` records.

    In one process, chunks of ``CHUNK`` records make big batches for the tokenizer's own threads. In the pool, each
    process renders and tokenizes whole chunks, about four per process (so they finish together) of at least
    ``MIN_POOL_CHUNK`` records, and sends back flat arrays: every step runs in parallel and little is copied.
    Below ``CHUNK`` records, starting the processes costs more than they save.
    """
    num_proc = num_proc if num_proc is not None else min(os.cpu_count() or 1, 8)
    parallel = num_proc > 1 and len(records) > CHUNK
    size = min(CHUNK, max(MIN_POOL_CHUNK, -(-len(records) // (4 * num_proc)))) if parallel else CHUNK
    chunks = [records[k : k + size] for k in range(0, len(records), size)]
    out: list[Chunk] = []
    if parallel:
        ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        with ctx.Pool(min(num_proc, len(chunks)), initializer=_init_worker, initargs=(renderer.tokenizer, renderer.options)) as pool:
            for chunk, done in zip(chunks, pool.imap(_work, chunks)):
                out.append(done)
                if progress:
                    progress(len(chunk))
    else:
        for chunk in chunks:
            out.append(tokenize_chunk(chunk, renderer))
            if progress:
                progress(len(chunk))
    return out


def tokenize_records(
    records: list[dict],
    renderer: ChatRenderer,
    *,
    num_proc: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict], RenderStats]:
    """Render and tokenize (in a pool when worth it); returns kept examples and the stats.

    A preference record gives two consecutive examples (chosen, rejected), kept or dropped together.
    """
    data = TokenizedData.from_chunks(tokenize_chunks(records, renderer, num_proc=num_proc, progress=progress))
    ids, labels = data.input_ids.tolist(), data.labels.tolist()
    bounds = data.offsets.tolist()
    examples = [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in pairwise(bounds)]
    return examples, data.stats


def prepare(
    source: str | Path,
    tokenizer: Any,
    options: RenderOptions | None = None,
    *,
    format: str | None = None,
    on_error: str = "stop",
    split: str | None = None,
    subset: str | None = None,
    revision: str | None = None,
    cache: str | Path | None = None,
    num_proc: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    report: ReadReport | None = None,
    group: Group | None = None,
    decontaminate_against: Sequence[str | Path] = (),
    decontaminate_n: int = 8,
) -> TokenizedData:
    """Read, validate, render and tokenize ``source`` for training, through the content-hashed cache.

    Only conversation and prompt/completion data trains this way. ``split``, ``subset`` and ``revision``
    choose what of a dataset is read (see :func:`posttrain.data.sources.read_dataset`), and are part of
    the key. ``progress(done, total)`` is called as chunks finish. ``report``, when given, is filled with
    what reading found (rejected records included) whenever the source is read, that is, unless the
    result comes from the cache.

    ``group`` (several processes of one run, every one of which calls this): each process reads and checks
    every record, tokenizes its contiguous share of them (one process each, no pool) and writes it aside;
    the main process joins the shares, in order, into the entry, which everyone then reads. The result is
    the same entry one process would have made. Whether the entry already exists is the main process's
    decision, which all follow, so no process waits at a barrier the others skip.

    ``decontaminate_against`` (eval files): records sharing a word ``decontaminate_n``-gram or a whole normalised
    prompt with their items are removed before tokenizing (:mod:`posttrain.data.decontaminate`), counted in the
    entry's ``read["decontaminated"]``; the eval items' texts are part of the key, so a changed eval file makes a
    new entry. The eval files are read (they are small) even when the entry exists, to know its key.
    """
    renderer = ChatRenderer(tokenizer, options)
    root = Path(cache) if cache is not None else cache_dir() / "tokenized"
    index = None
    if decontaminate_against:
        index = EvalIndex.from_files(decontaminate_against, decontaminate_n)
    key = cache_key(
        source, tokenizer, renderer, format=format, on_error=on_error, split=split, subset=subset, revision=revision,
        decontaminate=index.key() if index is not None else None,
    )  # fmt: skip
    path = root / key
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    cached = (path / "stats.json").exists()
    if world > 1:
        cached = group.any(cached and rank == 0)
    if cached:
        return _load_shared(path, rank)
    report = report if report is not None else ReadReport(str(source))
    where = {"format": format, "on_error": on_error, "split": split, "subset": subset, "revision": revision, "report": report}
    decontaminated = None
    if index is not None:
        located = [(raw.location, record) for raw, record in iter_read(source, **where)]
        decontaminated = decontaminate(located, index)
        records = [located[i][1] for i in decontaminated.kept]
        del located
    else:
        records = read_records(source, **where)
    total = len(records)
    mine = records[rank * total // world : (rank + 1) * total // world]
    chunks = tokenize_chunks(
        mine, renderer, num_proc=num_proc if world == 1 else 1, progress=(lambda n: progress(n, total)) if progress and rank == 0 else None
    )
    read = {"format": report.format, "read": report.read, "kept": report.kept, "rejected": len(report.rejected)}
    if decontaminated is not None:
        read["decontaminated"] = decontaminated.summary()
    if world > 1:
        read["tokenized_by_process"] = [(r + 1) * total // world - r * total // world for r in range(world)]  # records each tokenized
    stats = RenderStats()
    for c in chunks:
        stats.merge(c.stats)
    root.mkdir(parents=True, exist_ok=True)
    if world == 1:
        _publish(root, key, lambda tmp: write_entry(tmp, chunks, stats, read))
    else:
        parts = root / f".parts-{key}"
        mine_dir = parts / f"{rank:05d}"
        shutil.rmtree(mine_dir, ignore_errors=True)
        write_entry(mine_dir, chunks, stats, read)
        del chunks
        group.barrier()
        if rank == 0:
            _publish(root, key, lambda tmp: _join_parts(tmp, [parts / f"{r:05d}" for r in range(world)], read))
            shutil.rmtree(parts, ignore_errors=True)
        group.barrier()
    data = _load_shared(path, rank)
    data.from_cache = False
    return data


def _publish(root: Path, key: str, write: Callable[[Path], None]) -> None:
    """Write an entry into a temporary directory and rename it into place whole."""
    path = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    write(tmp)
    if path.exists():  # an entry without stats.json is incomplete (entries are renamed into place whole)
        shutil.rmtree(path, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:  # written meanwhile by another process with the same key: same content
        shutil.rmtree(tmp, ignore_errors=True)


def _join_parts(out: Path, part_dirs: list[Path], read: dict[str, Any]) -> None:
    """The processes' shares (entries written by :func:`write_entry`) joined in order into one entry at ``out``."""
    stats = RenderStats()
    parts = []
    for d in part_dirs:
        if not (d / "stats.json").exists():
            raise FileNotFoundError(
                f"{d}: another process's share of the tokenized data is not there; under torchrun the cache directory "
                "($POSTTRAIN_CACHE) must be on a filesystem every process (every node) can read and write"
            )
        part = TokenizedData.load(d)
        stats.merge(part.stats)
        parts.append(Chunk(part.input_ids, part.labels, part.lengths(), part.stats))
    write_entry(out, parts, stats, read)


def _load_shared(path: Path, rank: int) -> TokenizedData:
    if not (path / "stats.json").exists():
        raise FileNotFoundError(
            f"rank {rank}: the tokenized data the main process wrote is not in {path}; under torchrun the cache directory "
            "($POSTTRAIN_CACHE) must be on a filesystem every process (every node) can read"
        )
    data = TokenizedData.load(path)
    data.key = path.name
    return data
