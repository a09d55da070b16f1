"""Canonical records written out in another format (``posttrain data convert``): messages, ShareGPT, Alpaca,
prompt/completion; a record that the target cannot hold raises :class:`ConvertError` saying why.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from posttrain.data.formats import FORMATS, conversation_record
from posttrain.records import Record, kind_of


class ConvertError(ValueError):
    pass


def to_format(record: Record, target: str) -> dict:
    """Convert a canonical record to ``target`` (one of :data:`FORMATS`); raises ConvertError when it cannot."""
    kind = kind_of(record)
    if target == "ifeval":
        if kind != "verifiable":
            raise ConvertError(f"a {kind} record has no instructions to check; only ifeval records convert to ifeval")
        return record
    if target == "preference":
        if kind != "preference":
            raise ConvertError(f"a {kind} record has no rejected response; only preference records convert to preference")
        return record
    if kind in ("preference", "verifiable"):
        raise ConvertError(f"a {kind} record converts only to {'preference' if kind == 'preference' else 'ifeval'}")
    if kind == "prompt_completion":
        if isinstance(record["prompt"], str):
            if target in ("prompt_completion",):
                return record
            messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
        else:
            messages = record["prompt"] + record["completion"]
        record = conversation_record(messages, record.get("tools"))
    messages = record["messages"]
    if target == "messages":
        return record
    if target == "prompt_completion":
        final = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if final != len(messages) - 1:
            raise ConvertError(f"the conversation ends with a {messages[-1]['role']} turn after its last assistant turn; prompt/completion would lose it")
        cut = max(i for i, m in enumerate(messages[:final]) if m["role"] in ("user", "tool"))
        out = {"prompt": messages[: cut + 1], "completion": messages[cut + 1 :]}
        if record.get("tools"):
            out["tools"] = record["tools"]
        return out
    if target == "sharegpt":
        inverse = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}
        turns = []
        for m in messages:
            if m.get("tool_calls"):
                if m["content"]:
                    turns.append({"from": "gpt", "value": m["content"]})
                calls = [call["function"] for call in m["tool_calls"]]
                turns.append({"from": "function_call", "value": json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)})
            else:
                turns.append({"from": inverse[m["role"]], "value": m["content"]})
        out = {"conversations": turns}
        if record.get("tools"):
            out["tools"] = json.dumps(record["tools"], ensure_ascii=False)
        return out
    if target == "alpaca":
        body = [m for m in messages if m["role"] != "system"]
        if len(body) != 2 or body[0]["role"] != "user" or body[1]["role"] != "assistant" or body[1].get("tool_calls"):
            raise ConvertError("only a single user→assistant exchange converts to alpaca; this conversation has roles " + str([m["role"] for m in messages]))
        out = {"instruction": body[0]["content"], "input": "", "output": body[1]["content"]}
        system = [m["content"] for m in messages if m["role"] == "system"]
        if system:
            out["system"] = system[0]
        return out
    raise ConvertError(f"unknown target format {target!r}; choose one of {', '.join(FORMATS)}")


def convert_records(records: Iterable[Record], target: str) -> Iterator[dict]:
    for record in records:
        yield to_format(record, target)
