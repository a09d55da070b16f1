"""Self-Instruct's and Alpaca's rules: the prompts we send, how replies are parsed, what the filters drop.

Self-Instruct (Wang et al., 2023, yizhongw/self-instruct): a numbered list of 8 demonstration
instructions (6 from the seed tasks, 2 already generated) that the teacher continues; each new
instruction is kept unless a filter drops it (:func:`instruction_problem`, then the ROUGE-L filter of
:mod:`posttrain.synth.rouge` against the whole pool); the teacher then says whether each is a
classification task (few-shot, from the seed tasks' own labels), and writes instances for it: the
input first, or for a classification task the class label first (so labels do not all come out the
same). Alpaca (Taori et al., 2023, ``--style alpaca``): 20 instructions a call, each with its input
(``<noinput>`` when none) and output, written in one reply; the last item is dropped when the reply was
cut at its token budget; Alpaca's filter adds video, audio, music, flowchart and diagram to the keywords.

The prompts' wording is ours (the demonstrations come from the user's seed file); the rules and
numbers are the papers' and their code's (REFERENCE.md). Own code: small, exact string rules.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SELF_INSTRUCT_KEYWORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot", "go to")
ALPACA_KEYWORDS = SELF_INSTRUCT_KEYWORDS + ("video", "audio", "music", "flowchart", "diagram")
MIN_WORDS, MAX_WORDS = 3, 150  # kept: more than 3 words, at most 150
DEMOS, SEED_DEMOS = 8, 6  # Self-Instruct: 8 demonstrations, 6 of them seed tasks
ALPACA_PER_CALL, ALPACA_DEMOS = 20, 3
MAX_INSTANCES = 3  # instances asked of a task (the reply stops at "Example 4"); Self-Instruct asks up to 5


@dataclass(frozen=True)
class SeedTask:
    """A Self-Instruct seed task (``seed_tasks.jsonl``): instruction, instances, whether it is classification."""

    instruction: str
    instances: tuple[tuple[str, str], ...]
    is_classification: bool


def seed_task(value: Any) -> SeedTask:
    """A seed task from one JSON line (``instruction``, ``instances`` of ``{input, output}``, ``is_classification``)."""
    if not isinstance(value, dict) or not isinstance(value.get("instruction"), str) or not value["instruction"].strip():
        raise ValueError("field 'instruction': expected a non-empty string")
    instances = value.get("instances", [])
    if not isinstance(instances, list) or not all(isinstance(i, dict) and isinstance(i.get("output"), str) for i in instances):
        raise ValueError("field 'instances': expected a list of {input, output} with string outputs")
    return SeedTask(
        value["instruction"].strip(),
        tuple((str(i.get("input") or ""), i["output"]) for i in instances),
        bool(value.get("is_classification", False)),
    )


# -- instructions -------------------------------------------------------------------------------


def bootstrap_prompt(demos: Sequence[str]) -> str:
    """The numbered list the teacher continues (the last number left open)."""
    lines = [f"{i + 1}. " + re.sub(r"\s+", " ", text).strip().rstrip(":") for i, text in enumerate(demos)]
    return "Here is a list of different tasks a helpful assistant could be asked to do:\n" + "\n".join(lines) + f"\n{len(demos) + 1}."


def split_instructions(reply: str) -> list[str]:
    """The instructions of a continued numbered list: the text after the open number, then each ``N.`` item.

    A reply that restarts its numbering after the open number (``9.`` continued as `` 1. Write ...``, as
    small teachers do) loses that number too."""
    parts = re.split(r"\n\s*\d+\s?\.\s", "\n0. " + reply.strip())
    parts = [re.sub(r"^(?:\d+\s?\.\s)+", "", re.sub(r"\s+", " ", part).strip()) for part in parts]
    return [part for part in parts if part]


def instruction_problem(text: str, keywords: Sequence[str] = SELF_INSTRUCT_KEYWORDS) -> str | None:
    """Why Self-Instruct's filters drop ``text`` (before the ROUGE-L one), or None."""
    words = len(text.split())
    if words <= MIN_WORDS:
        return f"{MIN_WORDS} words or fewer"
    if words > MAX_WORDS:
        return f"more than {MAX_WORDS} words"
    for word in keywords:
        if re.search(rf"\b{word}\b", text, flags=re.IGNORECASE):
            return "a keyword a text model cannot serve (image, file, draw, ...)"
    if text.startswith("Write a program"):
        return 'starts with "Write a program"'
    if text[0] in string.punctuation:
        return "starts with punctuation"
    if not text[0].isascii():
        return "starts with a non-ASCII character"
    return None


# -- classification -----------------------------------------------------------------------------


def classification_prompt(instruction: str, examples: Sequence[SeedTask]) -> str:
    shots = "\n\n".join(f"Task: {t.instruction}\nClassification with a fixed set of output labels: {'Yes' if t.is_classification else 'No'}" for t in examples)
    return (
        "For each task, say whether it is a classification task: one whose output is one of a small, fixed set of labels.\n\n"
        f"{shots}\n\nTask: {instruction}\nClassification with a fixed set of output labels:"
    )


def parse_yes_no(reply: str) -> bool | None:
    match = re.search(r"\b(yes|no)\b", reply.lower())
    return None if match is None else match.group(1) == "yes"


# -- instances ----------------------------------------------------------------------------------


def instance_prompt(instruction: str, classification: bool, examples: Sequence[SeedTask]) -> str:
    """Input-first for ordinary tasks, label-first for classification (Self-Instruct's two instance templates, our words)."""
    blocks = []
    for task in examples:
        lines = [f"Task: {task.instruction}"]
        for n, (given, output) in enumerate(task.instances[:2], 1):
            given, output = _clip(given), _clip(output)
            if classification:
                lines += [f"Class label: {output}", f"Input: {given}" if given else "Input:"]
            else:
                lines += [f"Example {n}", f"Input: {given}" if given else "Input: <none>", f"Output: {output}"]
        blocks.append("\n".join(lines))
    head = (
        "Given a classification task and its labels, write a class label and then an input that has that label; cover several labels."
        if classification
        else "Write examples for each task: an input (or <none> when the task needs none) and the correct output."
    )
    return head + "\n\n" + "\n\n".join(blocks) + f"\n\nTask: {instruction}\n"


def _clip(text: str, limit: int = 400) -> str:
    """A demonstration's text cut to ``limit`` characters at a word boundary (long seed outputs only cost prefill)."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def parse_instances(reply: str, classification: bool) -> list[tuple[str, str]]:
    """(input, output) pairs out of an instance reply; an input of ``<none>`` becomes ``""``."""
    reply = reply.split("\nTask:")[0]
    pairs = []
    if classification:
        for label, given in re.findall(r"Class label:\s*(.+?)\s*\n\s*Input:[ \t]*(.*?)(?=\n\s*Class label:|\Z)", reply, flags=re.DOTALL):
            pairs.append((given.strip(), label.strip()))
    else:
        for block in re.split(r"(?:^|\n)\s*Example\s*\d+\s*\n", reply):
            if not block.strip():
                continue
            parts = re.split(r"Output\s*\d*\s*:", block, maxsplit=1)
            given, output = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
            output = re.split(r"\n\s*Input\s*\d*\s*:", output)[0]
            given = re.sub(r"^\s*Input\s*\d*\s*:", "", given).strip()
            pairs.append(("" if given.lower() in ("<none>", "<noinput>", "none") else given, output.strip()))
    return pairs


def clean_instances(pairs: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Self-Instruct's instance filters: empty outputs, output equal to input, duplicates; none kept when one input has two outputs."""
    dropped: dict[str, int] = {}
    seen: dict[str, str] = {}
    kept: list[tuple[str, str]] = []
    for given, output in pairs:
        reason = None
        if not output:
            reason = "empty output"
        elif output == given:
            reason = "output repeats the input"
        elif (given, output) in kept:
            reason = "duplicate instance"
        elif given and given in seen and seen[given] != output:
            dropped["one input with two outputs: the task's instances dropped"] = len(pairs)
            return [], dropped
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        seen[given] = output
        kept.append((given, output))
    return kept, dropped


# -- Alpaca ------------------------------------------------------------------------------------


def alpaca_prompt(demos: Sequence[SeedTask]) -> str:
    """Alpaca's style: requirements, then numbered items of instruction, input and output, the teacher to write up to 20."""
    items = []
    for i, task in enumerate(demos, 1):
        given, output = task.instances[0] if task.instances else ("", "")
        items.append(f"###\n{i}. Instruction: {task.instruction}\n{i}. Input:\n{given or '<noinput>'}\n{i}. Output:\n{output}")
    return (
        f"Write {ALPACA_PER_CALL} varied tasks for a language model, each with an instruction, an input and an output. "
        "Use different verbs and kinds of task (open questions, classification, editing, brainstorming, rewriting, ...). "
        "Each instruction is one or two sentences a text-only model can answer (nothing about images, audio or files). "
        "Write <noinput> as the input when the instruction needs none. Keep outputs under 100 words.\n\n"
        "List of tasks:\n" + "\n".join(items) + f"\n###\n{len(demos) + 1}. Instruction:"
    )


def parse_alpaca(reply: str, first: int, truncated: bool) -> list[tuple[str, str, str] | str]:
    """(instruction, input, output) per item of an Alpaca reply, or a string saying why an item is unusable."""
    text = f"{first}. Instruction:" + reply
    items = [part for part in re.split(r"\n?###\n?", text) if part.strip()]
    if truncated and items:
        items = items[:-1] + ["cut at the token budget (the last item)"]
    out: list[tuple[str, str, str] | str] = []
    for item in items:
        if item.startswith("cut at"):
            out.append(item)
            continue
        match = re.match(r"\s*\d+\.\s*Instruction:(.*?)\n\s*\d+\.\s*Input:(.*?)\n\s*\d+\.\s*Output:(.*)", item, flags=re.DOTALL)
        if not match:
            out.append("not an instruction, input and output")
            continue
        instruction, given, output = (part.strip() for part in match.groups())
        out.append((instruction, "" if given.lower() in ("<noinput>", "<no input>", "") else given, output))
    return out
