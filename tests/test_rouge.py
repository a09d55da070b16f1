"""Our ROUGE-L gives ``rouge_score``'s scores bit for bit, and the pool filter its verdicts, on real instructions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from posttrain.synth import rouge

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data beside the repository")


def seed_instructions() -> list[str]:
    rows = [json.loads(line) for line in (SHARED / "self_instruct_seed_tasks.jsonl").read_text().splitlines()]
    return [row["instruction"] for row in rows]


def variants(text: str, rng: random.Random) -> list[str]:
    """Edited copies that sit around the 0.7 threshold: words dropped, swapped, repeated, re-cased, punctuated."""
    words = text.split()
    out = []
    for _ in range(6):
        w = list(words)
        for _ in range(rng.randint(1, max(1, len(w) // 4))):
            op, i = rng.random(), rng.randrange(len(w))
            if op < 0.3 and len(w) > 1:
                del w[i]
            elif op < 0.55:
                w.insert(i, rng.choice(words).upper())
            elif op < 0.8:
                j = rng.randrange(len(w))
                w[i], w[j] = w[j], w[i]
            else:
                w[i] = w[i] + rng.choice([",", "!", "'s", "-x", " é"])
        out.append(" ".join(w))
    return out


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    rng = random.Random(0)
    seeds = seed_instructions()
    out = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1 : i + 60]]  # seed against seed
    out += [(s, v) for s in seeds for v in variants(s, rng)]  # seed against its near-copies
    users = [json.loads(line)["instruction"] for line in (SHARED / "self_instruct_user_oriented_instructions.jsonl").read_text().splitlines()]
    out += [(u, v) for u in users for v in variants(u, rng)]  # the user-oriented instructions and theirs
    out += [("", "abc"), ("Ünïcödé only", "unicode only"), ("a a a a", "a")]
    return out


def test_scores_equal_rouge_score_bit_for_bit(pairs):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    near = 0
    for target, prediction in pairs:
        expected = scorer.score(target, prediction)["rougeL"].fmeasure
        assert rouge.rouge_l(target, prediction) == expected, (target, prediction)
        near += 0.6 < expected <= 0.8
    assert len(pairs) >= 10_000 and near >= 300  # the comparison covers the neighbourhood of the threshold
    print(f"{len(pairs)} pairs equal, {near} of them with F in (0.6, 0.8]")


def test_the_pool_finds_exactly_what_brute_force_finds():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(1)
    seeds = seed_instructions()
    pool_texts = seeds[:120] + [v for s in seeds[:40] for v in variants(s, rng)[:2]]
    pool = rouge.RougePool(pool_texts)
    for candidate in [v for s in seeds[30:80] for v in variants(s, rng)[:2]] + seeds[100:140]:
        expected = [i for i, t in enumerate(pool_texts) if scorer.score(t, candidate)["rougeL"].fmeasure > 0.7]
        assert [m.index for m in pool.scores_above(candidate)] == expected
    assert pool.compared < 0.2 * 140 * len(pool_texts)  # most pairs never needed an LCS


def test_bit_parallel_lcs_equals_the_table():
    rng = random.Random(2)
    for _ in range(500):
        a = [rng.randrange(6) for _ in range(rng.randrange(0, 90))]
        b = [rng.randrange(6) for _ in range(rng.randrange(0, 90))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
        assert rouge.lcs_length(a, b) == table[-1][-1]
