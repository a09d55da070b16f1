"""Verifiable prompts (synth/verifiable.py): split, determinism, disjointness, validity, conflicts, balance, and
phrasings that say what their kwargs check (against the real verifiers)."""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from posttrain.data.prompts import read_prompts
from posttrain.records import write_jsonl
from posttrain.synth import verifiable as vp
from posttrain.verify import registry
from posttrain.verify.scoring import PromptRecord, aggregate, read_prompt_records, score_responses, verifiers_of

REQUIRED_TYPES = {
    "change_case:english_lowercase", "change_case:english_capital", "punctuation:no_comma", "startend:end_checker",
    "startend:quotation", "detectable_format:title", "detectable_content:postscript", "detectable_format:json_format",
    "detectable_format:number_bullet_lists", "keywords:existence", "keywords:forbidden_words", "length_constraints:number_words",
    "detectable_format:number_highlighted_sections", "detectable_content:number_placeholders", "length_constraints:number_sentences",
    "keywords:frequency", "keywords:letter_frequency", "language:response_language", "length_constraints:number_paragraphs",
    "length_constraints:nth_paragraph_first_word", "detectable_format:constrained_response", "detectable_format:multiple_sections",
    "combination:two_responses", "combination:repeat_prompt", "change_case:capital_word_frequency",
}  # fmt: skip


def test_types_are_all_of_ifevals() -> None:
    from posttrain.verify.ifeval import IFEVAL_VERIFIERS

    assert len(REQUIRED_TYPES) == 25 and REQUIRED_TYPES == {v.id for v in IFEVAL_VERIFIERS}


@pytest.fixture(scope="module")
def train() -> list[dict[str, Any]]:
    return vp.build_prompts("train", 300, seed=0)


@pytest.fixture(scope="module")
def heldout() -> list[dict[str, Any]]:
    return vp.build_prompts("heldout", 150, seed=0)


# -- queries -------------------------------------------------------------------------------------


def test_queries_split_by_a_hash_of_their_text() -> None:
    # Pinned verdicts: the split must not change with the machine, the Python hash seed or the file's order.
    assert vp.is_heldout("How do I fix a dripping faucet?") is True
    assert vp.is_heldout("Why is the sky blue?") is False
    assert vp.is_heldout("How far away is the Moon?") is False
    split = vp.split_queries()
    assert len(vp.queries()) >= 280
    assert len(split["train"]) + len(split["heldout"]) == len(vp.queries())
    assert not set(split["train"]) & set(split["heldout"])
    assert 0.15 <= len(split["heldout"]) / len(vp.queries()) <= 0.3
    assert all(vp.is_heldout(q) for q in split["heldout"]) and not any(vp.is_heldout(q) for q in split["train"])


# -- building ------------------------------------------------------------------------------------


def test_build_is_deterministic_and_prefix_stable() -> None:
    first = vp.build_prompts("heldout", 40, seed=3)
    assert first == vp.build_prompts("heldout", 40, seed=3)
    assert vp.build_prompts("heldout", 15, seed=3) == first[:15]
    assert vp.build_prompts("heldout", 40, seed=4) != first
    assert len({r["key"] for r in first}) == 40


def _template_pattern(phrasing: str) -> re.Pattern[str]:
    """A regex matching any rendering of ``phrasing`` (each placeholder matches anything on one line)."""
    parts = [re.escape(literal) + ("[^\n]+?" if name else "") for literal, name, _, _ in string.Formatter().parse(phrasing)]
    return re.compile("".join(parts))


def test_train_and_heldout_share_no_query_and_no_phrasing(train: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> None:
    split = vp.split_queries()
    train_text, heldout_text = "\n".join(r["prompt"] for r in train), "\n".join(r["prompt"] for r in heldout)
    assert not [q for q in split["heldout"] if q in train_text]
    assert not [q for q in split["train"] if q in heldout_text]
    for kind in vp.TYPES:
        assert not set(kind.train) & set(kind.heldout), kind.id
        for phrasing in kind.heldout:
            assert not _template_pattern(phrasing).search(train_text), f"held-out phrasing found in a train prompt: {phrasing!r}"
        for phrasing in kind.train:
            assert not _template_pattern(phrasing).search(heldout_text), f"train phrasing found in a held-out prompt: {phrasing!r}"
    # and each side really uses its own phrasings, every one of them
    for kind in vp.TYPES:
        for phrasing in kind.train:
            assert _template_pattern(phrasing).search(train_text), f"train phrasing never used: {phrasing!r}"
        for phrasing in kind.heldout:
            assert _template_pattern(phrasing).search(heldout_text), f"held-out phrasing never used: {phrasing!r}"


def test_the_frozen_test_split_shares_no_query_and_no_phrasing_with_the_others(
    train: list[dict[str, Any]], heldout: list[dict[str, Any]]
) -> None:
    """The test split's queries come from their own file and its phrasings from their own tuples: nothing of it is in
    a train or development prompt, nothing of theirs in a test prompt, and every test phrasing is used."""
    split = vp.split_queries()
    assert len(split["test"]) >= 48 and not set(split["test"]) & set(vp.queries())
    test = vp.build_prompts("test", 150, seed=0)
    test_text, other_text = "\n".join(r["prompt"] for r in test), "\n".join(r["prompt"] for r in train + heldout)
    assert all(any(r["prompt"].startswith(q) for q in split["test"]) for r in test)
    assert not [q for q in split["test"] if q in other_text]
    for kind in vp.TYPES:
        assert len(kind.test) >= 2 and not set(kind.test) & set(kind.train + kind.heldout), kind.id
        for phrasing in kind.test:
            assert not _template_pattern(phrasing).search(other_text), f"test phrasing found in a train or development prompt: {phrasing!r}"
            assert _template_pattern(phrasing).search(test_text), f"test phrasing never used: {phrasing!r}"
        for phrasing in kind.train + kind.heldout:
            assert not _template_pattern(phrasing).search(test_text), f"train or development phrasing found in a test prompt: {phrasing!r}"
    assert {t for r in test for t in r["instruction_id_list"]} == set(vp.TYPE_BY_ID)


def test_records_are_valid_ifeval_prompts_every_reader_accepts(
    train: list[dict[str, Any]], heldout: list[dict[str, Any]], tmp_path: Path
) -> None:
    for record in train + heldout:
        assert set(record) == {"key", "prompt", "instruction_id_list", "kwargs"}
        parsed = PromptRecord.model_validate(record)
        assert [v.id for v in verifiers_of(parsed)] == record["instruction_id_list"]
        for type_id, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
            registry.get(type_id, **kwargs)
    path = tmp_path / "heldout.jsonl"
    write_jsonl(path, heldout)
    loaded = read_prompts(path, validate=verifiers_of)  # posttrain label / grpo's reader
    assert [p.verifiable.instruction_id_list for p in loaded if p.verifiable] == [r["instruction_id_list"] for r in heldout]
    records = read_prompt_records(path)  # posttrain eval ifeval's reader
    scores = aggregate(score_responses(records, {r.prompt: "a plain reply, all in lowercase." for r in records}))
    assert scores.num_prompts == len(heldout)
    assert scores.per_type["change_case:english_lowercase"].strict == 1.0
    assert scores.per_type["change_case:english_capital"].strict == 0.0


def test_types_cover_the_brief_with_enough_phrasings() -> None:
    assert REQUIRED_TYPES <= set(vp.TYPE_BY_ID)
    for kind in vp.TYPES:
        assert len(set(kind.train + kind.heldout)) >= 4 and len(kind.heldout) >= 1 and len(kind.train) >= 2, kind.id
        assert vp.type_label(kind.id) == kind.label and kind.label
    assert vp.type_label("no_such:type") == "no_such:type"
    assert [row["id"] for row in vp.describe()] == [t.id for t in vp.TYPES]


def test_no_prompt_combines_conflicting_types_or_clashing_words(train: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> None:
    assert vp.conflicts("change_case:english_lowercase", "change_case:english_capital")
    assert vp.conflicts("startend:quotation", "startend:end_checker")
    # word-carrying types only, so that forbidden words meet keywords and end phrases often
    worded = ["keywords:forbidden_words", "keywords:existence", "keywords:frequency", "startend:end_checker"]
    for record in train + heldout + vp.build_prompts("train", 400, seed=5, types=worded):
        ids = record["instruction_id_list"]
        assert len(set(ids)) == len(ids)
        assert not any(vp.conflicts(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :]), ids
        for i, kwargs in enumerate(record["kwargs"]):
            others = [vp.kwarg_words(k) for j, k in enumerate(record["kwargs"]) if j != i]
            if "forbidden_words" in kwargs and others:
                assert not set(kwargs["forbidden_words"]) & set().union(*others), record["prompt"]


def test_types_are_spread_evenly_and_instruction_counts_mixed() -> None:
    records = vp.build_prompts("heldout", 112, seed=0)  # 168 instructions over 25 types
    per_type = Counter(t for r in records for t in r["instruction_id_list"])
    assert set(per_type) == set(vp.TYPE_BY_ID)
    assert min(per_type.values()) >= 5, per_type
    assert max(per_type.values()) - min(per_type.values()) <= 2, per_type
    sizes = Counter(len(r["instruction_id_list"]) for r in records)
    assert sizes[1] == sizes[2] == 56
    assert all(len(r["instruction_id_list"]) == 1 for r in vp.build_prompts("train", 20, seed=0, max_instructions=1))
    three = vp.build_prompts("train", 60, seed=0, max_instructions=3)
    assert Counter(len(r["instruction_id_list"]) for r in three) == {1: 20, 2: 20, 3: 20}
    for record in three:
        ids = record["instruction_id_list"]
        assert not any(vp.conflicts(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :]), ids


def test_types_argument_restricts_and_is_validated() -> None:
    only = ["punctuation:no_comma", "startend:quotation"]
    records = vp.build_prompts("train", 10, seed=1, types=only)
    assert {t for r in records for t in r["instruction_id_list"]} == set(only)
    clashing = vp.build_prompts("train", 6, seed=1, types=["change_case:english_lowercase", "change_case:english_capital"])
    assert all(len(r["instruction_id_list"]) == 1 for r in clashing)  # a conflicting pair never shares a prompt
    with pytest.raises(ValueError, match="unknown instruction types.*no_such:type"):
        vp.build_prompts("train", 5, seed=0, types=["no_such:type"])
    with pytest.raises(ValueError, match="max_instructions must be >= 1"):
        vp.build_prompts("train", 5, seed=0, max_instructions=0)
    with pytest.raises(ValueError, match="split must be one of"):
        vp.build_prompts("dev", 5, seed=0)  # type: ignore[arg-type]


# -- phrasings say what the verifiers check ------------------------------------------------------

# A stated count in a rendered phrasing: ("less than" | "at least" | "exactly", threshold as IFEval's kwargs put it).
_STATED = re.compile(
    r"(?P<lt>fewer than|less than|under|shorter than) (?P<a>\d+)|(?P<le>at most|no more than) (?P<b>\d+)"
    r"|(?:at least|no fewer than) (?P<c>\d+)|(?P<d>\d+) or more|(?:exactly|precisely) (?P<e>\d+)"
)


def _stated(text: str) -> tuple[str, int]:
    found = list(_STATED.finditer(text))
    assert len(found) == 1, f"expected one stated count in {text!r}, found {[m.group(0) for m in found]}"
    m = found[0]
    if m["a"]:
        return "less than", int(m["a"])
    if m["b"]:
        return "less than", int(m["b"]) + 1
    if m["c"] or m["d"]:
        return "at least", int(m["c"] or m["d"])
    return "exactly", int(m["e"])


# Per counted type: the kwarg holding the threshold, the comparison its verifier makes ("relation": the kwarg's own),
# and a response holding exactly ``count`` of the thing counted.
_COUNTED = {
    "length_constraints:number_words": ("num_words", "relation", lambda count, k: " ".join(["word"] * count)),
    "length_constraints:number_sentences": ("num_sentences", "relation", lambda count, k: " ".join(["This is a sentence."] * count)),
    "keywords:frequency": ("frequency", "relation", lambda count, k: " ".join([k["keyword"]] * count) + " done."),
    "detectable_format:number_bullet_lists": (
        "num_bullets",
        "exactly",
        lambda count, k: "Here:\n" + "\n".join(f"* item {i}" for i in range(count)),
    ),
    "detectable_format:number_highlighted_sections": (
        "num_highlights",
        "at least",
        lambda count, k: "Text " + " ".join(f"*part {i}*" for i in range(count)),
    ),
    "detectable_content:number_placeholders": (
        "num_placeholders",
        "at least",
        lambda count, k: "Text " + " ".join(f"[slot {i}]" for i in range(count)),
    ),
    "keywords:letter_frequency": ("let_frequency", "let_relation", lambda count, k: " ".join([k["letter"]] * count)),
    "change_case:capital_word_frequency": (
        "capital_frequency",
        "capital_relation",
        lambda count, k: " ".join(["NOTE"] * count) + " and done.",
    ),
    "length_constraints:number_paragraphs": ("num_paragraphs", "exactly", lambda count, k: "\n***\n".join(["Some text."] * count)),
    "length_constraints:nth_paragraph_first_word": (
        "num_paragraphs",
        "exactly",
        lambda count, k: "\n\n".join(f"{k['first_word'].title() if i + 1 == k['nth_paragraph'] else 'Plain'} text." for i in range(count)),
    ),
    "detectable_format:multiple_sections": (
        "num_sections",
        "at least",
        lambda count, k: "\n".join(f"{k['section_spliter']} {i + 1}\nSome text." for i in range(count)),
    ),
}


@pytest.mark.parametrize("type_id", sorted(_COUNTED))
def test_counted_phrasings_state_the_threshold_their_verifier_checks(type_id: str) -> None:
    """Render every phrasing: the count it states is the kwargs' count, and the real verifier passes and fails the boundary responses."""
    kind = vp.TYPE_BY_ID[type_id]
    name, comparison, make = _COUNTED[type_id]
    for phrasing in kind.train + kind.heldout + kind.test:
        for seed in range(6):
            kwargs = kind.sample(random.Random(seed), "How do I keep basil alive on a windowsill?", frozenset())
            relation, threshold = _stated(vp.render(phrasing, kwargs))
            assert (relation, threshold) == (kwargs.get(comparison, comparison), kwargs[name]), (phrasing, kwargs)
            good, bad = {"less than": (threshold - 1, threshold), "at least": (threshold, threshold - 1)}.get(
                relation, (threshold, threshold + 1)
            )
            verifier = registry.get(type_id, **kwargs)
            assert verifier.check(make(good, kwargs)).passed, (phrasing, kwargs, good)
            assert not verifier.check(make(bad, kwargs)).passed, (phrasing, kwargs, bad)


# Per uncounted type: kwargs, a response that follows the instruction and one that does not.
_CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    "change_case:english_lowercase": (
        {},
        "water your basil in the morning and give it plenty of sunlight every day.",
        "Water your basil in the morning and give it plenty of sunlight every day.",
    ),
    "change_case:english_capital": (
        {},
        "WATER YOUR BASIL IN THE MORNING AND GIVE IT PLENTY OF SUNLIGHT EVERY DAY.",
        "WATER YOUR BASIL IN THE MORNING and give it plenty of sunlight every day.",
    ),
    "punctuation:no_comma": ({}, "Water it daily and keep it warm.", "Water it daily, and keep it warm."),
    "startend:end_checker": ({"end_phrase": "Hope this helps!"}, "Water it daily. Hope this helps!", "Hope this helps! Water it daily."),
    "startend:quotation": ({}, '"Water it daily."', 'Water it "daily".'),
    "detectable_format:title": ({}, "<<Basil Care>>\nWater it daily.", "Basil Care\nWater it daily."),
    "detectable_content:postscript": (
        {"postscript_marker": "P.P.S"},
        "Water it daily.\n\nP.P.S Pinch the flowers.",
        "Water it daily.\n\nP.S. Pinch.",
    ),
    "detectable_format:json_format": ({}, '```json\n{"answer": "Water it daily."}\n```', 'Here you go: {"answer": "Water it daily."}'),
    "keywords:existence": ({"keywords": ["basil", "morning"]}, "Water the basil every morning.", "Water the basil every evening."),
    "keywords:forbidden_words": ({"forbidden_words": ["very", "just"]}, "Water it daily; adjust as needed.", "Just water it daily."),
    "language:response_language": (
        {"language": "fr"},
        "Arrosez le basilic chaque matin et gardez-le au soleil pendant toute la journée.",
        "Water the basil every morning and keep it in the sun all day long.",
    ),
    "detectable_format:constrained_response": ({}, "Basil likes sun. My answer is yes.", "Basil likes sun. My answer is probably yes."),
    "combination:two_responses": ({}, "Water it daily.\n******\nKeep it warm.", "Water it daily.\n******\nWater it daily."),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": "How do I keep basil alive?"},
        "How do I keep basil alive? Water it daily.",
        "Water it daily. How do I keep basil alive?",
    ),
}
# What a phrasing names instead of the kwarg's own value: a language by name; the request to repeat is the prompt's query itself.
_NAMED = {"fr": "French", "How do I keep basil alive?": None}


@pytest.mark.parametrize("type_id", sorted(_CASES))
def test_uncounted_types_pass_a_compliant_response_and_fail_another(type_id: str) -> None:
    kwargs, good, bad = _CASES[type_id]
    verifier = registry.get(type_id, **kwargs)
    assert verifier.check(good).passed, verifier.check(good).reason
    assert not verifier.check(bad).passed, bad
    for phrasing in vp.TYPE_BY_ID[type_id].train + vp.TYPE_BY_ID[type_id].heldout + vp.TYPE_BY_ID[type_id].test:
        text = vp.render(phrasing, kwargs)
        assert not _STATED.search(text), f"an uncounted instruction states a count: {text!r}"
        for value in kwargs.values():  # the phrasing names every value it is checked against
            for word in value if isinstance(value, list) else [value]:
                named = _NAMED.get(word, word)
                assert named is None or named in text, (phrasing, named)


def test_every_type_is_tested_against_its_verifier() -> None:
    assert set(_COUNTED) | set(_CASES) == set(vp.TYPE_BY_ID)
