"""Kwargs of the demo's instruction types: samplers (what each instruction asks for) and how phrasings render them.

Samplers take ``(rng, query, avoid)`` and draw kwargs a short answer can meet, in IFEval's names;
:func:`render_values` gives phrasing templates the kwargs in words (quoted keyword lists, length bounds
either way round, language names, ordinals). Own code: a few deterministic helpers for
:mod:`posttrain.synth.instruction_types`' table.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from typing import Any

from posttrain.verify.ifeval import LANGUAGES

# -- kwargs --------------------------------------------------------------------------------------

# Kwargs samplers take (rng, query, avoid): ``avoid`` holds the lower-cased words the prompt's other
# instruction already uses (its keywords, forbidden words, end phrase), so that no prompt asks for a
# word and forbids it, or forbids a word of the phrase it must end with.
Sampler = Callable[[random.Random, str, frozenset[str]], dict[str, Any]]

END_PHRASES = (
    "Any other questions?", "Is there anything else I can help with?", "Hope this helps!", "Let me know if you have more questions.",
    "Have a great day!", "That is all for now.", "Good luck!", "Thanks for asking.",
)  # fmt: skip
# Words that fit an answer on any topic (to include), and words an answer is likely to use (to forbid).
TOPIC_FREE_WORDS = (
    "today", "example", "remember", "patience", "habit", "plan", "morning", "friend", "practice", "moment", "choice", "routine",
)  # fmt: skip
LIKELY_WORDS = (
    "very", "really", "just", "also", "important", "good", "great", "best", "always", "easy", "simple", "usually", "quickly", "tips",
)  # fmt: skip
_STOPWORDS = frozenset((
    "about", "after", "also", "away", "before", "best", "better", "does", "doesn", "each", "easiest", "easy", "every", "from", "good",
    "have", "help", "into", "keep", "know", "less", "long", "make", "many", "more", "much", "need", "often", "other", "really", "should",
    "some", "than", "that", "their", "them", "there", "they", "thing", "things", "this", "want", "ways", "what", "when", "where", "which",
    "while", "will", "with", "without", "would", "could", "your", "write", "short", "brief", "quick", "little", "simple",
))  # fmt: skip


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def content_words(query: str) -> list[str]:
    """Words of ``query`` worth asking for or forbidding: alphabetic, 4+ letters, not stop words, in order."""
    seen: list[str] = []
    for word in re.findall(r"[A-Za-z]+", query):
        word = word.lower()
        if len(word) >= 4 and word not in _STOPWORDS and word not in seen:
            seen.append(word)
    return seen


def _pick(rng: random.Random, pool: Iterable[str], avoid: Iterable[str]) -> str:
    avoid = set(avoid)
    return rng.choice([w for w in pool if w not in avoid])


def _existence(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
    own = [w for w in content_words(query) if w not in avoid]
    first = rng.choice(own) if own else _pick(rng, TOPIC_FREE_WORDS, avoid)
    return {"keywords": [first, _pick(rng, TOPIC_FREE_WORDS, avoid | {first})]}


def _forbidden(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
    first = _pick(rng, LIKELY_WORDS, avoid)
    own = [w for w in content_words(query) if w not in avoid and w != first]
    second = rng.choice(own) if own and rng.random() < 0.5 else _pick(rng, LIKELY_WORDS, avoid | {first})
    return {"forbidden_words": [first, second]}


def _frequency(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
    own = [w for w in content_words(query) if w not in avoid]
    keyword = rng.choice(own) if own and rng.random() < 0.6 else _pick(rng, TOPIC_FREE_WORDS, avoid)
    return {"keyword": keyword, "frequency": rng.randint(2, 3), "relation": "at least"}


def _end_phrase(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
    return {"end_phrase": rng.choice([p for p in END_PHRASES if not _words(p) & avoid])}


# Letters counted "at least" N times (common enough that a short answer reaches N with care, rare enough that it
# needs care) and "fewer than" N times (rare: a short answer can avoid them).
COUNTED_LETTERS = "bcdfghklmpwy"
RARE_LETTERS = "jqxz"
# IFEval's response_language asks for many languages; these are ones a small English-first model has seen most.
RESPONSE_LANGUAGES = ("fr", "es", "de", "it", "pt")
# Words a paragraph can open with whatever its topic (length_constraints:nth_paragraph_first_word).
OPENING_WORDS = ("first", "next", "finally", "however", "remember", "overall", "then", "another", "instead", "meanwhile")


def _letter(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
    if rng.random() < 0.5:
        return {"letter": rng.choice(COUNTED_LETTERS), "let_frequency": rng.randint(4, 8), "let_relation": "at least"}
    return {"letter": rng.choice(RARE_LETTERS), "let_frequency": rng.randint(2, 4), "let_relation": "less than"}


def _capital_words(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
    if rng.random() < 0.6:
        return {"capital_frequency": rng.randint(2, 4), "capital_relation": "at least"}
    return {"capital_frequency": rng.randint(4, 6), "capital_relation": "less than"}  # "I" counts: not fewer than 4


def _nth_paragraph(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
    num = rng.randint(2, 3)
    return {"num_paragraphs": num, "nth_paragraph": rng.randint(1, num), "first_word": _pick(rng, OPENING_WORDS, avoid)}


def _fixed(**kwargs: Any) -> Sampler:
    return lambda rng, query, avoid: dict(kwargs)


def _ranged(name: str, low: int, high: int, step: int = 1, **extra: Any) -> Sampler:
    return lambda rng, query, avoid: {name: rng.randrange(low, high + 1, step), **extra}


def _bounded(name: str, *, at_most: tuple[int, int, int], at_least: tuple[int, int, int]) -> Sampler:
    """A length bound, either way round as IFEval asks it: ``relation`` "less than" (thresholds ``at_most``: low,
    high, step) three times in five, else "at least" (``at_least``), each low enough for the demo's token budget."""

    def sample(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
        relation, (low, high, step) = ("less than", at_most) if rng.random() < 0.6 else ("at least", at_least)
        return {name: rng.randrange(low, high + 1, step), "relation": relation}

    return sample


def _quoted(words: list[str], conjunction: str) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" {conjunction} {quoted[-1]}"


def render_values(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What templates can name: the kwargs, keyword lists quoted and joined, and length bounds in words (``*_bound``, ``*_bound_alt``)."""
    values = dict(kwargs)
    if "keywords" in kwargs:
        values["keywords"] = _quoted(kwargs["keywords"], "and")
    if "forbidden_words" in kwargs:
        values["forbidden_words"] = _quoted(kwargs["forbidden_words"], "or")
    for name in ("num_words", "num_sentences"):
        if name in kwargs:  # "fewer than N" / "at most N-1", or "at least N" / "no fewer than N"
            count, below = kwargs[name], kwargs.get("relation") == "less than"
            values[f"{name}_bound"] = f"fewer than {count}" if below else f"at least {count}"
            values[f"{name}_bound_alt"] = f"at most {count - 1}" if below else f"no fewer than {count}"
    for name in ("let_relation", "capital_relation"):
        if name in kwargs:
            values[f"{name}_text"] = "fewer than" if kwargs[name] == "less than" else kwargs[name]
    if "language" in kwargs:
        values["language_name"] = LANGUAGES[kwargs["language"]]
    if "nth_paragraph" in kwargs:
        values["nth_ordinal"] = ("first", "second", "third", "fourth", "fifth")[kwargs["nth_paragraph"] - 1]
    return values


def render(phrasing: str, kwargs: dict[str, Any]) -> str:
    return phrasing.format(**render_values(kwargs))


def kwarg_words(kwargs: dict[str, Any]) -> frozenset[str]:
    """The lower-cased words of ``kwargs``' strings (keywords, forbidden words, end phrase): the ``avoid`` set that a
    prompt's later instructions' kwargs samplers (:attr:`InstructionType.sample`) must keep clear of."""
    words: set[str] = set()
    for value in kwargs.values():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                words |= _words(text)
    return frozenset(words)
