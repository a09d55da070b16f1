"""`posttrain eval ifeval` as a user runs it: the paper's GPT-4 numbers, per-prompt verdicts, a chart."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from posttrain.cli import app

SHARED = Path(__file__).parents[2] / "shared" / "data"
GPT4 = SHARED / "ifeval_input_response_data_gpt4_20231107_145030.jsonl"
PAPER = (76.89, 83.57, 79.30, 85.37)
needs_data = pytest.mark.skipif(not GPT4.exists(), reason="../shared/data is not beside the repository")


def headline(output: str) -> tuple[float, ...]:
    row = [line for line in output.splitlines() if re.fullmatch(r"[│|]\s*[\d.]+\s*[│|]\s*[\d.]+\s*[│|]\s*[\d.]+\s*[│|]\s*[\d.]+\s*[│|]", line.strip())]
    assert len(row) == 1, output
    return tuple(float(x) for x in re.findall(r"[\d.]+", row[0]))


@needs_data
def test_gpt4_responses_give_the_paper_numbers_every_run(tmp_path):
    runs = []
    for k in range(2):
        per_item, chart = tmp_path / f"items{k}.jsonl", tmp_path / f"chart{k}.png"
        result = CliRunner().invoke(app, ["eval", "ifeval", "--responses", str(GPT4), "--per-item", str(per_item), "--plot", str(chart)])
        assert result.exit_code == 0, result.output
        runs.append(headline(result.output))
        assert chart.stat().st_size > 10_000
        items = [json.loads(line) for line in per_item.read_text().splitlines()]
        assert len(items) == 541
        assert all(len(i["strict"]) == len(i["loose"]) == len(i["instruction_id_list"]) for i in items)
        assert {"prompt", "instruction_id_list", "strict", "loose"} <= set(items[0])
    assert runs[0] == runs[1]
    assert all(abs(ours - paper) <= 0.4 for ours, paper in zip(runs[0], PAPER)), runs[0]


@needs_data
def test_missing_prompts_file_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_IFEVAL_DATA", raising=False)
    lone = tmp_path / "responses.jsonl"
    shutil.copy(GPT4, lone)
    result = CliRunner().invoke(app, ["eval", "ifeval", "--responses", str(lone)])
    assert result.exit_code == 1 and "instruction_following_eval" in result.output and "--data" in result.output
    result = CliRunner().invoke(app, ["eval", "ifeval", "--responses", str(lone), "--data", str(SHARED / "ifeval_input_data.jsonl"), "--plot", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output


@needs_data
def test_a_partial_responses_file_is_scored_and_said_to_be_partial(tmp_path):
    part = tmp_path / "part.jsonl"
    part.write_text("".join(GPT4.read_text().splitlines(keepends=True)[:50]))
    result = CliRunner().invoke(app, ["eval", "ifeval", "--responses", str(part), "--data", str(SHARED / "ifeval_input_data.jsonl"), "--plot", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert "cover 50 of the 541 prompts" in result.output
    assert "50 prompts" in result.output


def test_exactly_one_source_of_responses():
    result = CliRunner().invoke(app, ["eval", "ifeval"])
    assert result.exit_code == 1 and "exactly one of --responses" in result.output


@needs_data
def test_generate_then_score_with_a_model(tmp_path):
    per_item = tmp_path / "items.jsonl"
    result = CliRunner().invoke(
        app,
        ["eval", "ifeval", "--model", "tiny-llama", "--data", str(SHARED / "ifeval_input_data.jsonl"), "--limit", "4", "--max-new-tokens", "8", "--fp32", "--per-item", str(per_item), "--plot", str(tmp_path / "c.png")],
    )
    assert result.exit_code == 0, result.output
    items = [json.loads(line) for line in per_item.read_text().splitlines()]
    assert len(items) == 4 and all(isinstance(i["response"], str) for i in items)
    assert headline(result.output)  # the four accuracies are printed
