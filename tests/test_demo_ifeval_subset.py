"""The demo's bundled IFEval subset: the selection rule, applied to IFEval's file, gives the bundled file; the reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain import demo
from posttrain.demo.ifeval_subset import IFEVAL_SUBSET_SIZE, fits_short_response, ifeval_subset, select_ifeval_subset
from posttrain.records import PromptRecord
from posttrain.verify.scoring import verifiers_of

IFEVAL_INPUT = Path("/work/shared/data/ifeval_input_data.jsonl")


@pytest.mark.skipif(not IFEVAL_INPUT.exists(), reason="IFEval's input_data.jsonl is not in shared/data")
def test_bundled_ifeval_subset_is_the_rule_applied_to_ifeval() -> None:
    lines = IFEVAL_INPUT.read_text(encoding="utf-8").splitlines(keepends=True)
    expected = "".join(select_ifeval_subset(lines))
    bundled = Path(demo.__file__).with_name("data").joinpath("ifeval_subset.jsonl").read_text(encoding="utf-8")
    assert bundled == expected
    assert len(ifeval_subset()) == IFEVAL_SUBSET_SIZE == 120
    assert set(bundled.splitlines(keepends=True)) <= set(lines)  # IFEval's lines, byte for byte


def test_ifeval_subset_rule_and_reader() -> None:
    records = ifeval_subset()
    assert ifeval_subset(10) == records[:10]
    assert all(fits_short_response(r) for r in records)
    for record in records:
        verifiers_of(PromptRecord.model_validate(record))
    ids = {t for r in records for t in r["instruction_id_list"]}
    assert not ids & {"combination:two_responses", "length_constraints:nth_paragraph_first_word"}
    long_words = {
        "key": 0,
        "prompt": "Hi.",
        "instruction_id_list": ["length_constraints:number_words"],
        "kwargs": [{"relation": "at least", "num_words": 300}],
    }
    assert not fits_short_response(long_words)
    assert fits_short_response({**long_words, "kwargs": [{"relation": "less than", "num_words": 300}]})
    assert not fits_short_response(
        {**long_words, "prompt": "Write an essay about rain.", "kwargs": [{"relation": "less than", "num_words": 90}]}
    )
    short_text = {"key": 0, "instruction_id_list": [], "kwargs": []}
    assert not fits_short_response({**short_text, "prompt": "Write a 200 word story about rain."})
    assert fits_short_response({**short_text, "prompt": "Write a 100 word story about rain."})
    with pytest.raises(ValueError, match="between 0 and 120"):
        ifeval_subset(121)
    assert json.loads(json.dumps(records[0])) == records[0]
