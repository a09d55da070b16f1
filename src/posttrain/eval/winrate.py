"""Win rates against a reference, raw and length-controlled (AlpacaEval 2.0, Dubois et al., 2024, arXiv 2404.04475).

Judges prefer longer answers whatever their quality. AlpacaEval 2's length control fits a GLM to the
judge's preferences and asks what they would be with no length difference:

    logit P(model preferred on x) = θ + φ·tanh(Δlen_x / σ) + ψ·γ_x

Δlen_x is the model's answer length minus the reference's (characters), σ its standard deviation over the
items, γ_x the instruction's difficulty. The length-controlled win rate is the mean over items of
sigmoid(θ + ψ·γ_x): the fitted preference with the length term at zero. AlpacaEval estimates γ_x from its
whole leaderboard; here it is estimated from the models of the same run (the logit of how often the
reference wins x, smoothed), and left out (ψ = 0) when the run has one model.

The GLM is fitted with scikit-learn's ``LogisticRegression``, as AlpacaEval fits it: a preference p in
[0, 1] (both position orders averaged, see :mod:`posttrain.eval.pairwise`) is two weighted rows, "won"
with weight p and "lost" with weight 1 - p; a weak L2 penalty (C = 10) keeps the fit finite when one side
wins every item. Intervals: items resampled with replacement and the GLM refitted (percentile bootstrap).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from posttrain.eval.judge import Judge
from posttrain.eval.pairwise import PairOutcome, both_orders, judge_counts
from posttrain.eval.results import Metric, Results, mean_metric
from posttrain.verify.stats import percentile_interval

LC_C = 10.0  # inverse L2 strength: weak, only so that a clean sweep has a finite fit


@dataclass(frozen=True)
class LCFit:
    intercept: float  # θ
    length: float  # φ, on tanh(Δlen / σ)
    difficulty: float  # ψ, on γ (0 when no difficulty was given)
    sigma: float  # σ, the standard deviation of Δlen
    win_rate: float  # the length-controlled win rate, percent


def design(delta_len: np.ndarray, sigma: float, difficulty: np.ndarray) -> np.ndarray:
    """The GLM's features per item: tanh(Δlen / σ) and γ."""
    return np.column_stack([np.tanh(delta_len / sigma), difficulty])


def fit_length_controlled(preferences: Sequence[float], delta_len: Sequence[float], difficulty: Sequence[float] | None = None) -> LCFit:
    """Fit the GLM to the preferences (model over reference, in [0, 1]) and predict with the length term at zero."""
    from sklearn.linear_model import LogisticRegression

    p = np.asarray(preferences, dtype=float)
    delta = np.asarray(delta_len, dtype=float)
    gamma = np.zeros_like(p) if difficulty is None else np.asarray(difficulty, dtype=float)
    if not len(p):
        return LCFit(math.nan, math.nan, math.nan, math.nan, math.nan)
    sigma = float(delta.std()) or 1.0
    x = design(delta, sigma, gamma)
    rows = np.vstack([x, x])
    labels = np.concatenate([np.ones(len(p)), np.zeros(len(p))])
    weights = np.concatenate([p, 1 - p])
    with warnings.catch_warnings():  # a clean sweep converges slowly toward an infinite intercept; the penalty bounds the rest
        warnings.simplefilter("ignore")
        glm = LogisticRegression(C=LC_C, max_iter=5000).fit(rows, labels, sample_weight=weights)
    theta, (phi, psi) = float(glm.intercept_[0]), (float(c) for c in glm.coef_[0])
    win_rate = 100.0 * float(np.mean(1.0 / (1.0 + np.exp(-(theta + psi * gamma)))))
    return LCFit(theta, phi, psi, sigma, win_rate)


def lc_interval(preferences: Sequence[float], delta_len: Sequence[float], difficulty: Sequence[float] | None = None, *, resamples: int = 200, seed: int = 0) -> tuple[float, float]:
    """The percentile-bootstrap 95% interval of the length-controlled win rate (items resampled, the GLM refitted)."""
    n = len(preferences)
    if n < 2:
        return math.nan, math.nan
    rng = random.Random(seed)
    rates = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        gamma = None if difficulty is None else [difficulty[i] for i in idx]
        rates.append(fit_length_controlled([preferences[i] for i in idx], [delta_len[i] for i in idx], gamma).win_rate)
    return percentile_interval(rates)


def instruction_difficulty(preferences_by_model: Sequence[Sequence[float | None]]) -> list[float]:
    """γ per item: the logit of the share of models the reference beats on it, with half a win and half a loss added."""
    out = []
    for column in zip(*preferences_by_model):
        seen = [p for p in column if p is not None]
        share = (sum(1 - p for p in seen) + 0.5) / (len(seen) + 1)
        out.append(math.log(share / (1 - share)))
    return out


def winrate_results(
    judge: Judge,
    questions: Sequence[str],
    model_answers: dict[str, Sequence[str]],
    reference_answers: Sequence[str],
    *,
    reference: str,
    settings: dict[str, Any] | None = None,
) -> Results:
    """Each model against the reference on every question: raw and length-controlled win rates with intervals."""
    outcomes: dict[str, list[PairOutcome]] = {
        m: both_orders(judge, questions, answers, reference_answers, what=f"judge {m} vs {reference}") for m, answers in model_answers.items()
    }
    prefs = {m: [o.preference for o in os] for m, os in outcomes.items()}
    gamma_all = instruction_difficulty(list(prefs.values())) if len(prefs) > 1 else None
    results = Results("winrate", settings={**(settings or {}), "judge": judge.name, "reference": reference, "glm": {}})
    ref_len = [len(a) for a in reference_answers]
    for m, answers in model_answers.items():
        keep = [i for i, p in enumerate(prefs[m]) if p is not None]
        p = [prefs[m][i] for i in keep]
        delta = [len(answers[i]) - ref_len[i] for i in keep]
        gamma = None if gamma_all is None else [gamma_all[i] for i in keep]
        fit = fit_length_controlled(p, delta, gamma)
        low, high = lc_interval(p, delta, gamma)
        counts = judge_counts(outcomes[m])
        results.models[m] = {
            "win rate": mean_metric(p, scale=100.0),
            "LC win rate": Metric(fit.win_rate, low, high, len(p)),
            "mean length (chars)": Metric(float(np.mean([len(a) for a in answers])) if answers else math.nan, n=len(answers)),
            "unparsable orders": Metric(counts["unparsable orders"], n=counts["orders"], count=True),
            "position-inconsistent pairs": Metric(counts["position-inconsistent pairs"], n=counts["pairs judged in both orders"], count=True),
        }
        results.settings["glm"][m] = asdict(fit)
        if counts["pairs without a verdict"]:
            results.notes.append(f"{m}: {counts['pairs without a verdict']} of {len(answers)} items had no parsable verdict in either order and are left out.")
        for i, (q, a, o) in enumerate(zip(questions, answers, outcomes[m])):
            results.items.append({"model": m, "id": i, "question": q, "answer": a, "reference_answer": reference_answers[i], **o.to_dict()})
    results.notes.append(
        f"Win rate: the share of items on which the judge prefers the model's answer to {reference}'s (a tie counts half; each item judged in both "
        "position orders and averaged). LC win rate: AlpacaEval 2's length-controlled win rate, the judge's preference predicted by a GLM at equal "
        "length" + (", with instruction difficulty estimated from this run's models." if gamma_all is not None else "; one model, so no difficulty term.")
    )
    return results
