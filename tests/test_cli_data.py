"""The data commands as a user runs them, and README's commands kept true."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from posttrain.cli import app

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples" / "data"
runner = CliRunner()


def test_inspect_shows_trained_tokens_and_statistics(tmp_path):
    result = runner.invoke(app, ["data", "inspect", str(EXAMPLES / "chat.jsonl"), "--model", "tiny-qwen2", "-n", "1", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "example 0: " in result.output and "madrid." in result.output
    assert re.search(r"examples kept\s*│\s*6 of 6", result.output)
    assert "'<|im_end|>' ×9" in result.output


def test_render_writes_aligned_ids_and_labels(tmp_path):
    out = tmp_path / "rendered.jsonl"
    result = runner.invoke(app, ["data", "render", str(EXAMPLES / "sharegpt.jsonl"), "--model", "tiny-llama", "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 1 and set(lines[0]) == {"input_ids", "labels"}
    ids, labels = lines[0]["input_ids"], lines[0]["labels"]
    assert len(ids) == len(labels)
    assert all(label in (-100, token) for token, label in zip(ids, labels))
    assert 0 < sum(label != -100 for label in labels) < len(ids)


def test_render_with_max_length_reports_truncation(tmp_path):
    out = tmp_path / "r.jsonl"
    result = runner.invoke(
        app,
        ["data", "render", str(EXAMPLES / "chat.jsonl"), "--model", "tiny-qwen2", "--out", str(out), "--max-length", "100", "--overlong", "drop", "--cache-dir", str(tmp_path / "c")],
    )
    assert result.exit_code == 0, result.output
    kept = len(out.read_text().splitlines())
    assert re.search(r"dropped\s*│\s*(\d+)", result.output).group(1) == str(6 - kept)
    assert 0 < kept < 6


def test_a_model_without_template_gets_a_clear_error(tmp_path):
    from posttrain.models.zoo import train_tokenizer

    train_tokenizer(None).save_pretrained(tmp_path / "tok")
    result = runner.invoke(app, ["data", "inspect", str(EXAMPLES / "chat.jsonl"), "--model", str(tmp_path / "tok"), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert "no chat template" in result.output and "--template" in result.output
    result = runner.invoke(app, ["data", "inspect", str(EXAMPLES / "alpaca.json"), "--model", str(tmp_path / "tok"), "--template", "alpaca", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "### Response:" in result.output


def test_ci_runs_the_test_command_readme_shows():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(b for b in blocks if "[test]" in b)
    pytest_part = test_command.split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert pytest_part in ci.splitlines(), f"{pytest_part!r} must be a line of .ci/run"


def test_the_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "data", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "validate" in result.stdout and "inspect" in result.stdout
