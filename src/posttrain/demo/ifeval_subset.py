"""IFEval's prompts as the demo uses them: a fixed fast subset, and the prompts never used for any choice.

IFEval's ``input_data.jsonl`` (all 541 prompts) ships as ``data/ifeval_input_data.jsonl``, byte for byte
(see ``IFEVAL_NOTICE.md``), so the package needs nothing from outside to score it.

- :func:`ifeval_subset`: the demo's fast subset, the first :data:`IFEVAL_SUBSET_SIZE` prompts that
  :func:`fits_short_response` (a ~256-token response can satisfy them; :func:`select_ifeval_subset` is the
  rule). Presets were tuned while these were scored, so they are development prompts, not a test.
- :func:`ifeval_all`: all 541 (``posttrain demo --full-ifeval``); :func:`ifeval_unused`: the 421 outside the
  subset, which no choice of preset or hyperparameter ever saw: the demo's held-out IFEval figure.

The demo's training, development and test prompts are built by :mod:`posttrain.synth.verifiable`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cache
from importlib.resources import files
from typing import Any

IFEVAL_SUBSET_SIZE = 120

# Text that asks for a long answer without an instruction saying so: essays, "long" letters, 151+ words.
_LONG_REQUEST = re.compile(
    r"\b(essays?|very long|long (?:and \w+ )?(?:email|letter|story|article|essay)s?)\b|\b(\d{3,})\+?[ -]?words?\b", re.IGNORECASE
)
IFEVAL_MAX_PROMPT_CHARS = 600


def fits_short_response(record: dict[str, Any]) -> bool:
    """Whether an IFEval prompt can be followed in a ~256-token response (the rule ``IFEVAL_NOTICE.md`` states).

    Out: prompts with ``combination:two_responses``, ``length_constraints:nth_paragraph_first_word``,
    a non-English ``language:response_language``; ``number_words`` "at least" > 150;
    ``number_sentences`` "at least" > 8; ``number_paragraphs`` >= 4; ``multiple_sections`` >= 4;
    more than 6 bullets, highlights or placeholders; ``letter_frequency`` "at least" > 20; prompt text
    asking for an essay, a long email/letter/story/article or 151+ words; prompts over 600 characters.
    """
    for type_id, raw in zip(record["instruction_id_list"], record["kwargs"]):
        k = {key: value for key, value in raw.items() if value is not None}
        at_least = k.get("relation") == "at least"
        if (
            type_id in ("combination:two_responses", "length_constraints:nth_paragraph_first_word")
            or (type_id == "language:response_language" and k.get("language") != "en")
            or (type_id == "length_constraints:number_words" and at_least and k["num_words"] > 150)
            or (type_id == "length_constraints:number_sentences" and at_least and k["num_sentences"] > 8)
            or (type_id == "length_constraints:number_paragraphs" and k["num_paragraphs"] >= 4)
            or (type_id == "detectable_format:multiple_sections" and k["num_sections"] >= 4)
            or (type_id == "detectable_format:number_bullet_lists" and k["num_bullets"] > 6)
            or (type_id == "detectable_format:number_highlighted_sections" and k["num_highlights"] > 6)
            or (type_id == "detectable_content:number_placeholders" and k["num_placeholders"] > 6)
            or (type_id == "keywords:letter_frequency" and k.get("let_relation") == "at least" and k["let_frequency"] > 20)
        ):
            return False
    prompt = record["prompt"]
    if len(prompt) > IFEVAL_MAX_PROMPT_CHARS:
        return False
    return not any(m.group(1) or int(m.group(2)) > 150 for m in _LONG_REQUEST.finditer(prompt))


def select_ifeval_subset(lines: Iterable[str], size: int = IFEVAL_SUBSET_SIZE) -> list[str]:
    """The first ``size`` lines of IFEval's ``input_data.jsonl`` (in its order) whose prompt :func:`fits_short_response`, unchanged."""
    chosen = []
    for line in lines:
        if line.strip() and fits_short_response(json.loads(line)):
            chosen.append(line)
            if len(chosen) == size:
                break
    return chosen


@cache
def _lines() -> tuple[str, ...]:
    text = files("posttrain.demo").joinpath("data", "ifeval_input_data.jsonl").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines(keepends=True) if line.strip())


def ifeval_all() -> list[dict[str, Any]]:
    """All 541 IFEval prompts, in IFEval's order, its fields as they are."""
    return [json.loads(line) for line in _lines()]


def ifeval_unused() -> list[dict[str, Any]]:
    """The IFEval prompts outside :func:`ifeval_subset` (421), in IFEval's order: never scored while a preset was chosen."""
    chosen = set(select_ifeval_subset(_lines()))
    return [json.loads(line) for line in _lines() if line not in chosen]


def ifeval_subset(n: int | None = None) -> list[dict[str, Any]]:
    """The fast subset's first ``n`` records (all :data:`IFEVAL_SUBSET_SIZE` with ``None``), IFEval's fields as they are."""
    records = [json.loads(line) for line in select_ifeval_subset(_lines())]
    if n is not None and not 0 <= n <= len(records):
        raise ValueError(f"ifeval_subset: n must be between 0 and {len(records)}, got {n}")
    return records if n is None else records[:n]
