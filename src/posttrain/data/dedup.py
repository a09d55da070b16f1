"""Deduplication: exact duplicates, and near duplicates through MinHash LSH (``datasketch``).

The text compared, per canonical record (:func:`posttrain.data.quality.segments`): with ``fields``
``("prompt", "response")`` (the default) the user turns (an Alpaca record's instruction and input, a text
prompt, IFEval's prompt) followed by the assistant turns (the response; a completion; a pair's chosen then
rejected); ``("prompt",)`` or ``("response",)`` takes one side only. System prompts and tool results are
left out: a system prompt shared by a whole data set would make every record look alike. Each piece is
normalised by :func:`posttrain.data.quality.words` (lower-case, punctuation deleted, whitespace collapsed).

- **Exact duplicates**: the same normalised pieces, in order.
- **Near duplicates**: Jaccard similarity of the records' sets of word ``shingle``-grams (5 words by
  default, as in Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better"; a record of
  fewer words is one shingle, its whole text) at or above ``threshold`` (0.8 by default, as there).
  MinHash signatures (``num_perm`` permutations) go into a ``MinHashLSH`` index, which proposes candidate
  pairs. LSH is approximate both ways, so: every candidate pair is confirmed with the *actual* Jaccard
  similarity of the two shingle sets before anything is dropped, so nothing is dropped below the threshold;
  and the index's ``b`` bands of ``r`` rows (:func:`lsh_params`) are chosen so that a pair exactly at the
  threshold is proposed with probability at least ``recall`` (0.99; ``1 - (1 - s^r)^b`` for a pair of
  similarity ``s``, higher above the threshold), since a spurious candidate costs only the exact check. A
  pair above the threshold can still be missed, rarely; datasketch's own choice of bands (which weighs
  misses and spurious candidates equally) misses 60% of the pairs at 0.8 with 128 permutations.

Clusters: records are taken in file order; a record is dropped into the cluster of the first kept record
(the earliest in the file) that it duplicates: the same normalised text, or else the kept record proposed by
LSH with the highest confirmed similarity. Only kept records enter the index, so a cluster is a star around
its kept record, every member at or above the threshold *to the kept record itself* (no chains of
A~B~C where A and C differ). Our own code around datasketch's MinHash and MinHashLSH.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.data.quality import location_fields, segments, words
from posttrain.records import Location, Record

FIELDS = ("prompt", "response")
ROLES_OF = {"prompt": ("user",), "response": ("assistant",)}


def record_words(record: Record, fields: Sequence[str] = FIELDS) -> list[list[str]]:
    """The normalised words of each compared piece of ``record``: user pieces first, then assistant pieces (see the module docstring)."""
    pieces = segments(record)
    return [words(s.text) for f in fields for s in pieces if s.role in ROLES_OF[f]]


def shingles(tokens: Sequence[str], k: int) -> set[str]:
    """The set of ``k``-word shingles of ``tokens`` (as space-joined text); the whole text when it has fewer than ``k`` words."""
    if len(tokens) < k:
        return {" ".join(tokens)} if tokens else set()
    return set(map(" ".join, zip(*(tokens[i:] for i in range(k)))))


def lsh_params(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """``(b, r)``: the most rows per band (the fewest spurious candidates) with which a pair of similarity
    ``threshold`` is still proposed with probability at least ``recall``, in ``num_perm // r`` bands."""
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1 - (1 - threshold**r) ** b >= recall:
            return b, r
    return num_perm, 1


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class Member:
    """A dropped record: its index, how it matched its cluster's kept record (``exact`` or ``near``), and their
    Jaccard similarity (exact, over shingle sets) with MinHash's estimate of it."""

    index: int
    match: str
    jaccard: float
    estimate: float | None  # None for an exact duplicate: its text is an earlier record's


@dataclass
class Cluster:
    kept: int
    dropped: list[Member] = field(default_factory=list)

    @property
    def size(self) -> int:
        return 1 + len(self.dropped)

    def to_dict(self, locations: Sequence[Location]) -> dict[str, Any]:
        """A report line: the size, the kept record's place, each dropped record's place with its match and
        similarity to the kept one, and the lowest of those similarities (``similarity``)."""
        dropped = [
            {**location_fields(locations[m.index]), "match": m.match, "jaccard": round(m.jaccard, 4), **({"minhash_estimate": round(m.estimate, 4)} if m.estimate is not None else {})}
            for m in self.dropped
        ]
        return {"size": self.size, "kept": location_fields(locations[self.kept]), "dropped": dropped, "similarity": round(min(m.jaccard for m in self.dropped), 4)}


@dataclass
class DedupResult:
    """What deduplication found: per record whether it is kept, the clusters of more than one record, counts."""

    records: int
    kept: list[int]
    clusters: list[Cluster]
    exact: int
    near: int
    threshold: float
    lsh_bands: tuple[int, int]  # (b, r): b bands of r rows each
    without_text: int = 0  # records with no compared text (say, --field response on prompts): kept, never anyone's duplicate

    def counts(self) -> dict[str, Any]:
        return {"records": self.records, "exact_duplicates": self.exact, "near_duplicates": self.near, "kept": len(self.kept)}


def dedup(
    records: Sequence[Record],
    *,
    fields: Sequence[str] = FIELDS,
    threshold: float = 0.8,
    shingle: int = 5,
    num_perm: int = 128,
    seed: int = 1,
    recall: float = 0.99,
    progress: Callable[[int], None] | None = None,
    every: int = 1024,
) -> DedupResult:
    """Exact and near duplicates among ``records`` (see the module docstring); the first of each cluster is kept.

    ``progress(n)`` is called every ``every`` records. Deterministic: MinHash's permutations come from
    ``seed``, and shingles are hashed with ``zlib.crc32`` (datasketch premixes each hash with MurmurHash3's
    finalizer before permuting it; its default, SHA-1 in Python, took two thirds of the time).
    """
    from datasketch import MinHash, MinHashLSH

    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], not {threshold}")
    if shingle < 1:
        raise ValueError(f"shingle must be at least 1 word, not {shingle}")
    unknown = [f for f in fields if f not in ROLES_OF]
    if unknown or not fields:
        raise ValueError(f"fields must be some of {', '.join(FIELDS)}, not {list(fields)}")
    bands = lsh_params(threshold, num_perm, recall)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=bands)
    texts: dict[int, str] = {}  # kept records' words, space-joined (a string holds them in a fraction of a list's memory)
    signatures: dict[int, Any] = {}
    first_of: dict[tuple[str, ...], int] = {}  # normalised text -> the kept record of its cluster
    cluster_of: dict[int, Cluster] = {}
    kept: list[int] = []
    exact = near = without_text = 0
    template = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32, scheme="affine32")  # the permutations, made once and shared
    for i, record in enumerate(records):
        pieces = record_words(record, fields)
        key = tuple(" ".join(p) for p in pieces)
        tokens = [w for p in pieces for w in p]
        own = shingles(tokens, shingle)
        if not tokens:  # nothing to compare: not a duplicate of anything (nor of another empty record)
            kept.append(i)
            without_text += 1
        elif key in first_of:
            rep = first_of[key]
            member = Member(i, "exact", jaccard(own, shingles(texts[rep].split(), shingle)), None)
            cluster_of.setdefault(rep, Cluster(rep)).dropped.append(member)
            exact += 1
        else:
            m = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32, permutations=template.permutations, scheme="affine32")
            m.update_batch([s.encode("utf-8") for s in own])
            best: tuple[float, int] | None = None
            for j in lsh.query(m):
                sim = jaccard(own, shingles(texts[j].split(), shingle))
                if sim >= threshold and (best is None or (sim, -j) > (best[0], -best[1])):
                    best = (sim, j)
            if best is not None:
                sim, rep = best
                cluster_of.setdefault(rep, Cluster(rep)).dropped.append(Member(i, "near", sim, m.jaccard(signatures[rep])))
                first_of[key] = rep
                near += 1
            else:
                kept.append(i)
                first_of[key] = i
                texts[i] = " ".join(tokens)
                signatures[i] = m
                lsh.insert(i, m)
        if progress is not None and (i + 1) % every == 0:
            progress(every)
    if progress is not None and len(records) % every:
        progress(len(records) % every)
    clusters = sorted(cluster_of.values(), key=lambda c: c.kept)
    return DedupResult(len(records), kept, clusters, exact, near, threshold, bands, without_text)
