"""IFEval scoring: a verifiable prompt's verifiers, strict and loose verdicts per instruction, and the four headline accuracies.

Strict: an instruction is followed iff the response, stripped, is non-empty and the check passes on
the response as it is. Loose: iff the check passes on any of eight variants whose stripped form is
non-empty — the response; the response with every ``*`` removed; the response without its first
line, without its last line, without both (lines split on ``"\\n"``, each of these three stripped);
and each of those three with ``*`` removed. (Zhou et al., 2023, §3; the reference's
``test_instruction_following_loose``.)

Prompt-level accuracy: the share of prompts whose instructions are all followed. Instruction-level:
the share of all instructions, pooled over prompts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from posttrain.data.sources import read_jsonl
from posttrain.records import PromptRecord  # re-exported: verify.scoring.PromptRecord is the name user code knows
from posttrain.verify.base import Verdict, Verifier
from posttrain.verify.registry import get


def verifiers_of(record: PromptRecord) -> list[Verifier]:
    """One verifier per instruction of ``record``, kwargs validated (unknown ids and bad kwargs raise)."""
    return [get(verifier_id, **kwargs) for verifier_id, kwargs in zip(record.instruction_id_list, record.kwargs)]


@dataclass(frozen=True)
class InstructionScore:
    instruction_id: str
    strict: bool
    loose: bool
    reason: str
    """The strict verdict's reason (on the response as given)."""


@dataclass(frozen=True)
class ResponseScore:
    key: int | str | None
    instructions: tuple[InstructionScore, ...]

    @property
    def strict(self) -> bool:
        """Prompt-level strict: every instruction followed."""
        return all(score.strict for score in self.instructions)

    @property
    def loose(self) -> bool:
        return all(score.loose for score in self.instructions)


@dataclass(frozen=True)
class TypeScore:
    count: int
    strict: float
    loose: float


@dataclass(frozen=True)
class IFEvalScores:
    """Accuracies as fractions in [0, 1]."""

    prompt_strict: float
    inst_strict: float
    prompt_loose: float
    inst_loose: float
    num_prompts: int
    num_instructions: int
    per_type: dict[str, TypeScore] = field(default_factory=dict)

    def headline(self) -> str:
        """``prompt strict / inst strict / prompt loose / inst loose`` in percent, the paper's order."""
        return " / ".join(f"{100 * x:.2f}" for x in (self.prompt_strict, self.inst_strict, self.prompt_loose, self.inst_loose))


def loose_variants(response: str) -> tuple[str, ...]:
    """The eight responses loose scoring tries, in the reference's order (duplicates kept)."""
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    return (
        response,
        response.replace("*", ""),
        without_first,
        without_last,
        without_both,
        without_first.replace("*", ""),
        without_last.replace("*", ""),
        without_both.replace("*", ""),
    )


def _followed(verifier: Verifier, response: str) -> Verdict:
    if not response.strip():
        return Verdict(False, "response is empty")
    return verifier.check(response)


def score_response(record: PromptRecord, response: str) -> ResponseScore:
    """Strict and loose verdicts for each of ``record``'s instructions on ``response``."""
    variants: list[str] = []
    for variant in loose_variants(response)[1:]:  # the first is the response itself, judged strictly
        if variant != response and variant not in variants:
            variants.append(variant)
    scores = []
    for verifier in verifiers_of(record):
        if _batches(verifier):  # one round trip for the response and all its variants
            strict, *rest = _followed_many(verifier, [response, *variants])
            loose = strict.passed or any(v.passed for v in rest)
        else:
            strict = _followed(verifier, response)
            loose = strict.passed or any(_followed(verifier, variant).passed for variant in variants)
        scores.append(InstructionScore(verifier.id, strict.passed, loose, strict.reason))
    return ResponseScore(record.key, tuple(scores))


def _batches(verifier: Verifier) -> bool:
    return type(verifier).check_many is not Verifier.check_many


def _followed_many(verifier: Verifier, responses: Sequence[str]) -> list[Verdict]:
    present = [r for r in responses if r.strip()]
    verdicts = dict(zip(present, verifier.check_many(present)))
    return [verdicts.get(r, Verdict(False, "response is empty")) for r in responses]


def prefetch(pairs: Iterable[tuple[PromptRecord, str]]) -> None:
    """Judge many (record, response) pairs' batching verifiers up front, one round trip per verifier.

    Code verifiers (:mod:`posttrain.verify.code`) remember their verdicts, so scoring the same pairs
    afterwards (:func:`score_response`) costs nothing more; other verifiers are left alone.
    """
    wanted: dict[type, tuple[Verifier, list[str]]] = {}
    for record, response in pairs:
        for verifier in verifiers_of(record):
            if _batches(verifier):
                texts = wanted.setdefault(type(verifier), (verifier, []))[1]
                texts.extend(v for v in loose_variants(response) if v.strip())
    for verifier, texts in wanted.values():
        verifier.check_many(list(dict.fromkeys(texts)))


def aggregate(scores: Iterable[ResponseScore]) -> IFEvalScores:
    """Prompt- and instruction-level accuracies, strict and loose, and accuracy per instruction type."""
    scores = list(scores)
    if not scores:
        raise ValueError("no responses to aggregate")
    instructions = [inst for score in scores for inst in score.instructions]
    by_type: dict[str, list[InstructionScore]] = defaultdict(list)
    for inst in instructions:
        by_type[inst.instruction_id].append(inst)
    per_type = {
        type_id: TypeScore(len(group), _mean(i.strict for i in group), _mean(i.loose for i in group))
        for type_id, group in sorted(by_type.items())
    }
    return IFEvalScores(
        prompt_strict=_mean(score.strict for score in scores),
        inst_strict=_mean(inst.strict for inst in instructions),
        prompt_loose=_mean(score.loose for score in scores),
        inst_loose=_mean(inst.loose for inst in instructions),
        num_prompts=len(scores),
        num_instructions=len(instructions),
        per_type=per_type,
    )


def _mean(values: Iterable[bool]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def score_responses(records: Sequence[PromptRecord], responses: Mapping[str, str]) -> list[ResponseScore]:
    """Score each record against ``responses[record.prompt]``; every prompt must have a response."""
    missing = [record.key if record.key is not None else record.prompt[:60] for record in records if record.prompt not in responses]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise KeyError(f"{len(missing)} of {len(records)} prompts have no response: {shown}")
    return [score_response(record, responses[record.prompt]) for record in records]


def read_prompt_records(path: str | Path) -> list[PromptRecord]:
    """IFEval's input file (``key``, ``prompt``, ``instruction_id_list``, ``kwargs`` per JSON line).

    Every bad line is reported, with its number and what was wrong, in one error.
    """
    records, problems = [], []
    for number, line in _json_lines(path, problems):
        try:
            record = PromptRecord.model_validate(line)
            verifiers_of(record)  # unknown ids and invalid kwargs surface here, with the line number
        except (ValidationError, ValueError, KeyError) as error:
            problems.append(f"{path}:{number}: {error}")
            continue
        records.append(record)
    if problems:
        raise ValueError(f"{len(problems)} bad lines in {path}:\n" + "\n".join(problems))
    return records


def read_responses(path: str | Path) -> dict[str, str]:
    """Responses keyed by prompt, from JSON lines with ``prompt`` and ``response`` strings."""
    responses, problems = {}, []
    for number, line in _json_lines(path, problems):
        prompt, response = line.get("prompt"), line.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            problems.append(f"{path}:{number}: expected string fields 'prompt' and 'response'")
            continue
        responses[prompt] = response
    if problems:
        raise ValueError(f"{len(problems)} bad lines in {path}:\n" + "\n".join(problems))
    return responses


def _json_lines(path: str | Path, problems: list[str]) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, object) for each JSON line; unreadable lines go to ``problems`` (the data layer's reader)."""
    for item in read_jsonl(Path(path)):
        if item.problem is not None:
            problems.append(str(item.problem))
        elif not isinstance(item.value, dict):
            problems.append(f"{item.location}: expected a JSON object")
        else:
            yield item.location.line, item.value
