"""The demo's bootstrap intervals (demo/intervals.py): accuracies by hand, gains paired by prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.demo.intervals import accuracies, intervals


def _write(directory: Path, verdicts: list[tuple[list[bool], list[bool]]]) -> Path:
    directory.mkdir(parents=True)
    (directory / "heldout.jsonl").write_text("".join(json.dumps({"strict": s, "loose": lo}) + "\n" for s, lo in verdicts))
    return directory


def test_accuracies_by_hand_and_paired_gains(tmp_path: Path) -> None:
    # 4 prompts: strict all-pass on prompt 0 only; loose on 0 and 1; 3 of 6 instructions strict, 4 of 6 loose
    start = [([True], [True]), ([False, True], [True, True]), ([False], [False]), ([False, True], [False, True])]
    items = [{"strict": s, "loose": lo} for s, lo in start]
    assert accuracies(items, [0, 1, 2, 3]) == pytest.approx({"prompt_strict": 25, "inst_strict": 50, "prompt_loose": 50, "inst_loose": 400 / 6})
    assert accuracies(items, [0, 0, 2, 2])["prompt_loose"] == 50 and accuracies(items, [0, 0, 2, 2])["inst_loose"] == 50

    same = intervals({"start": _write(tmp_path / "a", start), "DPO": _write(tmp_path / "b", start)}, "heldout")
    assert all(same["gain"][k] == [0.0, 0.0] for k in same["gain"])  # identical verdicts: every paired resample gains 0

    better = start[:2] + [([True], [True])] + start[3:]  # DPO follows prompt 2 as well: +25 points prompt-level
    found = intervals({"start": _write(tmp_path / "c", start), "DPO": _write(tmp_path / "d", better)}, "heldout")
    low, high = found["gain"]["prompt_loose"]
    assert 0 <= low <= 25 <= high <= 100 and low < high  # paired: a gain is never negative when DPO only ever gains
    assert found["scores"]["start"]["prompt_strict"][0] <= 25 <= found["scores"]["start"]["prompt_strict"][1]
    assert intervals({"start": tmp_path / "missing"}, "heldout") == {}
