"""AutoIF's steps as functions over text and sandbox results (Dong et al., 2024, arXiv 2406.13542; QwenLM/AutoIF).

What a teacher writes goes through these, in this order (``posttrain synth autoif`` runs them as stages:
:mod:`posttrain.synth.autoif_run`):

1. :func:`parse_instructions`: new instructions out of an augmentation reply, near-duplicates of the pool
   dropped (:func:`near_duplicate`: word-set Jaccard similarity ≥ ``0.6``, or equal after normalising);
2. :func:`parse_function_reply`: ``{"func": ..., "cases": [{"input", "output"}]}`` out of a reply (a
   fenced ``json`` block, or the first JSON object, or the same written as a Python dict literal, read
   by :func:`ast.literal_eval`; a fenced ``python`` block with ``def evaluate`` as a function without
   cases); outputs ``true``/``false`` as booleans or those words;
3. :func:`cross_validate`: at least ``min_functions`` distinct functions that compile and ``min_cases``
   distinct cases; keep a case when some function agrees with its label; keep a function whose accuracy
   on the kept cases is at least ``min_accuracy``; the instruction is dropped when none is kept. These
   are AutoIF's code's rules (3, 10, 0.8; its paper says > 0.5 and its Fig. 4 peaks at 0.8);
4. :func:`parse_contradiction`: the teacher's yes/no on whether a back-translated instruction contradicts
   the original (AutoIF uses an mDeBERTa NLI model, which this project cannot download);
5. :func:`compose`: query and instruction as one user message (AutoIF's SFT construction);
6. :func:`pass_rates`: the share of an instruction's functions that return ``True`` on each response;
7. :func:`parse_score`: ``Score: n`` from a quality judgement;
8. :func:`dpo_pairs`: chosen pass rate ≥ 0.5, rejected 0; 2×2 pairs when either side has two distinct
   responses, else 1×1 (AutoIF's ``2_dpo_data_query_construct``).

Departures from AutoIF's code, each on the safe side: functions run in :mod:`posttrain.verify.sandbox`
(AutoIF: ``exec`` in-process under ``signal.alarm``) and only a returned ``True``/``False`` counts (AutoIF
compares with ``==`` and converts with ``int()``, so a function returning ``"true"`` scores there); every
reply of a function-generation request is parsed (AutoIF's cross-validation script parses only the last
reply of each instruction, an indentation slip); a function that fails on a case counts as wrong on it.
Own code: these are AutoIF's rules, small and exact, and no library implements them.
"""

from __future__ import annotations

import ast
import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.verify.sandbox import CheckResult, Sandbox

MIN_FUNCTIONS = 3
MIN_CASES = 10
MIN_ACCURACY = 0.8
NEAR_DUPLICATE = 0.6  # word-set Jaccard similarity at which a new instruction repeats one in the pool
CHOSEN_MIN_RATE = 0.5
QUALITY_MIN_SCORE = 8.0

# -- instructions -------------------------------------------------------------------------------

_LIST_ITEM = re.compile(r"^\s*(?:\d{1,3}\s*[.):]|[-*•])\s*(.+?)\s*$")
_WORD = re.compile(r"[a-z0-9]+")


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def near_duplicate(a: str, b: str, threshold: float = NEAR_DUPLICATE) -> bool:
    """Equal after lower-casing and dropping punctuation, or word sets with Jaccard similarity ≥ ``threshold``."""
    wa, wb = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    if normalise(a) == normalise(b):
        return True
    return bool(wa and wb) and len(wa & wb) / len(wa | wb) >= threshold


@dataclass
class Parsed:
    """Instructions out of replies, and what was dropped, by reason."""

    kept: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, text: str) -> None:
        self.dropped.setdefault(reason, []).append(text)


def parse_instructions(replies: Sequence[str], pool: Sequence[str], *, min_words: int = 3, max_words: int = 40) -> Parsed:
    """New instructions from augmentation replies (numbered or bulleted lines), none a near-duplicate of ``pool`` or of each other."""
    parsed, seen = Parsed(), list(pool)
    for reply in replies:
        for line in reply.splitlines():
            match = _LIST_ITEM.match(line)
            if not match:
                continue
            text = match.group(1).strip().strip('"').strip()
            words = len(text.split())
            if words < min_words or words > max_words:
                parsed.drop(f"not {min_words}-{max_words} words", text)
            elif not text.isascii():
                parsed.drop("not ASCII", text)
            elif any(near_duplicate(text, other) for other in seen):
                parsed.drop("near-duplicate", text)
            else:
                parsed.kept.append(text)
                seen.append(text)
    return parsed


# -- functions and cases ------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionReply:
    """What one function-generation reply gave: the function (or None) and its cases, or why nothing."""

    function: str | None
    cases: tuple[tuple[str, bool], ...] = ()
    problem: str | None = None
    bad_cases: int = 0


_FENCE = re.compile(r"```(\w*)\s*\n(.*?)```", re.DOTALL)


def _json_objects(text: str) -> list[Any]:
    decoder, found, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except (json.JSONDecodeError, RecursionError):
            i += 1
            continue
        found.append(value)
        i = end
    return found


def _python_dicts(text: str) -> list[Any]:
    """Dict literals written as Python (``True``, single quotes), read with :func:`ast.literal_eval` (which evaluates nothing)."""
    found, i = [], 0
    while (i := text.find("{", i)) != -1:
        depth, quote, j = 0, None, i
        while j < len(text):
            ch = text[j]
            if quote:
                if ch == "\\":
                    j += 1
                elif ch == quote:
                    quote = None
            elif ch in "'\"":
                quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        try:
            value = ast.literal_eval(text[i : j + 1])
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # e.g. {{"a": 1}}: a set of dicts
            i += 1
            continue
        found.append(value)
        i = j + 1
    return found


def _label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def parse_function_reply(reply: str) -> FunctionReply:
    """The ``evaluate`` function and test cases of one reply (see the module docstring for what is accepted)."""
    fences = _FENCE.findall(reply)
    candidates = [body for lang, body in fences if lang.lower() == "json"] + [reply]
    objects = (o for text in candidates for find in (_json_objects, _python_dicts) for o in find(text))
    obj = next((o for o in objects if isinstance(o, dict) and isinstance(o.get("func"), str)), None)
    if obj is None:
        code = next((body for lang, body in fences if lang.lower() in ("python", "py", "") and "def evaluate" in body), None)
        if code is None:
            return FunctionReply(None, problem="no JSON object with a 'func' string, nor a python block defining evaluate")
        return FunctionReply(code.strip() + "\n")
    function = obj["func"]
    if "\\n" in function and "\n" not in function:  # AutoIF's prompt asks for \n escapes; some replies double them
        function = function.replace("\\n", "\n")
    cases, bad = [], 0
    raw_cases = obj.get("cases")
    for case in raw_cases if isinstance(raw_cases, list) else []:
        label = _label(case.get("output")) if isinstance(case, dict) else None
        if label is None or not isinstance(case.get("input"), str):
            bad += 1
            continue
        cases.append((case["input"], label))
    return FunctionReply(function.strip() + "\n", tuple(cases), None, bad)


@dataclass
class CrossValidation:
    """One instruction's cross-validation: the functions and cases kept (with each function's accuracy), or why it was dropped."""

    instruction: str
    functions: list[str]  # distinct functions that compile
    cases: list[tuple[str, bool]]  # distinct cases
    kept_cases: list[tuple[str, bool]] = field(default_factory=list)
    kept: list[tuple[str, float]] = field(default_factory=list)  # (function, accuracy on the kept cases)
    dropped: str | None = None


def cross_validate(
    instruction: str,
    functions: Sequence[str],
    cases: Sequence[tuple[str, bool]],
    sandbox: Sandbox,
    *,
    min_functions: int = MIN_FUNCTIONS,
    min_cases: int = MIN_CASES,
    min_accuracy: float = MIN_ACCURACY,
) -> CrossValidation:
    """AutoIF's cross-validation of ``functions`` (already compiled) against ``cases`` (both deduplicated here, order kept)."""
    functions, cases = list(dict.fromkeys(functions)), list(dict.fromkeys(cases))
    result = CrossValidation(instruction, functions, cases)
    if len(functions) < min_functions or len(cases) < min_cases:
        result.dropped = f"{len(functions)} functions and {len(cases)} cases (needs {min_functions} and {min_cases})"
        return result
    verdicts = sandbox.run_many([(f, [text for text, _ in cases]) for f in functions])
    right = [[r.result is label for r, (_, label) in zip(per_function, cases)] for per_function in verdicts]
    keep_case = [any(row[c] for row in right) for c in range(len(cases))]
    result.kept_cases = [case for case, keep in zip(cases, keep_case) if keep]
    for function, row in zip(functions, right):
        scored = [ok for ok, keep in zip(row, keep_case) if keep]
        accuracy = sum(scored) / len(scored) if scored else 0.0
        if accuracy >= min_accuracy:
            result.kept.append((function, accuracy))
    if not result.kept:
        result.dropped = f"no function reaches accuracy {min_accuracy} on the {len(result.kept_cases)} kept cases"
    return result


# -- back-translation, queries, responses -------------------------------------------------------


def parse_contradiction(reply: str) -> bool | None:
    """True for a reply that says the two instructions contradict ("yes"), False for "no", None when it says neither first."""
    match = re.search(r"\b(yes|no)\b", reply.lower())
    return None if match is None else match.group(1) == "yes"


def compose(query: str, instruction: str) -> str:
    """The user message: the query, then the instruction as a sentence (AutoIF's ``9_sft_data_construction``)."""
    query, instruction = query.strip(), instruction.strip().rstrip(".")
    query = query[:1].upper() + query[1:]
    instruction = instruction[:1].upper() + instruction[1:]
    joiner = " " if query.endswith(("?", ".", "!")) else ". "
    return f"{query}{joiner}{instruction}."


def pass_rates(results: Sequence[Sequence[CheckResult]]) -> list[float]:
    """Per response, the share of functions whose result *is* True (``results[f][r]``: function f on response r)."""
    if not results:
        return []
    n = len(results[0])
    return [sum(per_function[r].passed for per_function in results) / len(results) for r in range(n)]


def parse_score(reply: str) -> float | None:
    """The last ``Score: n`` (0-10) of a quality judgement, or None."""
    found = re.findall(r"score\s*[:=]\s*(\d+(?:\.\d+)?)", reply, flags=re.IGNORECASE)
    if not found:
        return None
    value = float(found[-1])
    return value if 0 <= value <= 10 else None


def dpo_pairs(scored: Sequence[tuple[str, float]], rng: random.Random, *, chosen_min: float = CHOSEN_MIN_RATE) -> list[tuple[str, str]]:
    """(chosen, rejected) pairs from (response, pass rate): chosen rate ≥ ``chosen_min``, rejected 0, distinct non-empty texts.

    Two of each side (4 pairs) when either side has at least two, else one of each; none when a side is empty.
    """
    positive = list(dict.fromkeys(text for text, rate in scored if rate >= chosen_min and text.strip()))
    negative = list(dict.fromkeys(text for text, rate in scored if rate == 0 and text.strip()))
    if not positive or not negative:
        return []
    each = 2 if len(positive) >= 2 or len(negative) >= 2 else 1
    chosen = rng.sample(positive, min(each, len(positive)))
    rejected = rng.sample(negative, min(each, len(negative)))
    return list(itertools.product(chosen, rejected))
