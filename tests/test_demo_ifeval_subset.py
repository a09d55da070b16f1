"""The demo's bundled IFEval: IFEval's own file; the fast subset its rule picks, the unused rest, the reader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from posttrain import demo
from posttrain.demo.ifeval_subset import (
    IFEVAL_SUBSET_SIZE,
    fits_short_response,
    ifeval_all,
    ifeval_subset,
    ifeval_unused,
    select_ifeval_subset,
)
from posttrain.records import PromptRecord
from posttrain.verify.scoring import verifiers_of

IFEVAL_INPUT = Path("/work/shared/data/ifeval_input_data.jsonl")


def test_bundled_ifeval_is_ifevals_file_and_splits_into_subset_and_unused() -> None:
    bundled = Path(demo.__file__).with_name("data").joinpath("ifeval_input_data.jsonl").read_bytes()
    assert hashlib.sha256(bundled).hexdigest().startswith("67ffeee0fcb87c31")  # IFEval's input_data.jsonl (IFEVAL_NOTICE.md)
    if IFEVAL_INPUT.exists():
        assert bundled == IFEVAL_INPUT.read_bytes()
    everything, subset, unused = ifeval_all(), ifeval_subset(), ifeval_unused()
    assert (len(everything), len(subset), len(unused)) == (541, IFEVAL_SUBSET_SIZE, 421)
    keys = [r["key"] for r in everything]
    assert sorted(keys) == sorted([r["key"] for r in subset] + [r["key"] for r in unused])  # disjoint, and together all
    assert [r["key"] for r in subset] == [k for k in keys if k in {r["key"] for r in subset}]  # IFEval's order
    assert subset == [json.loads(line) for line in select_ifeval_subset(bundled.decode().splitlines(keepends=True))]


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
