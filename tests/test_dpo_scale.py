"""DPO, like SFT: a SIGKILLed run resumes to the uninterrupted losses; two processes equal one."""

from __future__ import annotations

import signal
import subprocess

from test_dpo import dpo_config, write_pairs
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.config import load_config
from posttrain.train import dpo, loop
from sft_fixtures import cli, kill_at_step, read_metrics, subprocess_env, torch_threads, torchrun, write_yaml

STEPS = 24


def long_pairs(path, n=96):
    """Pairs with long prompts, so a step takes long enough to kill the process in the middle of a run."""
    write_pairs(path, n=n)
    lines = path.read_text().splitlines()
    import json

    out = []
    for line in lines:
        r = json.loads(line)
        r["prompt"][0]["content"] = ("Think about it carefully. " * 40) + r["prompt"][0]["content"]
        out.append(json.dumps(r))
    path.write_text("\n".join(out) + "\n")
    return path


def test_sigkill_then_resume_repeats_the_uninterrupted_run(tmp_path):
    data = long_pairs(tmp_path / "pairs.jsonl")
    base = dpo_config(tmp_path, data={"path": str(data), "max_length": 512, "eval_fraction": 0.0}, train={"max_steps": STEPS, "save_every": 4, "keep_last": 10, "eval_every": None, "lr": 1e-3, "micro_batch_size": 4})
    with torch_threads(1):
        dpo.train(load_config({**base, "output_dir": str(tmp_path / "reference")}, cls=dpo.DPOConfig))
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "reference")}

    run = tmp_path / "run"
    config_file = write_yaml({**base, "output_dir": str(run)}, tmp_path / "dpo.yaml")
    proc = subprocess.Popen(cli("dpo", "--config", str(config_file)), env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_step(proc, run, 6)
    assert proc.returncode == -signal.SIGKILL
    assert loop.latest_checkpoint(run).name == "step-4"
    result = CliRunner().invoke(app, ["dpo", "--config", str(config_file), "--resume"])
    assert result.exit_code == 0, result.output
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert max(abs(r["loss"] - want[r["step"]]) for r in rows) <= 1e-6


def test_two_processes_match_one_process(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    common = dpo_config(tmp_path, data={"path": str(data), "eval_fraction": 0.0}, train={"max_steps": 6, "eval_every": None, "lr": 1e-3})
    single = {**common, "output_dir": str(tmp_path / "single"), "train": {**common["train"], "micro_batch_size": 2, "grad_accum": 2}}
    with torch_threads(1):
        dpo.train(load_config(single, cls=dpo.DPOConfig))
    double = {**common, "output_dir": str(tmp_path / "ddp"), "train": {**common["train"], "micro_batch_size": 2, "grad_accum": 1}}
    torchrun("dpo", write_yaml(double, tmp_path / "ddp.yaml"))
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) <= 1e-5, ([r["loss"] for r in one], [r["loss"] for r in two])
    assert all(abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * max(1.0, a["grad_norm"]) for a, b in zip(one, two))
    assert one[-1]["loss"] < one[0]["loss"] - 0.1
