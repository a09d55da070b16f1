"""Evol-Instruct: each elimination rule on realistic teacher outputs, lineage across rounds, every elimination counted.

Round 1's teacher replies are written as a capable teacher writes them (put in the run's request cache,
where a resumed run finds them); later requests are answered by a tiny random model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from rich.console import Console
from sft_fixtures import torch_threads

from posttrain.data.formats import read_records
from posttrain.synth import evol
from posttrain.synth.evol_run import EvolConfig, run
from posttrain.synth.teacher import Teacher

ROOTS = {
    "kept": "Give me three tips for staying focused while studying.",
    "rule 4": "Explain how a rainbow forms.",
    "rule 2": "Describe the plot of a novel you like.",
    "rule 3": "Name a common kitchen spice.",
    "rule 1": "Suggest a name for a pet goldfish.",
}
EVOLVED = {
    "kept": "Give me three tips for staying focused while studying for a chemistry exam, each with one concrete example from a study session.",
    "rule 4": "#Rewritten Prompt#: Explain how a rainbow forms, and why the given prompt mentions sunlight.",
    "rule 2": "Describe the plot of Leo Tolstoy's unfinished 1867 draft novel, chapter by chapter.",
    "rule 3": "Name a common kitchen spice used in both Indian and Mexican cooking.",
    "rule 1": "Suggest a name for my pet goldfish.",
}
RESPONSES = {
    "kept": "1. Study in 25-minute blocks: for example, balance three redox equations, then take a five-minute break.\n2. ...",
    "rule 2": "I'm sorry, but I don't have information about that draft.",
    "rule 3": "The... and, of the?",
    "rule 1": "How about Bubbles?",
}
JUDGED = {"kept": "Not Equal", "rule 2": "Not Equal", "rule 3": "Not Equal", "rule 1": "Equal"}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def test_the_four_rules_on_realistic_outputs():
    assert evol.elimination(EVOLVED["rule 4"], None, None) == "copies the rewriting prompt's words (rule 4)"
    assert evol.elimination(EVOLVED["rule 1"], RESPONSES["rule 1"], True) == "no information gain: judged Equal (rule 1)"
    assert evol.elimination(EVOLVED["rule 2"], RESPONSES["rule 2"], False) == 'the response says "sorry" in under 80 words (rule 2)'
    long_sorry = "Sorry for the long answer: " + "the novel follows a family through three generations of change " * 8
    assert evol.elimination(EVOLVED["rule 2"], long_sorry, False) is None  # "sorry" in 80 words or more is an answer
    assert evol.elimination(EVOLVED["rule 3"], RESPONSES["rule 3"], False) == "the response is only punctuation and stop words (rule 3)"
    assert evol.elimination(EVOLVED["rule 3"], "...!?", False) is not None
    assert evol.elimination(EVOLVED["kept"], RESPONSES["kept"], False) is None
    assert evol.parse_equal("Not Equal") is False and evol.parse_equal("Equal.") is True and evol.parse_equal("They differ") is None
    assert evol.clean_evolved('Harder instruction: "Plan a three-day trip to Kyoto."') == "Plan a three-day trip to Kyoto."


def prefill_round_one(cfg: EvolConfig) -> None:
    teacher = Teacher(None, cfg.teacher, Path(cfg.output_dir) / "requests")

    def put(prompt: str, settings: dict, reply: str) -> None:
        teacher.cache.append(cfg.teacher, {"key": teacher.key(prompt, {"n": 1, "top_p": 1.0, **settings}), "replies": [reply], "truncated": [False]})

    for case, root in ROOTS.items():
        op = random.Random(f"{cfg.seed}:{root}:1").choice(cfg.operations)
        put(evol.evolve_prompt(root, op), {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed + 1}, EVOLVED[case])
        if case in RESPONSES:
            put(EVOLVED[case], {"temperature": 0.0, "max_new_tokens": cfg.response_max_new_tokens, "seed": cfg.seed}, RESPONSES[case])
            put(evol.equal_prompt(root, EVOLVED[case]), {"temperature": 0.0, "max_new_tokens": 8, "seed": cfg.seed}, JUDGED[case])


def test_rounds_eliminate_by_rule_and_keep_lineage(tmp_path):
    data = tmp_path / "instructions.jsonl"
    data.write_text("".join(json.dumps({"prompt": root}) + "\n" for root in ROOTS.values()))
    cfg = EvolConfig(teacher="tiny-llama", data=str(data), rounds=2, max_new_tokens=24, response_max_new_tokens=24, bf16=False, output_dir=str(tmp_path / "run"))
    prefill_round_one(cfg)
    result = run(cfg, console=Console(record=True, width=300))
    first = result["funnel"][0]
    assert (first["count_in"], first["count_out"]) == (5, 1)
    assert first["dropped"] == {
        "copies the rewriting prompt's words (rule 4)": 1, 'the response says "sorry" in under 80 words (rule 2)': 1,
        "the response is only punctuation and stop words (rule 3)": 1, "no information gain: judged Equal (rule 1)": 1,
    }  # fmt: skip
    for stage in result["funnel"]:
        assert stage["count_in"] - stage["count_out"] == sum(stage["dropped"].values())
    records = [json.loads(line) for line in (tmp_path / "run" / "data.jsonl").read_text().splitlines()]
    # the reader `posttrain sft` uses takes every record as Alpaca's format, meta and all
    read = read_records(tmp_path / "run" / "data.jsonl")
    assert len(read) == len(records) and read[0]["messages"][-1]["content"] == RESPONSES["kept"]
    kept = records[0]
    assert kept["instruction"] == EVOLVED["kept"] and kept["output"] == RESPONSES["kept"]
    assert kept["meta"]["root"] == ROOTS["kept"] and [s["instruction"] for s in kept["meta"]["lineage"]] == [EVOLVED["kept"]]
    for record in records[1:]:  # round 2's survivors (the tiny model's), each with its whole lineage
        lineage = record["meta"]["lineage"]
        assert lineage[-1]["instruction"] == record["instruction"] and [s["round"] for s in lineage] in ([2], [1, 2])
        assert record["meta"]["root"] in ROOTS.values()
    eliminated = [json.loads(line) for line in (tmp_path / "run" / "eliminated.jsonl").read_text().splitlines()]
    round_one = {e["instruction"]: e["reason"] for e in eliminated if e["round"] == 1}
    assert round_one[ROOTS["rule 4"]].endswith("(rule 4)") and round_one[ROOTS["rule 1"]].endswith("(rule 1)")
    # an eliminated evolution leaves its instruction in the pool: round 2 evolves every root's current instruction
    assert result["funnel"][1]["count_in"] == 5
