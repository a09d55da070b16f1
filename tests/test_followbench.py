"""FollowBench-style evaluation (eval/followbench.py): the levels it builds, its metrics on hand-checked answers with the real
verifiers, and an end-to-end run on a tiny model that a second run serves from the cache."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from posttrain.eval.followbench import build_levels, csl, hsr, run_followbench, ssr
from posttrain.generate.params import Completion, SamplingParams
from posttrain.synth import verifiable as vp
from posttrain.synth.teacher import Teacher
from posttrain.verify.scoring import PromptRecord, verifiers_of


def test_levels_add_one_constraint_each_without_conflicts_from_heldout_queries() -> None:
    groups = build_levels(12, levels=4, seed=3)
    assert len(groups) == 12 and len({g["id"] for g in groups}) == 12
    heldout = set(vp.split_queries()["heldout"])
    for group in groups:
        assert group["query"] in heldout and group["split"] == "heldout"
        levels = group["levels"]
        assert [r["level"] for r in levels] == [1, 2, 3, 4] and [r["key"] for r in levels] == [f"{group['id']}-L{k}" for k in (1, 2, 3, 4)]
        for k, record in enumerate(levels, 1):
            assert len(record["instruction_id_list"]) == len(record["kwargs"]) == k
            assert record["prompt"].startswith(group["query"] + " ")
            verifiers_of(PromptRecord.model_validate(record))  # known ids, valid kwargs
            if k > 1:  # level k = level k-1 plus one constraint, the earlier ones phrased the same
                before = levels[k - 2]
                assert record["instruction_id_list"][:-1] == before["instruction_id_list"] and record["kwargs"][:-1] == before["kwargs"]
                assert record["prompt"].startswith(before["prompt"] + " ")
        ids = levels[-1]["instruction_id_list"]
        assert not any(vp.conflicts(a, b) for a, b in combinations(ids, 2))
    # deterministic, a prefix of a longer build, another seed differs; train queries on request
    assert build_levels(12, levels=4, seed=3) == groups and build_levels(5, levels=4, seed=3) == groups[:5]
    assert build_levels(12, levels=4, seed=4) != groups
    assert all(g["query"] in set(vp.split_queries()["train"]) for g in build_levels(5, levels=2, split="train"))
    with pytest.raises(ValueError, match="levels must be >= 1.*|n_queries must be >= 0"):
        build_levels(-1, levels=0)
    with pytest.raises(ValueError, match="free of conflicts"):
        build_levels(1, levels=len(vp.TYPES))


def test_types_are_spread_evenly_overall_and_per_level() -> None:
    groups = build_levels(64, levels=5)
    total = [t for g in groups for t in g["levels"][-1]["instruction_id_list"]]
    counts = [total.count(t) for t in vp.TYPE_BY_ID]
    assert max(counts) - min(counts) <= 3
    first = [g["levels"][0]["instruction_id_list"][0] for g in groups]
    assert max(first.count(t) for t in vp.TYPE_BY_ID) <= 6  # 64 groups over 16 types: 4 each when even


class ScriptedEngine:
    """Stands in for a model: answers each prompt with the text the test wrote for it, and counts what it is asked."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def generate(self, prompts: Sequence[str], params: SamplingParams, progress: bool = True) -> list[list[Completion]]:
        self.asked.extend(prompts)
        return [[Completion(self.answers[p], [], "stop", 0, [])] for p in prompts]


def _group(group_id: str, query: str, constraints: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    levels = [
        {
            "key": f"{group_id}-L{k}",
            "prompt": " ".join([query, *(phrase for phrase, _, _ in constraints[:k])]),
            "instruction_id_list": [i for _, i, _ in constraints[:k]],
            "kwargs": [kw for _, _, kw in constraints[:k]],
        }
        for k in range(1, len(constraints) + 1)
    ]
    return {"id": group_id, "split": "heldout", "query": query, "levels": levels}


def test_metrics_on_hand_checked_answers(tmp_path: Path) -> None:
    """Two groups of three levels, answers written by hand, verdicts (strict) by the real verifiers:

    group a (no comma, lowercase, mentions "plan"):
      L1, L2 "make a plan for the week and start today" -> [T], [T, T]
      L3 "Make a plan for the week, and start today" -> [F, F, T]       CSL 2
    group b (lowercase, no comma, mentions "habit"):
      L1 "Build a Habit That You Enjoy\\nbuild a habit that you enjoy" -> [F] strict, [T] loose (without its first line)
      L2, L3 "build a habit that you enjoy" -> [T, T], [T, T, T]       CSL 0
    (Answers are long enough for the lowercase check's language detection to call them English.)
    HSR: L1 1/2, L2 2/2, L3 1/2 -> 50, 100, 50; mean over levels 200/3 = 66.67 (per group: a 2/3, b 2/3).
    SSR: L1 1/2, L2 4/4, L3 (1/3 + 3/3)/2 = 2/3 -> 50, 100, 66.67; mean (50 + 100 + 66.67)/3 = 72.22.
    CSL: (2 + 0)/2 = 1.
    """
    no_comma = ("Use no commas.", "punctuation:no_comma", {})
    lower = ("Write in lowercase.", "change_case:english_lowercase", {})
    groups = [
        _group("a", "How do I start?", [no_comma, lower, ("Mention plan.", "keywords:existence", {"keywords": ["plan"]})]),
        _group("b", "How do I keep going?", [lower, no_comma, ("Mention habit.", "keywords:existence", {"keywords": ["habit"]})]),
    ]
    texts = {
        "a": ["make a plan for the week and start today"] * 2 + ["Make a plan for the week, and start today"],
        "b": ["Build a Habit That You Enjoy\nbuild a habit that you enjoy"] + ["build a habit that you enjoy"] * 2,
    }
    answers = {r["prompt"]: texts[g["id"]][i] for g in groups for i, r in enumerate(g["levels"])}
    engine = ScriptedEngine(answers)
    results = run_followbench(Teacher(engine, "scripted", tmp_path / "cache"), "scripted", groups, max_new_tokens=16)

    assert results.benchmark == "followbench" and results.plot_metric == "HSR" and len(results.items) == 6
    head, levels = results.models["scripted"], results.groups["scripted"]
    assert head["HSR (mean over levels)"].value == pytest.approx(200 / 3) and head["HSR (mean over levels)"].n == 2
    assert head["SSR (mean over levels)"].value == pytest.approx((50 + 100 + 200 / 3) / 3)
    assert head["CSL"].value == pytest.approx(1.0)
    assert [levels[f"level {k}"]["HSR"].value for k in (1, 2, 3)] == pytest.approx([50, 100, 50])
    assert [levels[f"level {k}"]["SSR"].value for k in (1, 2, 3)] == pytest.approx([50, 100, 200 / 3])
    for metrics in (*levels.values(), head):
        for metric in metrics.values():
            assert metric.low is not None and metric.high is not None and metric.low <= metric.value <= metric.high

    by_key = {item["key"]: item for item in results.items}
    assert by_key["a-L3"]["strict"] == [False, False, True] and by_key["a-L3"]["followed_all"] is False
    assert by_key["b-L1"]["strict"] == [False] and by_key["b-L1"]["loose"] == [True] and by_key["b-L1"]["model"] == "scripted"
    assert all(len(i["reasons"]) == len(i["instruction_id_list"]) == i["level"] for i in results.items)
    # the existing metric functions agree on the same verdicts
    verdicts = [{i["level"]: i["strict"] for i in results.items if i["group"] == g} for g in ("a", "b")]
    assert [csl(v) for v in verdicts] == [2, 0]
    assert [100 * hsr(verdicts, k) for k in (1, 2, 3)] == pytest.approx([levels[f"level {k}"]["HSR"].value for k in (1, 2, 3)])
    assert [100 * ssr(verdicts, k) for k in (1, 2, 3)] == pytest.approx([levels[f"level {k}"]["SSR"].value for k in (1, 2, 3)])
    assert len(engine.asked) == 6

    limited = run_followbench(Teacher(engine, "scripted", tmp_path / "cache"), "scripted", groups, max_new_tokens=16, limit=1)
    assert {i["group"] for i in limited.items} == {"a"} and limited.models["scripted"]["CSL"].value == 2
    assert len(engine.asked) == 6  # served from the cache


def test_end_to_end_on_a_tiny_model_resumes_from_its_cache(tmp_path: Path) -> None:
    from posttrain.generate.engine import Engine

    engine = Engine.from_name("tiny-llama", dtype="float32", device="cpu", batch_size=8)
    groups = build_levels(3, levels=3)
    first = Teacher(engine, "tiny-llama", tmp_path / "cache", chunk=8)
    results = run_followbench(first, "tiny-llama", groups, max_new_tokens=8)
    assert sum(first.counts.values()) == 9 and len(results.items) == 9
    assert {(i["group"], i["level"]) for i in results.items} == {(g["id"], k) for g in groups for k in (1, 2, 3)}
    assert set(results.groups["tiny-llama"]) == {"level 1", "level 2", "level 3"}
    for name in ("HSR (mean over levels)", "SSR (mean over levels)"):
        assert 0 <= results.models["tiny-llama"][name].value <= 100
    assert 0 <= results.models["tiny-llama"]["CSL"].value <= 3
    assert all(0 <= m.value <= 100 for level in results.groups["tiny-llama"].values() for m in level.values())
    assert any("heldout" in note for note in results.notes) and results.settings["max_new_tokens"] == 8

    again = Teacher(engine, "tiny-llama", tmp_path / "cache", chunk=8)
    repeat = run_followbench(again, "tiny-llama", groups, max_new_tokens=8)
    assert sum(again.counts.values()) == 0  # nothing generated anew
    assert repeat.items == results.items and repeat.to_dict() == results.to_dict()
