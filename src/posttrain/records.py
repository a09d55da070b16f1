"""Canonical records: the contract between posttrain's stages.

Every reader turns its input into one of these plain-dict shapes, and every stage reads them back. The
shapes follow what Hugging Face TRL and the Hub's datasets already use, so a user's data loads as is:

- conversation       ``{"messages": [{"role", "content", "tool_calls"?, ...}], "tools"?: [...]}``
- prompt_completion  ``{"prompt": str | [messages], "completion": str | [messages]}``
- preference         ``{"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages]}``
- verifiable         ``{"key", "prompt", "instruction_id_list": [...], "kwargs": [{...}]}`` (IFEval's format)

Records stay plain dicts (not pydantic objects) because they pass through JSONL, Arrow and worker
processes by the hundred thousand; validation happens once, at the edge, in ``posttrain.data.formats``.
The one typed view is :class:`PromptRecord`, a verifiable prompt as the stages that check instructions
(labelling, GRPO's rewards, evaluation) hold it; the verifiers of its instructions come from
:func:`posttrain.verify.scoring.verifiers_of`, a layer up.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

Record = dict[str, Any]
Message = dict[str, Any]

ROLES = ("system", "user", "assistant", "tool")
KINDS = ("conversation", "prompt_completion", "preference", "verifiable")


@dataclass(frozen=True)
class Location:
    """Where a record came from, for error messages: a file and a 1-based line, or a row of a table."""

    source: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}"
        if self.row is not None:
            return f"{self.source} row {self.row}"
        return self.source


def kind_of(record: Record) -> str:
    """The canonical kind of an already-canonical record."""
    if "messages" in record:
        return "conversation"
    if "chosen" in record:
        return "preference"
    if "instruction_id_list" in record:
        return "verifiable"
    if "completion" in record:
        return "prompt_completion"
    raise ValueError(f"not a canonical record: keys {sorted(record)}")


def write_jsonl(path: str | Path, records: Iterable[Record]) -> int:
    """Write records one JSON object a line (UTF-8, non-ASCII kept readable); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[Record]:
    """Read records written by :func:`write_jsonl` (no validation: use ``posttrain.data.formats`` for user data)."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


class PromptRecord(BaseModel):
    """One verifiable prompt (an IFEval input line): the prompt, its instruction ids and one kwargs dict per instruction.

    Only the shape is checked here; whether the ids are known and their kwargs valid is the verifiers'
    business (:func:`posttrain.verify.scoring.verifiers_of`).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: int | str | None = None
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]

    @model_validator(mode="after")
    def _one_kwargs_per_instruction(self) -> PromptRecord:
        if len(self.kwargs) != len(self.instruction_id_list):
            raise ValueError(
                f"{len(self.instruction_id_list)} instruction ids but {len(self.kwargs)} kwargs dicts; expected one per instruction"
            )
        return self
