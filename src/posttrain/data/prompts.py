"""Prompts to sample from: the prompt of any canonical record, prompt sets read for sampling, and the key
of a recorded reference log-prob.

``posttrain label`` (:mod:`posttrain.synth.label`), GRPO and PPO sample responses to prompts. They read
prompt sets with :func:`read_prompts` (:class:`Prompt`): any canonical format gives its prompt
(responses unused), IFEval's format also its verifiable record
(:class:`~posttrain.records.PromptRecord`), and the ``prompts`` format (``{"prompt": text | messages}``)
is read too. :func:`prompt_of` is the prompt of one canonical record. Whether a verifiable prompt's
instruction ids are known and their kwargs valid is for the verifiers to say, a layer above this one:
callers pass ``validate=verifiers_of`` (:func:`posttrain.verify.scoring.verifiers_of`), and the records
it rejects are listed with every other bad record.

:func:`reference_key` is what a reference log-prob recorded while sampling (``posttrain label
--reference-logps``) is valid for; :mod:`posttrain.train.reference` looks the recorded values up by it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.formats import DataError, ReadReport, detect_format, iter_records
from posttrain.data.sources import Problem, RawItem, describe, read_raw
from posttrain.records import ROLES, Location, PromptRecord, Record


@dataclass(frozen=True)
class Prompt:
    """One prompt to sample from.

    ``prompt``: as it goes into a preference record and to the chat template: chat messages, or raw
    text for text prompts of prompt/completion and preference data (which SFT and DPO train as raw
    text, without the template). A bare request (IFEval's ``prompt``, the ``prompts`` format) is one
    user message. ``text``: the request as text (the last user message), what reward functions get.
    ``record``: the record it came from. ``verifiable``: IFEval's instructions, for IFEval-format prompts.
    """

    prompt: str | list[dict[str, Any]]
    text: str
    record: Record
    tools: list[Any] | None = None
    verifiable: PromptRecord | None = None

    def engine_input(self) -> Record:
        """What the generation engine renders: a prompt-only record, so tools and raw text are kept."""
        out: Record = {"prompt": self.prompt, "completion": ""}
        if self.tools:
            out["tools"] = self.tools
        return out

    def response_record(self, response: str) -> str | list[dict[str, Any]]:
        """A response as the chosen or rejected side of a preference record for this prompt."""
        return response if isinstance(self.prompt, str) else [{"role": "assistant", "content": response}]


def prompt_of(record: Record) -> Prompt:
    """The prompt of a canonical record (a conversation's prompt is everything before its last assistant turn)."""
    tools = record.get("tools")
    if "instruction_id_list" in record:
        verifiable = PromptRecord.model_validate(record)
        return Prompt([{"role": "user", "content": record["prompt"]}], record["prompt"], record, None, verifiable)
    prompt: str | list[dict[str, Any]]
    if "messages" in record:
        messages = record["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        prompt = messages[:last]
    else:
        prompt = record["prompt"]
    if isinstance(prompt, str) and "completion" not in record and "chosen" not in record:
        prompt = [{"role": "user", "content": prompt}]  # a bare request (the prompts format) is a user turn
    text = prompt if isinstance(prompt, str) else next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return Prompt(prompt, text or "", record, tools)


def read_prompts(
    source: str | Path,
    *,
    format: str | None = None,
    split: str | None = None,
    subset: str | None = None,
    revision: str | None = None,
    on_error: str = "stop",
    report: ReadReport | None = None,
    validate: Callable[[PromptRecord], object] | None = None,
) -> list[Prompt]:
    """Prompts from ``source`` in any canonical format, or the ``prompts`` format (``{"prompt": text | messages}``).

    ``format`` None detects it from the first record (a record with only a ``prompt`` is the prompts
    format). ``validate`` is called on each IFEval-format prompt's record; a ``ValueError`` or ``KeyError``
    it raises makes that record a problem like any other (pass :func:`posttrain.verify.scoring.verifiers_of`
    to check instruction ids and kwargs), every bad record listed at once. ``report`` collects counts
    and, with ``on_error="skip"``, the rejected records. ``split``, ``subset`` and ``revision`` choose
    what of a dataset is read.
    """
    report = report if report is not None else ReadReport(str(source))
    where = {"split": split, "subset": subset, "revision": revision}
    if format is None:
        first = next(iter(read_raw(source, **where)), None)
        value = first.value if first is not None else None
        if isinstance(value, dict) and detect_format(value) is None and "prompt" in value:
            format = "prompts"
    if format == "prompts":
        records = _read_prompt_lines(source, where, on_error, report)
    else:
        records = list(iter_records(source, format=format, on_error=on_error, report=report, **where))
    prompts, problems = [], []
    for row, record in enumerate(records):
        where = Location(str(source), row=row)  # records are already canonical: their place is their index
        found = []
        try:
            prompt = prompt_of(record)
            if prompt.verifiable is not None and validate is not None:
                validate(prompt.verifiable)  # unknown instruction ids and bad kwargs surface here
        except (ValueError, KeyError) as err:
            found = [Problem(where, "instruction_id_list", "known instruction ids with valid kwargs", str(err))]
        else:
            if isinstance(prompt.prompt, str) and not prompt.prompt.strip():
                found = [Problem(where, "prompt", "a non-empty prompt", describe(prompt.prompt))]
        if found:
            problems += found
            report.rejected.append((RawItem(where, value=record), found))
            report.kept -= 1
            continue
        prompts.append(prompt)
    if problems and on_error == "stop":
        raise DataError(problems, len(problems), str(source))
    return prompts


def _read_prompt_lines(source: str | Path, where: dict[str, str | None], on_error: str, report: ReadReport) -> list[Record]:
    """The prompts format: objects with a ``prompt`` (non-empty text, or messages ending in a user or tool turn).

    Other keys are kept in the record (a reward function gets the whole record).
    """
    report.format = "prompts"
    good, problems = [], []
    for item in read_raw(source, **where):
        report.read += 1
        found = [item.problem] if item.problem is not None else _prompt_problems(item.value, item.location)
        if found:
            report.rejected.append((item, found))
            problems += found
            continue
        report.kept += 1
        good.append(item.value)
    if problems and on_error == "stop":
        raise DataError(problems, len(problems), str(source))
    return good


def _prompt_problems(value: Any, location: Location) -> list[Problem]:
    if not isinstance(value, dict):
        return [Problem(location, None, "a JSON object with a 'prompt'", describe(value))]
    prompt = value.get("prompt")
    if isinstance(prompt, str):
        return [] if prompt.strip() else [Problem(location, "prompt", "non-empty text", describe(prompt))]
    if not isinstance(prompt, list) or not prompt:
        return [Problem(location, "prompt", "text or a non-empty list of messages", describe(prompt))]
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return [Problem(location, f"prompt[{i}]", f"a message with a role ({', '.join(ROLES)}) and text content", describe(m))]
    if prompt[-1]["role"] not in ("user", "tool"):
        return [Problem(location, f"prompt[{len(prompt) - 1}].role", "user or tool (the model answers next)", describe(prompt[-1]["role"]))]
    return []


def reference_key(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> str:
    """What a recorded reference log-prob is valid for: these prompt tokens, then these scored response tokens."""
    text = f"{len(prompt_ids)}:" + ",".join(map(str, [*prompt_ids, *response_ids]))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
