"""Reading an LLM judge's verdict: a 1-10 rating (MT-Bench single-answer grading) or a pairwise choice.

MT-Bench's judge prompts (FastChat's ``llm_judge``) ask for ``"[[rating]]"`` and ``"[[A]]"``/``"[[B]]"``/
``"[[C]]"``; FastChat takes the first ``[[x]]`` it finds, then falls back to a single-bracket ``[x]``.
Judges, small ones especially, do not always comply: they write no verdict, or two different ones ("I
would give [[6]] ... on reflection [[8]]"). Here a verdict is taken only when the text gives one value:
every double-bracket match agreeing (else the single-bracket ones, all agreeing), and a rating within
1-10. Anything else is a :class:`Verdict` with ``value None`` and the reason, counted as unparsable by the
caller and never guessed. Our own few lines: the rules are the product's (what counts as a judgement).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DOUBLE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_SINGLE = re.compile(r"(?<!\[)\[\s*(\d+(?:\.\d+)?)\s*\](?!\])")
_CHOICE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
LOW, HIGH = 1.0, 10.0


@dataclass(frozen=True)
class Verdict:
    """A judge's verdict: ``value`` (a rating, or "A"/"B"/"tie"), or None with ``reason``."""

    value: float | str | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.value is not None


def parse_rating(text: str) -> Verdict:
    """The 1-10 rating in a single-answer judgement: ``[[x]]``, else ``[x]``; one value only."""
    for pattern, form in ((_DOUBLE, "[[x]]"), (_SINGLE, "[x]")):
        found = [float(m) for m in pattern.findall(text)]
        if not found:
            continue
        if len(set(found)) > 1:
            return Verdict(None, f"{len(set(found))} different ratings in {form} form: {sorted(set(found))}")
        rating = found[0]
        if not LOW <= rating <= HIGH:
            return Verdict(None, f"rating {rating:g} is outside {LOW:g}-{HIGH:g}")
        return Verdict(rating)
    return Verdict(None, "no rating in [[x]] or [x] form")


def parse_choice(text: str) -> Verdict:
    """The pairwise verdict: ``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie); one distinct choice only."""
    found = set(_CHOICE.findall(text))
    if not found:
        return Verdict(None, "no [[A]], [[B]] or [[C]]")
    if len(found) > 1:
        return Verdict(None, f"several verdicts: {sorted(found)}")
    choice = found.pop()
    return Verdict("tie" if choice == "C" else choice)
