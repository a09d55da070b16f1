"""Evol-Instruct's rules (Xu et al., 2023, WizardLM): the rewriting prompts, and the four elimination rules.

In-depth evolution makes an instruction harder in one of five ways (add a constraint, deepen the
inquiry, make it concrete, ask for more reasoning steps, complicate its input), adding only 10 to 20
words; in-breadth evolution writes a new, rarer instruction in the same domain. An evolution is
eliminated (and the instruction it came from goes back into the pool for the next round) when:

1. it brings no information gain: the teacher, asked whether the two instructions are equal in
   constraints, depth and breadth, answers "Equal";
2. the teacher's response to it contains "sorry" and is shorter than 80 words (it could not answer);
3. the response is only punctuation and stop words;
4. the evolved instruction copies words of the rewriting prompt ("#Rewritten Prompt#", "given prompt",
   "rewritten prompt", ...).

The prompts' wording is ours; the operations, limits and rules are the paper's. Own code.
"""

from __future__ import annotations

import re
from typing import Literal

Operation = Literal["constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth"]
OPERATIONS: tuple[Operation, ...] = ("constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth")

_IN_DEPTH = {
    "constraints": "Add one more constraint or requirement to it.",
    "deepen": "If it asks about a topic, ask about it in more depth and breadth.",
    "concretize": "Replace general concepts in it with more specific ones.",
    "reasoning": "If it can be solved in a few simple steps, rewrite it so that it explicitly asks for multi-step reasoning.",
    "complicate_input": "Give it a more complex input to work on (a table, code, a longer text or more data), written out in full.",
}

_DEPTH_PROMPT = """You rewrite instructions for an AI assistant into harder versions that people can still understand and answer.
Keep every non-text part of the original (tables, code, inputs) and do not leave anything out. Add only 10 to 20 words.
{method}
Write only the new instruction.

Instruction:
{instruction}

Harder instruction:"""

_BREADTH_PROMPT = """You write new instructions for an AI assistant. Taking the instruction below as inspiration, write a brand new one in the
same domain but about something rarer. It should be about as long and as hard, and people should be able to understand and answer it.
Write only the new instruction.

Instruction:
{instruction}

New instruction:"""

_EQUAL_PROMPT = """Here are two instructions for an AI assistant. Are they equal: do they have the same constraints and requirements and the
same depth and breadth of inquiry? Answer with one word: Equal or Not Equal.

First instruction:
{first}

Second instruction:
{second}

Answer:"""

# Words of the rewriting prompts (ours and the paper's) that an evolved instruction must not copy.
PROMPT_WORDS = ("#rewritten prompt#", "#given prompt#", "#created prompt#", "given prompt", "rewritten prompt", "created prompt",
                "harder instruction", "new instruction:", "rewrite the instruction", "the instruction below")  # fmt: skip
SORRY_MAX_WORDS = 80
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between both but by can
    could did do does doing down during each few for from further had has have having he her here hers herself him himself his how i
    if in into is it its itself just let me more most my myself no nor not now of off on once only or other our ours ourselves out
    over own same she should so some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your yours yourself yourselves ok
    okay yes""".split()
)


def evolve_prompt(instruction: str, operation: Operation) -> str:
    if operation == "breadth":
        return _BREADTH_PROMPT.format(instruction=instruction.strip())
    return _DEPTH_PROMPT.format(method=_IN_DEPTH[operation], instruction=instruction.strip())


def equal_prompt(first: str, second: str) -> str:
    return _EQUAL_PROMPT.format(first=first.strip(), second=second.strip())


def clean_evolved(reply: str) -> str:
    """The evolved instruction out of a reply: labels the model echoes ("Harder instruction:") and wrapping quotes removed."""
    text = reply.strip()
    text = re.sub(r"^(#?\s*(harder|new|rewritten|created)\s+(instruction|prompt)\s*#?\s*:?)\s*", "", text, flags=re.IGNORECASE)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def parse_equal(reply: str) -> bool | None:
    """True for "Equal", False for "Not Equal" (or "not equal"/"unequal"), None when it says neither."""
    text = reply.strip().lower()
    if re.search(r"\bnot\s+equal\b|\bunequal\b", text):
        return False
    if re.search(r"\bequal\b", text):
        return True
    return None


def elimination(evolved: str, response: str | None, equal: bool | None) -> str | None:
    """Which of the four rules eliminates an evolution, or None. ``response``/``equal`` None: not asked (yet)."""
    lowered = evolved.lower()
    if not evolved.strip():
        return "empty evolution"
    if any(words in lowered for words in PROMPT_WORDS):
        return "copies the rewriting prompt's words (rule 4)"
    if equal is True:
        return "no information gain: judged Equal (rule 1)"
    if response is not None:
        words = response.split()
        if "sorry" in response.lower() and len(words) < SORRY_MAX_WORDS:
            return f'the response says "sorry" in under {SORRY_MAX_WORDS} words (rule 2)'
        tokens = re.findall(r"[a-z0-9']+", response.lower())
        if all(t in STOP_WORDS for t in tokens):  # no tokens at all: only punctuation
            return "the response is only punctuation and stop words (rule 3)"
    return None
