"""ROUGE-L at pool scale: is a new instruction too similar to any of thousands already kept?

Self-Instruct (Wang et al., 2023) and Alpaca drop a generated instruction when its ROUGE-L F-measure
against any instruction in the pool exceeds 0.7, computed with Google's ``rouge_score``
(``RougeScorer(["rougeL"], use_stemmer=False)``) over a process pool, one candidate at a time against
every pool item. This is our own implementation, because the filter is the product's core loop and
``rouge_score`` spends most of its time in a pure-Python dynamic-programming table per pair; the verdicts
and the scores are ``rouge_score``'s, bit for bit (``tests/test_rouge.py`` on over 10,000 pairs):

* **tokenised once**, as ``rouge_score.tokenize.tokenize`` does without a stemmer: lower-case, every run
  of characters other than ``a-z0-9`` a separator (so non-ASCII text has no tokens); tokens become
  integer ids, and each pool item keeps its length and token counts;
* **pruned by bounds that cannot be wrong**: the LCS of two token sequences is at most their bag overlap
  (the sum over tokens of the smaller count), so F ≤ 2·overlap / (m + n). An inverted index gives every
  pool item's overlap with the candidate in one pass over the candidate's tokens' postings, and only
  items whose bound exceeds the threshold have their LCS computed;
* **a bit-parallel LCS** (Allison and Dix, 1986; Hyyrö's formulation) on Python integers: one addition,
  an AND, an OR and a subtraction per token of the pool item, whatever the candidate's length up to
  thousands of tokens;
* the F-measure computed with ``rouge_score``'s own arithmetic (precision, recall, then ``2pr/(p+r)``),
  so a score that sits exactly on the threshold falls on the same side.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_SEPARATORS = re.compile(r"[^a-z0-9]+")
THRESHOLD = 0.7  # Self-Instruct and Alpaca: drop when ROUGE-L F > 0.7


def tokenize(text: str) -> list[str]:
    """``rouge_score.tokenize.tokenize(text, None)``: lower-cased runs of ``a-z0-9``."""
    return [token for token in _SEPARATORS.split(text.lower()) if token]


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token-id sequences (bit-parallel)."""
    if len(a) < len(b):
        a, b = b, a  # the longer one goes in the bit vector
    if not b:
        return 0
    masks: dict[int, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    return _lcs_with_masks(masks, len(a), b)


def _lcs_with_masks(masks: dict[int, int], m: int, b: Iterable[int]) -> int:
    full = (1 << m) - 1
    s = full
    for token in b:
        u = s & masks.get(token, 0)
        if u:
            s = ((s + u) | (s - u)) & full
    return m - s.bit_count()


def f_measure(lcs: int, target_len: int, prediction_len: int) -> float:
    """ROUGE-L F as ``rouge_score`` computes it (``_score_lcs`` then ``scoring.fmeasure``)."""
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l(target: str, prediction: str) -> float:
    """``RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure``."""
    vocab: dict[str, int] = {}
    a = [vocab.setdefault(t, len(vocab)) for t in tokenize(target)]
    b = [vocab.setdefault(t, len(vocab)) for t in tokenize(prediction)]
    return f_measure(lcs_length(a, b), len(a), len(b))


@dataclass(frozen=True)
class Match:
    """The most similar pool item found above the threshold (``index`` into the pool), and its score."""

    index: int
    score: float


class RougePool:
    """A growing pool of texts; :meth:`most_similar` finds a pool item whose ROUGE-L F with a text exceeds a threshold.

    The candidate plays ``rouge_score``'s *prediction* and the pool item its *target*, as Self-Instruct
    calls it (``scorer.score(pool_item, candidate)``); ROUGE-L's F is symmetric in any case.
    """

    def __init__(self, texts: Iterable[str] = ()):
        self.vocab: dict[str, int] = {}
        self.sequences: list[list[int]] = []
        self.postings: dict[int, list[tuple[int, int]]] = {}  # token -> (item, count in item)
        self.compared = 0  # LCS computations made (the rest were pruned)
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self.sequences)

    def ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(token, len(self.vocab)) for token in tokenize(text)]

    def add(self, text: str) -> int:
        sequence = self.ids(text)
        index = len(self.sequences)
        self.sequences.append(sequence)
        for token, count in Counter(sequence).items():
            self.postings.setdefault(token, []).append((index, count))
        return index

    def scores_above(self, text: str, threshold: float = THRESHOLD) -> list[Match]:
        """Every pool item whose F with ``text`` exceeds ``threshold``, in pool order."""
        candidate = self.ids(text)
        n = len(candidate)
        if not n:
            return []
        overlap: dict[int, int] = {}
        for token, count in Counter(candidate).items():
            for item, item_count in self.postings.get(token, ()):
                overlap[item] = overlap.get(item, 0) + min(count, item_count)
        masks: dict[int, int] = {}
        for i, token in enumerate(candidate):
            masks[token] = masks.get(token, 0) | (1 << i)
        found = []
        for item in sorted(overlap):
            m = len(self.sequences[item])
            if f_measure(overlap[item], m, n) <= threshold:  # the LCS is at most the overlap, and F grows with it
                continue
            self.compared += 1
            score = f_measure(_lcs_with_masks(masks, n, self.sequences[item]), m, n)
            if score > threshold:
                found.append(Match(item, score))
        return found

    def most_similar(self, text: str, threshold: float = THRESHOLD) -> Match | None:
        """The pool item with the highest F above ``threshold`` (the first of equals), or None."""
        found = self.scores_above(text, threshold)
        return max(found, key=lambda match: (match.score, -match.index)) if found else None
