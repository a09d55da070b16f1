"""A resume continues the run it resumes, or stops and says why: a checkpoint records the data's content
key, the units a step takes over all processes and every setting that changes the computation; a resume
that changes any of them stops with each change named, and one that only changes the process count (the
step's size kept) continues exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sft_fixtures import read_metrics, sft_config, torch_threads, torchrun, write_color_data, write_yaml

from posttrain.config import load_config
from posttrain.train import loop
from posttrain.train.sft import train

STEPS = 6


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def finished_run(tmp_path: Path, **train_section) -> tuple[dict, Path]:
    """A 6-step run with checkpoints at 3 and 6, cut back to step 3 (as if it had stopped there)."""
    data = write_color_data(tmp_path / "data.jsonl", n=48, max_reps=4)
    cfg = sft_config(data, tmp_path / "run", train={"max_steps": STEPS, "save_every": 3, "keep_last": 5, "bf16": False, **train_section})
    train(load_config(cfg))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step-{STEPS}")
    return cfg, tmp_path / "run"


def resume(cfg: dict, **changes: dict) -> None:
    cfg = json.loads(json.dumps(cfg))
    for section, values in changes.items():
        cfg[section].update(values)
    train(load_config({**cfg, "resume": True}))


def test_changed_settings_stop_the_resume_naming_each(tmp_path):
    cfg, run = finished_run(tmp_path)
    with pytest.raises(loop.TrainingError) as err:
        resume(cfg, train={"lr": 1e-3, "max_steps": 8}, data={"max_length": 96})
    message = str(err.value)
    for named in ("train.lr: 0.003 in the checkpoint, 0.001 now", "train.max_steps: 6 in the checkpoint, 8 now", "data.max_length: 128"):
        assert named in message, message
    assert "training data or its rendering" in message, "max_length changes the tokens, so the data key changes too"
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1)), "a refused resume must not touch the run"


def test_changed_data_stops_the_resume(tmp_path):
    cfg, _ = finished_run(tmp_path)
    write_color_data(Path(cfg["data"]["path"]), n=48, seed=1, max_reps=4)
    with pytest.raises(loop.TrainingError, match="content key"):
        resume(cfg)


def test_what_does_not_change_the_computation_may_change(tmp_path):
    # Micro-batching (the step's size kept), logging and checkpoint cadence change nothing but rounding.
    cfg, run = finished_run(tmp_path, micro_batch_size=2, grad_accum=2)
    want = {r["step"]: r["loss"] for r in read_metrics(run)}
    resume(cfg, train={"micro_batch_size": 1, "grad_accum": 4, "save_every": 2, "log_every": 1})
    got = {r["step"]: r["loss"] for r in read_metrics(run)}
    assert sorted(got) == sorted(want) and max(abs(got[s] - want[s]) for s in want) <= 1e-5


def test_another_step_size_stops_the_resume_and_says_how_to_keep_it(tmp_path):
    cfg, _ = finished_run(tmp_path, micro_batch_size=2, grad_accum=2)
    with pytest.raises(loop.TrainingError, match=r"a step took 4 units .* would take 2 now"):
        resume(cfg, train={"grad_accum": 1})


def test_a_ddp_checkpoint_resumed_by_one_process_continues_exactly(tmp_path):
    """Written by 2 processes × 2 rows × grad_accum 1, resumed by 1 process × 2 rows × grad_accum 2: the same
    4 rows a step, in the same order, so steps 4-6 repeat the uninterrupted DDP run's."""
    data = write_color_data(tmp_path / "data.jsonl", n=48, max_reps=4)
    cfg = sft_config(data, tmp_path / "ddp", train={"max_steps": STEPS, "save_every": 3, "keep_last": 5, "bf16": False, "micro_batch_size": 2, "grad_accum": 1})
    torchrun("sft", write_yaml(cfg, tmp_path / "ddp.yaml"))
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ddp")}
    shutil.rmtree(tmp_path / "ddp" / "checkpoints" / f"step-{STEPS}")
    shutil.rmtree(tmp_path / "ddp" / "final")
    assert json.loads((loop.latest_checkpoint(tmp_path / "ddp") / "state.json").read_text())["world"] == 2
    resume(cfg, train={"grad_accum": 2})
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ddp")}
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-5, (got, want)
