"""Pairwise judgements in both position orders: how win rates and arena battles turn verdicts into preferences.

Judges favour a position (often the first answer shown), so each pair is judged twice, X as A then Y as A,
as FastChat's pairwise mode and AlpacaEval do. Each parsable order gives X a preference of 1 (X chosen),
0.5 (a tie) or 0 (Y chosen), or, read from the judge's probabilities, the probability that X is the better;
the pair's preference is the mean over the parsable orders. The orders are inconsistent when they fall on
different sides of 0.5. A pair with no
parsable order has none: it is counted, never guessed. How often the two orders disagree is the judge's
position inconsistency, reported beside the figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.eval.judge import Judge, Judgement


@dataclass(frozen=True)
class PairOutcome:
    preference: float | None  # X over Y: 1, 0.75, 0.5, 0.25, 0 or None (no parsable order)
    first: Judgement  # X shown as A
    second: Judgement  # Y shown as A

    @property
    def consistent(self) -> bool | None:
        """Whether both orders gave the same verdict about X (None unless both parsed)."""
        a, b = _x_score(self.first, x_is_a=True), _x_score(self.second, x_is_a=False)
        return None if a is None or b is None else (a > 0.5) == (b > 0.5) and (a < 0.5) == (b < 0.5)

    def to_dict(self) -> dict[str, Any]:
        return {"preference": self.preference, "x_as_a": self.first.to_dict(), "y_as_a": self.second.to_dict()}


def _x_score(judgement: Judgement, *, x_is_a: bool) -> float | None:
    value = judgement.verdict.value
    if value is None:
        return None
    if isinstance(value, float):  # a soft verdict: the probability that A is better (--judge-mode probs)
        return value if x_is_a else 1.0 - value
    if value == "tie":
        return 0.5
    return 1.0 if (value == "A") == x_is_a else 0.0


def both_orders(judge: Judge, questions: Sequence[str], answers_x: Sequence[str], answers_y: Sequence[str], *, what: str) -> list[PairOutcome]:
    """Each (question, X's answer, Y's answer) judged with X first and with Y first."""
    n = len(questions)
    judgements = judge.compare(list(questions) * 2, list(answers_x) + list(answers_y), list(answers_y) + list(answers_x), what=what)
    out = []
    for first, second in zip(judgements[:n], judgements[n:]):
        scores = [s for s in (_x_score(first, x_is_a=True), _x_score(second, x_is_a=False)) if s is not None]
        out.append(PairOutcome(sum(scores) / len(scores) if scores else None, first, second))
    return out


def judge_counts(outcomes: Sequence[PairOutcome]) -> dict[str, int]:
    """Orders judged, orders unparsable, pairs with no verdict, pairs whose two orders disagree (of those with both)."""
    both = [o.consistent for o in outcomes if o.consistent is not None]
    return {
        "orders": 2 * len(outcomes),
        "unparsable orders": sum((not o.first.ok) + (not o.second.ok) for o in outcomes),
        "pairs without a verdict": sum(o.preference is None for o in outcomes),
        "pairs judged in both orders": len(both),
        "position-inconsistent pairs": sum(not c for c in both),
    }


def answers(teacher: Any, prompts: Sequence[Any], *, max_new_tokens: int, what: str, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """One answer per prompt (text or chat messages) from a :class:`~posttrain.synth.teacher.Teacher`, greedy by default, cached."""
    return [reply[0].text for reply in teacher.ask(list(prompts), what=what, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)]
