"""Instruction-data formats: detect, validate and convert to canonical records (back out: :mod:`posttrain.data.convert`).

Readers: Alpaca, ShareGPT (``from``/``value``), OpenAI-style messages (with ``tool_calls`` and
``tools``), prompt/completion (text or messages; ``response`` is accepted for ``completion``, as in
IFEval's response files), preference (``prompt``/``chosen``/``rejected`` as text or messages, the
implicit-prompt form where chosen and rejected are whole conversations, and OpenAI's
``input``/``preferred_output``/``non_preferred_output``), and IFEval's verifiable prompts.

Every check reports a :class:`~posttrain.data.sources.Problem` naming the record's place, the field
(as a path such as ``messages[2].role``), what was expected and what was found. Our own code: the
formats are small, and no library validates them with errors a person can act on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data.sources import Problem, RawItem, describe, read_raw
from posttrain.records import ROLES, Location, Record, write_jsonl

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "preference", "ifeval")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_call": "assistant",  # LLaMA-Factory: the value is a JSON tool call
}


class RecordError(Exception):
    """Raised inside a converter; carries the problems found in one record."""

    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


class DataError(Exception):
    """Raised when reading stops on bad records: lists up to 20 problems and gives the total count."""

    def __init__(self, problems: list[Problem], total: int, source: str, max_listed: int = 20):
        self.problems = problems
        self.total = total
        shown = "\n".join(f"  {p}" for p in problems[:max_listed])
        more = f"\n  ... and {total - max_listed} more" if total > max_listed else ""
        super().__init__(
            f"{source}: {total} problem{'s' if total != 1 else ''} found{', first ' + str(max_listed) + ' listed' if total > max_listed else ''}:\n"
            f"{shown}{more}\n(fix them, or pass --on-error skip to skip bad records and write them to a rejects file)"
        )


class _Checker:
    """Collects problems for one record; field paths are relative to the record."""

    def __init__(self, location: Location):
        self.location = location
        self.problems: list[Problem] = []

    def add(self, field: str | None, expected: str, found: str) -> None:
        self.problems.append(Problem(self.location, field, expected, found))

    def require(self, record: dict, key: str, path: str = "") -> Any:
        if key not in record:
            self.add(path + key, "a value (the field is missing)", f"only {sorted(record)}" if record else "an empty object")
            return None
        return record[key]

    def text(self, value: Any, path: str, *, allow_empty: bool = True, what: str = "non-empty text") -> str | None:
        if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            value = "".join(p["text"] for p in value)  # OpenAI's list-of-text-parts content
        if not isinstance(value, str):
            self.add(path, "a string", describe(value))
            return None
        if not allow_empty and not value.strip():
            self.add(path, what, describe(value))
            return None
        return value

    def done(self) -> None:
        if self.problems:
            raise RecordError(self.problems)


# ---------------------------------------------------------------------------------------------------
# Messages: the shared core of every chat-shaped format


def _tool_calls(c: _Checker, value: Any, path: str) -> list[dict] | None:
    if not isinstance(value, list) or not value:
        c.add(path, "a non-empty list of tool calls", describe(value))
        return None
    calls = []
    for i, call in enumerate(value):
        p = f"{path}[{i}]"
        if not isinstance(call, dict):
            c.add(p, "an object", describe(call))
            continue
        fn = call.get("function", call)  # accept {"name", "arguments"} without the OpenAI wrapper
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            c.add(f"{p}.function.name", "the tool's name as a string", describe(fn.get("name") if isinstance(fn, dict) else fn))
            continue
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                c.add(f"{p}.function.arguments", "a JSON object (or a string holding one)", describe(args))
                continue
        if not isinstance(args, dict):
            c.add(f"{p}.function.arguments", "a JSON object", describe(args))
            continue
        out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if "id" in call:
            out["id"] = call["id"]
        calls.append(out)
    return calls


def check_messages(
    c: _Checker, value: Any, path: str, *, need_assistant: bool = True, first_index: int = 0, after: str | None = None
) -> list[dict] | None:
    """Validate a list of messages; returns normalised copies (content as str, tool calls as OpenAI dicts).

    ``after`` is the role of the message before this list (when checking a completion after its prompt).
    """
    if not isinstance(value, list) or not value:
        c.add(path, "a non-empty list of messages", describe(value))
        return None
    out: list[dict] = []
    before = len(c.problems)
    for i, msg in enumerate(value):
        p = f"{path}[{i}]"
        if not isinstance(msg, dict):
            c.add(p, "a message object with 'role' and 'content'", describe(msg))
            continue
        role = c.require(msg, "role", p + ".")
        if role is None:
            continue
        if role not in ROLES:
            c.add(f"{p}.role", f"one of {', '.join(ROLES)}", describe(role))
            continue
        m: dict[str, Any] = {"role": role}
        if role == "assistant" and msg.get("tool_calls"):
            calls = _tool_calls(c, msg["tool_calls"], f"{p}.tool_calls")
            if calls is not None:
                m["tool_calls"] = calls
            content = msg.get("content") or ""
            m["content"] = c.text(content, f"{p}.content")
        else:
            if "content" not in msg:
                c.require(msg, "content", p + ".")
                continue
            m["content"] = c.text(msg["content"], f"{p}.content", allow_empty=role != "assistant", what="non-empty assistant content (or tool_calls)")
        for key in ("name", "tool_call_id"):
            if isinstance(msg.get(key), str):
                m[key] = msg[key]
        out.append(m)
    if len(c.problems) > before:
        return None
    _check_order(c, out, path, after=after, first_index=first_index)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        c.add(path, "at least one assistant turn", f"roles {[m['role'] for m in out]}")
    return out if len(c.problems) == before else None


# Which role may follow which. None stands for the start of the conversation.
_NEXT = {
    None: {"system", "user"},
    "system": {"user"},
    "user": {"assistant"},
    "assistant": {"user", "tool"},
    "tool": {"tool", "assistant"},
}


def _check_order(c: _Checker, messages: list[dict], path: str, *, after: str | None, first_index: int) -> None:
    prev = after
    for i, m in enumerate(messages):
        role = m["role"]
        if role not in _NEXT[prev]:
            where = "at the start" if prev is None else f"after {'an' if prev == 'assistant' else 'a'} {prev} turn"
            c.add(f"{path}[{i}].role", f"{' or '.join(sorted(_NEXT[prev]))} {where} (roles out of order)", describe(role))
            return
        if role == "tool" and prev == "assistant" and "tool_calls" not in messages[i - 1]:
            c.add(f"{path}[{i}].role", "a tool result only after an assistant turn with tool_calls", "a tool turn after an assistant turn without tool_calls")
            return
        prev = role


def _tools(c: _Checker, record: dict, key: str = "tools") -> list | None:
    tools = record.get(key)
    if tools is None:
        return None
    if isinstance(tools, str):  # LLaMA-Factory's ShareGPT stores tools as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            c.add(key, "a list of tool schemas (or a JSON string of one)", describe(tools))
            return None
        if tools is None:
            return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        c.add(key, "a list of tool schemas", describe(tools))
        return None
    return tools


def conversation_record(messages: list[dict], tools: list | None) -> Record:
    return {"messages": messages, "tools": tools} if tools else {"messages": messages}


# ---------------------------------------------------------------------------------------------------
# One converter per format: raw dict -> canonical record (or RecordError)


def from_messages(record: dict, location: Location) -> Record:
    c = _Checker(location)
    messages = c.require(record, "messages")
    if messages is not None:
        messages = check_messages(c, messages, "messages")
    tools = _tools(c, record)
    c.done()
    return conversation_record(messages, tools)


def from_sharegpt(record: dict, location: Location) -> Record:
    c = _Checker(location)
    turns = c.require(record, "conversations")
    if turns is None:
        c.done()
    if not isinstance(turns, list) or not turns:
        c.add("conversations", "a non-empty list of turns", describe(turns))
        c.done()
    messages: list[dict] = []
    origin: list[str] = []  # the ShareGPT field each message came from, for error messages
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
        origin.append("system")
    for i, turn in enumerate(turns):
        p = f"conversations[{i}]"
        if not isinstance(turn, dict):
            c.add(p, "an object with 'from' and 'value'", describe(turn))
            continue
        who, value = c.require(turn, "from", p + "."), c.require(turn, "value", p + ".")
        if who is None or value is None:
            continue
        if who not in SHAREGPT_ROLES:
            c.add(f"{p}.from", f"one of {', '.join(SHAREGPT_ROLES)}", describe(who))
            continue
        if who == "function_call":
            calls = _parse_calls(c, value, f"{p}.value")
            if messages and messages[-1]["role"] == "assistant":
                # A call after a gpt turn (or another call) belongs to that same assistant message.
                messages[-1].setdefault("tool_calls", []).extend(calls)
                continue
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": SHAREGPT_ROLES[who], "content": value})
        origin.append(p)
    c.done()
    checked = check_messages(c, messages, "conversations", first_index=0)
    tools = _tools(c, record)
    if c.problems:  # re-point message paths at the ShareGPT fields the user wrote
        c.problems = [_sharegpt_path(p, origin) for p in c.problems]
    c.done()
    return conversation_record(checked, tools)


def _parse_calls(c: _Checker, value: Any, path: str) -> list:
    """A function_call turn's value: one call or a list of calls (LLaMA-Factory's parallel calls), as JSON."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            c.add(path, 'a JSON tool call {"name": ..., "arguments": ...} (or a list of them)', describe(value))
            return []
    return value if isinstance(value, list) else [value]


def _sharegpt_path(p: Problem, origin: list[str]) -> Problem:
    f = p.field or ""
    if f.startswith("conversations["):
        idx = int(f[len("conversations[") : f.index("]")])
        rest = f[f.index("]") + 1 :].replace(".role", ".from").replace(".content", ".value")
        f = origin[idx] + ("" if origin[idx] == "system" else rest) if idx < len(origin) else f
    return Problem(p.location, f, p.expected.replace("assistant turn", "gpt turn"), p.found)


def from_alpaca(record: dict, location: Location) -> Record:
    c = _Checker(location)
    instruction, output = c.require(record, "instruction"), c.require(record, "output")
    if instruction is not None:
        instruction = c.text(instruction, "instruction", allow_empty=False)
    if output is not None:
        output = c.text(output, "output", allow_empty=False)
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        c.add("input", "a string", describe(extra))
    system = record.get("system")
    c.done()
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


def _text_or_messages(c: _Checker, value: Any, path: str, *, completion: bool, after: str | None = None) -> Any:
    if isinstance(value, str):
        return c.text(value, path, allow_empty=not completion)
    if isinstance(value, dict) and "role" in value:
        value = [value]
    return check_messages(c, value, path, need_assistant=completion, after=after)


def from_prompt_completion(record: dict, location: Location) -> Record:
    c = _Checker(location)
    key = "completion" if "completion" in record else "response"
    prompt = c.require(record, "prompt")
    completion = c.require(record, key)
    if prompt is None or completion is None:
        c.done()
    prompt = _text_or_messages(c, prompt, "prompt", completion=False)
    if isinstance(prompt, list) and isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    after = prompt[-1]["role"] if isinstance(prompt, list) and prompt else None
    completion = _text_or_messages(c, completion, key, completion=True, after=after)
    if isinstance(prompt, str) and isinstance(completion, list):
        c.add(key, "text, as the prompt is text", describe(record[key]))
    tools = _tools(c, record)
    c.done()
    out: Record = {"prompt": prompt, "completion": completion}
    if tools:
        out["tools"] = tools
    return out


def from_preference(record: dict, location: Location) -> Record:
    c = _Checker(location)
    if "preferred_output" in record:  # OpenAI's preference fine-tuning format
        inp = c.require(record, "input")
        record = {
            "prompt": inp.get("messages") if isinstance(inp, dict) else inp,
            "chosen": record.get("preferred_output"),
            "rejected": record.get("non_preferred_output"),
            "tools": inp.get("tools") if isinstance(inp, dict) else None,
        }
        names = {"prompt": "input.messages", "chosen": "preferred_output", "rejected": "non_preferred_output"}
    else:
        names = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    chosen, rejected = c.require(record, "chosen"), c.require(record, "rejected")
    if chosen is None or rejected is None:
        c.done()
    prompt = record.get("prompt")
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        # Implicit prompt: chosen and rejected are whole conversations sharing the prompt as a prefix.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            c.add("chosen", "conversations that share a prompt with 'rejected' (or a 'prompt' field)", "no shared first message")
            c.done()
    elif prompt is None:
        c.require(record, "prompt")
        c.done()
    prompt = _text_or_messages(c, prompt, names["prompt"], completion=False)
    after = prompt[-1]["role"] if isinstance(prompt, list) and prompt else None
    sides = {}
    for side in ("chosen", "rejected"):
        value = chosen if side == "chosen" else rejected
        if isinstance(prompt, list) and isinstance(value, str):
            value = [{"role": "assistant", "content": value}]
        sides[side] = _text_or_messages(c, value, names[side], completion=True, after=after)
    tools = _tools(c, record)
    c.done()
    if sides["chosen"] == sides["rejected"]:
        c.add(names["chosen"], f"a response different from '{names['rejected']}'", "identical chosen and rejected responses")
        c.done()
    out: Record = {"prompt": prompt, "chosen": sides["chosen"], "rejected": sides["rejected"]}
    if tools:
        out["tools"] = tools
    return out


def from_ifeval(record: dict, location: Location) -> Record:
    c = _Checker(location)
    key = c.require(record, "key")
    prompt = c.require(record, "prompt")
    ids = c.require(record, "instruction_id_list")
    kwargs = c.require(record, "kwargs")
    if key is not None and (not isinstance(key, (int, str)) or isinstance(key, bool)):
        c.add("key", "an integer or string id", describe(key))
    if prompt is not None:
        c.text(prompt, "prompt", allow_empty=False)
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(x, str) and ":" in x for x in ids)):
        c.add("instruction_id_list", "a list of instruction ids such as 'punctuation:no_comma'", describe(ids))
    if kwargs is not None:
        if not isinstance(kwargs, list) or not all(isinstance(x, dict) for x in kwargs):
            c.add("kwargs", "a list of objects, one per instruction", describe(kwargs))
        elif isinstance(ids, list) and len(kwargs) != len(ids):
            c.add("kwargs", f"{len(ids)} objects, one per instruction id", f"{len(kwargs)}")
    c.done()
    return {"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}


CONVERTERS: dict[str, Callable[[dict, Location], Record]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "prompt_completion": from_prompt_completion,
    "preference": from_preference,
    "ifeval": from_ifeval,
}


def detect_format(record: Any) -> str | None:
    """The format a raw record looks like, from its keys; None when nothing fits."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction_id_list" in keys:
        return "ifeval"
    if {"chosen", "rejected"} <= keys or {"preferred_output", "non_preferred_output"} <= keys:
        return "preference"
    if "prompt" in keys and keys & {"completion", "response"}:
        return "prompt_completion"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    return None


# ---------------------------------------------------------------------------------------------------
# Reading a whole source


@dataclass
class ReadReport:
    """What reading a source did: counts, the format used, and every rejected record with its reasons."""

    source: str
    format: str | None = None
    read: int = 0
    kept: int = 0
    rejected: list[tuple[RawItem, list[Problem]]] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        return [p for _, ps in self.rejected for p in ps]


def iter_records(
    source: str | Path,
    *,
    format: str | None = None,
    on_error: str = "stop",
    split: str | None = None,
    subset: str | None = None,
    revision: str | None = None,
    report: ReadReport | None = None,
) -> Iterator[Record]:
    """Canonical records from ``source`` (a hub dataset's ``split``, ``subset`` and ``revision`` as :func:`read_raw` takes them).

    ``on_error="stop"`` reads the whole source, then raises :class:`DataError` listing the problems
    if any record was bad (so one run shows them all). ``"skip"`` yields only good records and
    collects the bad ones in ``report.rejected``.
    """
    for _, record in iter_read(source, format=format, on_error=on_error, split=split, subset=subset, revision=revision, report=report):
        yield record


def iter_read(
    source: str | Path,
    *,
    format: str | None = None,
    on_error: str = "stop",
    split: str | None = None,
    subset: str | None = None,
    revision: str | None = None,
    report: ReadReport | None = None,
) -> Iterator[tuple[RawItem, Record]]:
    """:func:`iter_records`, each record with the raw item it came from (its location and the value as read),
    for steps that report lines or write the kept records back out as they were (dedup, decontamination)."""
    if format is not None and format not in CONVERTERS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', not {on_error!r}")
    report = report if report is not None else ReadReport(str(source))
    report.format = format
    good: list[tuple[RawItem, Record]] = []
    for item in read_raw(source, split=split, subset=subset, revision=revision):
        report.read += 1
        problems: list[Problem]
        if item.problem is not None:
            problems = [item.problem]
        elif not isinstance(item.value, dict):
            problems = [Problem(item.location, None, "a JSON object (one record)", describe(item.value))]
        else:
            if report.format is None:
                report.format = detect_format(item.value)
                if report.format is None:
                    raise DataError(
                        [Problem(item.location, None, "the keys of a known format (alpaca: instruction/output; sharegpt: conversations; messages; prompt/completion; preference: chosen/rejected; ifeval: instruction_id_list); pass --format to force one", f"keys {sorted(item.value)}")],
                        1,
                        str(source),
                    )
            try:
                record = CONVERTERS[report.format](item.value, item.location)
            except RecordError as err:
                problems = err.problems
            else:
                report.kept += 1
                if on_error == "stop":
                    good.append((item, record))  # held back until we know the whole source is clean
                else:
                    yield item, record
                continue
        report.rejected.append((item, problems))
    if on_error == "stop":
        if report.rejected:
            raise DataError(report.problems, len(report.problems), str(source))
        yield from good


def read_records(source: str | Path, **kwargs: Any) -> list[Record]:
    return list(iter_records(source, **kwargs))


def write_rejects(path: str | Path, report: ReadReport) -> int:
    """Write each rejected record with its reasons, one JSON object a line."""
    return write_jsonl(
        path,
        (
            {"location": str(item.location), "record": item.value, "problems": [p.to_dict() for p in problems]}
            for item, problems in report.rejected
        ),
    )
