"""Arena ratings from pairwise battles: Bradley–Terry strengths on the Elo scale, with bootstrap intervals.

A battle is (model a, model b, outcome) with outcome "a", "b" or "tie". Bradley–Terry: P(i beats j) =
p_i / (p_i + p_j); fitted by Hunter's (2004) minorisation–maximisation iteration on the win counts, a tie
counting half a win to each side, as Chatbot Arena's leaderboard does. Ratings are shown as Chatbot
Arena shows them: 400·log10(p_i) shifted so the mean is 1000 (a 400-point gap is 10:1 odds). Intervals:
the battles resampled with replacement, refitted, the 2.5th and 97.5th percentiles of each rating.
Our own code (a dozen lines of iteration), since the fit needs nothing a library adds.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

from posttrain.eval.judge import Judge
from posttrain.eval.pairwise import both_orders, judge_counts
from posttrain.eval.results import Metric, Results
from posttrain.verify.stats import percentile_interval

Battle = tuple[str, str, str]  # (model a, model b, "a" | "b" | "tie")
SCALE, BASE = 400.0, 1000.0


def wins_matrix(battles: Sequence[Battle], models: Sequence[str]) -> list[list[float]]:
    """``w[i][j]``: the wins of model i over model j (a tie is half a win to each)."""
    index = {m: k for k, m in enumerate(models)}
    w = [[0.0] * len(models) for _ in models]
    for a, b, outcome in battles:
        if outcome not in ("a", "b", "tie"):
            raise ValueError(f"a battle's outcome is 'a', 'b' or 'tie', not {outcome!r}")
        i, j = index[a], index[b]
        if outcome == "a":
            w[i][j] += 1
        elif outcome == "b":
            w[j][i] += 1
        else:
            w[i][j] += 0.5
            w[j][i] += 0.5
    return w


def bradley_terry(battles: Sequence[Battle], models: Sequence[str] | None = None, *, iterations: int = 1000, tol: float = 1e-10) -> dict[str, float]:
    """Each model's rating (Elo scale, mean 1000) from ``battles``.

    A model that never lost (or never won) has no finite maximum-likelihood strength; a weak prior keeps
    every rating finite: half a win in all to each model, spread evenly over its opponents (and as much
    to them against it), the same pseudo-count whatever the number of battles."""
    models = list(models) if models is not None else sorted({m for a, b, _ in battles for m in (a, b)})
    n = len(models)
    w = wins_matrix(battles, models)
    for i in range(n):
        for j in range(n):
            if i != j:
                w[i][j] += 0.5 / max(1, n - 1)
    games = [[w[i][j] + w[j][i] for j in range(n)] for i in range(n)]
    p = [1.0] * n
    for _ in range(iterations):
        new = []
        for i in range(n):
            won = sum(w[i])
            denominator = sum(games[i][j] / (p[i] + p[j]) for j in range(n) if j != i and games[i][j])
            new.append(won / denominator if denominator else p[i])
        mean_log = sum(math.log(x) for x in new) / n
        new = [x / math.exp(mean_log) for x in new]
        if max(abs(a - b) for a, b in zip(new, p)) < tol:
            p = new
            break
        p = new
    return {m: BASE + SCALE * math.log10(x) for m, x in zip(models, p)}


def ratings_with_intervals(battles: Sequence[Battle], *, resamples: int = 200, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Each model's (rating, low, high): the fit on all battles, and the percentile bootstrap interval over battles."""
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    point = bradley_terry(battles, models)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {m: [] for m in models}
    for _ in range(resamples):
        fit = bradley_terry(rng.choices(list(battles), k=len(battles)), models)
        for m in models:
            samples[m].append(fit[m])
    return {m: (point[m], *percentile_interval(samples[m], level=level)) for m in models}


def battle_outcome(preference: float | None) -> str | None:
    """A pair's preference for model a (both orders averaged) as a battle outcome; None when no order parsed."""
    if preference is None:
        return None
    return "a" if preference > 0.5 else "b" if preference < 0.5 else "tie"


def arena_results(judge: Judge, questions: Sequence[str], model_answers: dict[str, Sequence[str]], *, settings: dict[str, Any] | None = None) -> Results:
    """Every pair of models battles on every question (judged in both position orders): ratings with intervals."""
    models = list(model_answers)
    if len(models) < 2:
        raise ValueError(f"an arena needs at least two models, got {models}")
    battles: list[Battle] = []
    results = Results("arena", settings={**(settings or {}), "judge": judge.name, "models": len(models), "questions": len(questions)})
    unjudged = inconsistent = judged_both = 0
    for x, y in itertools.combinations(models, 2):
        outcomes = both_orders(judge, questions, model_answers[x], model_answers[y], what=f"judge {x} vs {y}")
        counts = judge_counts(outcomes)
        unjudged += counts["pairs without a verdict"]
        inconsistent += counts["position-inconsistent pairs"]
        judged_both += counts["pairs judged in both orders"]
        for i, o in enumerate(outcomes):
            outcome = battle_outcome(o.preference)
            if outcome is not None:
                battles.append((x, y, outcome))
            results.items.append({"id": i, "model_a": x, "model_b": y, "question": questions[i], "answer_a": model_answers[x][i],
                                  "answer_b": model_answers[y][i], "outcome": outcome, **o.to_dict()})  # fmt: skip
    if not battles:
        raise ValueError("no battle had a readable verdict in either order; see the judge's replies in items.jsonl")
    rated = ratings_with_intervals(battles)
    for m in models:
        mine = [b for b in battles if m in b[:2]]
        won = sum(0.5 if o == "tie" else float((o == "a") == (a == m)) for a, _, o in mine)
        rating, low, high = rated.get(m, (BASE, BASE, BASE))
        results.models[m] = {"rating": Metric(rating, low, high, len(mine)), "win share": Metric(100 * won / len(mine) if mine else math.nan, n=len(mine))}
    results.models = dict(sorted(results.models.items(), key=lambda kv: -kv[1]["rating"].value))
    results.notes.append(
        f"{len(battles)} battles from {len(questions)} questions × {len(models) * (len(models) - 1) // 2} model pairs; "
        f"{unjudged} pairs had no readable verdict in either order and are left out; {inconsistent} of {judged_both} pairs "
        "judged in both orders got different verdicts by position."
    )
    results.notes.append(
        "Rating: Bradley-Terry strength on the Elo scale (mean 1000; 400 points = 10:1 odds), a tie half a win each; a pair's "
        "outcome is the judge's verdict averaged over both position orders. Intervals: battles resampled, refitted (200 times). "
        "Win share: the share of a model's battles it won (ties half)."
    )
    return results
