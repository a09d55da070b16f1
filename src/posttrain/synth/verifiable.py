"""Verifiable prompts: everyday queries with IFEval-style instructions, split so that held-out prompts are new.

AutoIF (Dong et al., 2024, arXiv 2406.13542) pairs user queries with instructions a program can
check. Here the queries are ours (``data/queries.txt``, ~300 short everyday requests written for this
project), the checks are posttrain's IFEval verifiers (:mod:`posttrain.verify.ifeval`, same ids and
kwargs as IFEval), and the instruction texts are ours: several phrasings per type, some used only in
training and others only in evaluation, so the held-out score measures following an instruction
phrased in a way never trained on, about a query never trained on. Own code, no library: it is a
small, deterministic table plus a round robin.

- :func:`split_queries`: queries split train / held-out by a hash of their text (about 1 in 5 held
  out), so the split is the same on every machine and survives edits to other lines.
- :func:`build_prompts`: IFEval-format records (``key``, ``prompt``, ``instruction_id_list``,
  ``kwargs``), 1 to ``max_instructions`` instructions per prompt (default 2: about half each), types spread evenly, never two
  conflicting types (:data:`CONFLICTS`). Deterministic for a seed; a prefix of a longer build.
- :data:`TYPES`: the instruction types with their phrasings and kwargs samplers; :func:`type_label` and
  :func:`describe` name them for people.

``posttrain demo`` builds its training and held-out prompts here (its fixed IFEval subset is its own:
:mod:`posttrain.demo.ifeval_subset`).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from functools import cache
from importlib.resources import files
from typing import Any

from posttrain.synth.instruction_kwargs import content_words, kwarg_words, render, render_values  # noqa: F401 — as callers know them
from posttrain.synth.instruction_types import TYPE_BY_ID, TYPES, InstructionType, Split, describe, type_label  # noqa: F401

SPLITS: tuple[Split, ...] = ("train", "heldout", "test")

HELDOUT_EVERY = 5  # a query is held out when the hash of its text is 0 modulo this (~20%)

# -- queries -------------------------------------------------------------------------------------


def _data_text(name: str) -> str:
    return files("posttrain.synth").joinpath("data", name).read_text(encoding="utf-8")


def is_heldout(query: str) -> bool:
    """Whether ``query`` is a held-out query: the first 8 bytes of its UTF-8 SHA-256, mod :data:`HELDOUT_EVERY`, are 0."""
    return int.from_bytes(hashlib.sha256(query.encode("utf-8")).digest()[:8], "big") % HELDOUT_EVERY == 0


@cache
def queries() -> tuple[str, ...]:
    """The built-in everyday queries, in file order (blank lines skipped; duplicates are an error)."""
    lines = [line.strip() for line in _data_text("queries.txt").splitlines() if line.strip()]
    repeated = [q for q, count in Counter(lines).items() if count > 1]
    if repeated:
        raise ValueError(f"queries.txt repeats {len(repeated)} queries, first {repeated[0]!r}")
    return tuple(lines)


@cache
def test_queries() -> tuple[str, ...]:
    """The frozen test split's queries (``data/test_queries.txt``): written apart from ``queries.txt``, none of
    them in it, and never used to choose a preset or a hyperparameter (only scored)."""
    lines = [line.strip() for line in _data_text("test_queries.txt").splitlines() if line.strip()]
    known = {q.lower() for q in queries()}
    shared = [q for q in lines if q.lower() in known]
    if shared or len(set(lines)) != len(lines):
        raise ValueError(f"test_queries.txt must hold distinct queries not in queries.txt; {len(shared)} shared, first {shared[:1]}")
    return tuple(lines)


def split_queries() -> dict[Split, tuple[str, ...]]:
    """``{"train": ..., "heldout": ..., "test": ...}``, each in file order. Train and held-out (the development
    split: presets were tuned on it) divide ``queries.txt`` by hash; test comes from its own file."""
    return {
        "train": tuple(q for q in queries() if not is_heldout(q)),
        "heldout": tuple(q for q in queries() if is_heldout(q)),
        "test": test_queries(),
    }


# -- which types share a prompt ----------------------------------------------------------------

_JSON_CONFLICTS = (
    "detectable_format:title", "detectable_format:number_bullet_lists", "startend:quotation", "startend:end_checker",
    "detectable_content:postscript", "detectable_format:number_highlighted_sections", "detectable_content:number_placeholders",
    "punctuation:no_comma", "length_constraints:number_sentences", "length_constraints:number_paragraphs",
    "length_constraints:nth_paragraph_first_word", "detectable_format:multiple_sections", "combination:two_responses",
    "combination:repeat_prompt", "detectable_format:constrained_response",
)  # fmt: skip
_CASES = ("change_case:english_lowercase", "change_case:english_capital")
_PARAGRAPHS = ("length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word")


def _pairs(reason: str, *groups: tuple[str, ...]) -> dict[frozenset[str], str]:
    """Every pair across ``groups[0]`` and each later group, with ``reason``."""
    return {frozenset((a, b)): reason for a in groups[0] for group in groups[1:] for b in group if a != b}


_NEWER_CONFLICTS: dict[frozenset[str], str] = {
    **_pairs("English words or an English sentence in a reply in another language", ("language:response_language",),
             _CASES, ("startend:end_checker", "keywords:existence", "keywords:frequency", "combination:repeat_prompt",
                      "detectable_format:constrained_response")),
    **_pairs("the fixed answers and section markers are case-sensitive", ("detectable_format:constrained_response",
             "detectable_format:multiple_sections"), _CASES),
    **_pairs("a capital-word count meets a whole-response case", ("change_case:capital_word_frequency",), _CASES),
    **_pairs("two ways to divide paragraphs, or parts that are not paragraphs", _PARAGRAPHS, _PARAGRAPHS,
             ("combination:two_responses", "length_constraints:number_sentences")),
    **_pairs("a title, a postscript, sections, a list or a repeated request count as paragraphs",
             ("length_constraints:nth_paragraph_first_word",), ("detectable_format:title", "detectable_content:postscript",
             "detectable_format:multiple_sections", "combination:repeat_prompt", "detectable_format:number_bullet_lists")),
    **_pairs("which of the two responses should carry it is unclear", ("combination:two_responses",),
             ("startend:quotation", "detectable_format:number_bullet_lists", "length_constraints:number_sentences",
              "combination:repeat_prompt", "detectable_format:constrained_response")),
    **_pairs("the repeated request must come first and keep its own words and commas", ("combination:repeat_prompt",),
             ("startend:quotation", "punctuation:no_comma", "keywords:forbidden_words", "detectable_format:title",
              "detectable_format:multiple_sections", "keywords:letter_frequency")),
    **_pairs("the other instruction's words may hold the counted letter", ("keywords:letter_frequency",),
             ("keywords:existence", "keywords:frequency", "startend:end_checker")),
}  # fmt: skip
#: Pairs never combined in one prompt, each with the reason.
CONFLICTS: dict[frozenset[str], str] = {
    frozenset(("change_case:english_lowercase", "change_case:english_capital")): "a response cannot be all lowercase and all capitals",
    **{frozenset(("detectable_format:json_format", other)): "text outside or inside the JSON that JSON cannot hold" for other in _JSON_CONFLICTS},
    frozenset(("startend:quotation", "startend:end_checker")): "two demands on how the response ends",
    frozenset(("startend:quotation", "detectable_format:number_bullet_lists")): "the opening quote hides the first bullet",
    frozenset(("detectable_content:postscript", "startend:end_checker")): "both want the last word",
    frozenset(("detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections")): "a line starting *highlight* counts as a bullet",
    frozenset(("detectable_format:number_bullet_lists", "length_constraints:number_sentences")): "each bullet is a sentence, so the counts fight",
    **_NEWER_CONFLICTS,
}  # fmt: skip


def conflicts(a: str, b: str) -> bool:
    """Whether instruction types ``a`` and ``b`` may not share a prompt (a type never pairs with itself)."""
    return a == b or frozenset((a, b)) in CONFLICTS


# -- prompts -------------------------------------------------------------------------------------


def build_prompts(
    split: Split, n: int, seed: int, max_instructions: int = 2, types: list[str] | None = None, *, parts: bool = False
) -> list[dict[str, Any]]:
    """``n`` IFEval-format prompts for ``split``: a query of that split, then instruction phrasings of that split.

    Prompts cycle through 1, 2, ..., ``max_instructions`` instructions (with the default 2: half one,
    half two; fewer where the types left all conflict with those picked). Each instruction slot
    takes a least-used type so far (ties broken at random) that conflicts with none already
    picked for the prompt; phrasings of a type are used in turn, queries in a seeded shuffled order. Records are
    ``{"key", "prompt", "instruction_id_list", "kwargs"}``, as :class:`posttrain.records.PromptRecord`
    reads them. The same arguments give the same records on any machine, and a build of ``n`` is the
    first ``n`` records of any longer build with the same seed. ``parts``: also ``"query"`` and
    ``"instruction"`` (the text after the query: every phrase), which steering's fit and InstABoost need.
    """
    problems = []
    if split not in SPLITS:
        problems.append(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        problems.append(f"n must be >= 0, got {n}")
    if max_instructions < 1:
        problems.append(f"max_instructions must be >= 1, got {max_instructions}")
    chosen = list(TYPE_BY_ID) if types is None else list(dict.fromkeys(types))
    unknown = [t for t in chosen if t not in TYPE_BY_ID]
    if unknown:
        problems.append(f"unknown instruction types {unknown}; the known types are {list(TYPE_BY_ID)}")
    if not chosen:
        problems.append("types must name at least one instruction type")
    if problems:
        raise ValueError("build_prompts: " + "; ".join(problems))

    # str seeds hash the same everywhere. The seed string and the keys below keep the names they had in
    # posttrain.demo.prompts: the same arguments must give the same records (the demo's cached stages hold them).
    rng = random.Random(f"posttrain-demo-prompts:{split}:{seed}")
    pool = list(split_queries()[split])
    rng.shuffle(pool)
    uses = Counter({t: 0 for t in chosen})
    turn = {t: rng.randrange(len(TYPE_BY_ID[t].phrasings(split))) for t in chosen}

    def least_used(allowed: list[str]) -> str:
        low = min(uses[t] for t in allowed)
        return rng.choice([t for t in allowed if uses[t] == low])

    records = []
    for index in range(n):
        query = pool[index % len(pool)]
        picked = [least_used(chosen)]
        for _ in range(index % max_instructions):
            allowed = [t for t in chosen if not any(conflicts(t, p) for p in picked)]
            if not allowed:
                break
            picked.append(least_used(allowed))
        phrases, all_kwargs, avoid = [], [], frozenset[str]()
        for type_id in picked:
            kind = TYPE_BY_ID[type_id]
            kwargs = kind.sample(rng, query, avoid)
            avoid |= kwarg_words(kwargs)
            phrasings = kind.phrasings(split)
            phrases.append(render(phrasings[turn[type_id] % len(phrasings)], kwargs))
            turn[type_id] += 1
            uses[type_id] += 1
            all_kwargs.append(kwargs)
        record = {
            "key": f"demo-{split}-{seed}-{index:04d}",
            "prompt": " ".join([query, *phrases]),
            "instruction_id_list": picked,
            "kwargs": all_kwargs,
        }
        if parts:
            record |= {"query": query, "instruction": " ".join(phrases)}
        records.append(record)
    return records
