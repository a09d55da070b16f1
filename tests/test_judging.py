"""Judge verdicts parsed or refused (never guessed), Bradley–Terry ratings, FollowBench's HSR/SSR/CSL by hand."""

from __future__ import annotations

import math
import random

import pytest

from posttrain.eval.arena import bradley_terry, ratings_with_intervals, wins_matrix
from posttrain.eval.followbench import csl, hsr, mean_csl, ssr
from posttrain.eval.judging import parse_choice, parse_rating

LONG = (
    "The assistant's answer is accurate and addresses both parts of the question. It explains the "
    "difference between a list and a tuple in Python [1] and gives an example, though the example has a "
    "small error. Overall it is helpful.\n\nRating: [[7]]"
)


@pytest.mark.parametrize(
    "text, rating",
    [
        (LONG, 7.0),  # a citation-like [1] in the text does not count against a [[7]]
        ("Rating: [[8.5]]", 8.5),
        ("I would rate this response [6].", 6.0),
        ("[[6]] is my rating. Again: [[6]]", 6.0),
        ("Rating: [[ 9 ]]", 9.0),
    ],
)
def test_ratings_that_give_one_value_are_read(text, rating):
    verdict = parse_rating(text)
    assert verdict.ok and verdict.value == rating


@pytest.mark.parametrize(
    "text, reason",
    [
        ("At first I would give [[6]], but on reflection [[8]].", "different ratings"),
        ("The response is fine. I would rate it a 7 out of 10.", "no rating"),
        ("Rating: [[0]]", "outside"),
        ("Rating: [[11]]", "outside"),
        ("Scores: [3] for helpfulness and [8] for accuracy.", "different ratings"),
        ("", "no rating"),
    ],
)
def test_ratings_that_do_not_give_one_value_are_refused_with_a_reason(text, reason):
    verdict = parse_rating(text)
    assert not verdict.ok and verdict.value is None and reason in verdict.reason


def test_pairwise_choices():
    assert parse_choice("Assistant A is more detailed. [[A]]").value == "A"
    assert parse_choice("Final verdict: [[B]]").value == "B"
    assert parse_choice("They are equally good. [[C]]").value == "tie"
    assert parse_choice("[[A]] ... actually [[B]]").value is None
    assert parse_choice("Assistant A is better.").value is None


def _battles(strengths: dict[str, float], n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    models = sorted(strengths)
    out = []
    for _ in range(n):
        a, b = rng.sample(models, 2)
        p_a = 1 / (1 + 10 ** ((strengths[b] - strengths[a]) / 400))
        out.append((a, b, "a" if rng.random() < p_a else "b"))
    return out


def test_bradley_terry_recovers_planted_strengths_and_is_the_likelihood_maximum():
    truth = {"small": 1000.0, "medium": 1150.0, "large": 1350.0}
    battles = _battles(truth, 6000)
    fit = bradley_terry(battles)
    for a, true_a in truth.items():
        for b, true_b in truth.items():
            assert abs((fit[a] - fit[b]) - (true_a - true_b)) < 35, (a, b, fit)
    assert abs(sum(fit.values()) / 3 - 1000) < 1e-6
    # the maximum-likelihood condition, with the fit's weak prior (half a win spread over the 2 opponents)
    models = sorted(truth)
    w = wins_matrix(battles, models)
    for i in range(3):
        for j in range(3):
            if i != j:
                w[i][j] += 0.25
    p = [10 ** ((fit[m] - 1000) / 400) for m in models]
    for i in range(3):
        expected = sum((w[i][j] + w[j][i]) * p[i] / (p[i] + p[j]) for j in range(3) if j != i)
        assert sum(w[i]) == pytest.approx(expected, rel=1e-6)


def test_intervals_hold_the_rating_and_an_unbeaten_model_stays_finite():
    battles = _battles({"a": 1000.0, "b": 1200.0}, 200, seed=1) + [("c", "a", "a")] * 5 + [("c", "b", "a")] * 5
    out = ratings_with_intervals(battles, resamples=100)
    for rating, low, high in out.values():
        assert low <= rating <= high and math.isfinite(rating)
    assert out["c"][0] > out["b"][0] > out["a"][0]
    assert ratings_with_intervals(battles, resamples=100) == out  # seeded
    with pytest.raises(ValueError, match="outcome"):
        wins_matrix([("a", "b", "draw")], ["a", "b"])


def test_followbench_metrics_match_a_hand_computation():
    groups = [
        {1: [True], 2: [True, True], 3: [True, False, True]},  # levels 1-2 whole: CSL 2
        {1: [False], 2: [True, True], 3: [True, True, True]},  # level 1 missed: CSL 0
        {1: [True], 2: [True, False], 3: [True, True, True]},  # CSL 1
    ]
    assert [csl(g) for g in groups] == [2, 0, 1] and mean_csl(groups) == 1.0
    assert hsr(groups, 1) == pytest.approx(2 / 3) and hsr(groups, 2) == pytest.approx(2 / 3) and hsr(groups, 3) == pytest.approx(2 / 3)
    assert ssr(groups, 1) == pytest.approx(2 / 3) and ssr(groups, 2) == pytest.approx(5 / 6) and ssr(groups, 3) == pytest.approx(8 / 9)
