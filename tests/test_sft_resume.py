"""Exact resume: a run killed with SIGKILL and resumed repeats the uninterrupted run's losses; incomplete
checkpoints are never loaded; ``resume`` modes; a non-finite loss stops the run and names a good checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.config import load_config
from posttrain.train import loop
from posttrain.train.sft import train
from sft_fixtures import cli, kill_at_step, read_metrics, sft_config, subprocess_env, torch_threads, write_color_data, write_yaml

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def run_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def assert_close_per_step(got: dict[int, float], want: dict[int, float], tol: float, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: steps {sorted(got)} != {sorted(want)}"
    bad = {s: (got[s], want[s]) for s in want if abs(got[s] - want[s]) > tol}
    assert not bad, f"{what} differ beyond {tol} at steps {sorted(bad)}: {bad}"


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


# -- SIGKILL mid-run, then --resume -----------------------------------------------------------

KILL_AT = 10  # kill once this step is logged: after the step-8 checkpoint, before step 16's
TOTAL = 40


def test_sigkill_then_resume_repeats_the_uninterrupted_run(tmp_path):
    # Long examples (up to 16 repetitions) and 40 steps: the killed process needs ~1 s for the steps after
    # KILL_AT, so polling the metrics file kills it mid-run. NEFTune draws noise from the torch RNG every
    # step, so the losses after the resume match only if the RNG state was restored too.
    data = write_color_data(tmp_path / "data.jsonl", max_reps=16)
    cfg = sft_config(
        data,
        tmp_path / "reference",
        data={"max_length": 1024, "eval_fraction": 0.1},
        train={"max_steps": TOTAL, "save_every": 8, "keep_last": 10, "neftune_alpha": 5, "eval_every": 6, "log_every": 1},
    )
    reference = train(load_config(cfg))
    ref_rows = read_metrics(tmp_path / "reference")
    assert [r["step"] for r in ref_rows] == list(range(1, TOTAL + 1))
    ref_evals = {r["step"]: r["eval_loss"] for r in ref_rows if "eval_loss" in r}
    assert sorted(ref_evals) == [s for s in range(1, TOTAL + 1) if s % 6 == 0 or s == TOTAL]

    run = tmp_path / "run"
    config_file = write_yaml({**cfg, "output_dir": str(run)}, tmp_path / "sft.yaml")
    log = (tmp_path / "killed.log").open("w")
    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cli("sft", "--config", str(config_file)), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        kill_at_step(proc, run, KILL_AT, log=tmp_path / "killed.log")
    finally:
        log.close()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it could be killed (rc {proc.returncode}); make it slower"

    killed_rows = read_metrics(run)
    last_logged = killed_rows[-1]["step"]
    checkpoint = loop.latest_checkpoint(run)
    assert checkpoint is not None and checkpoint.name == "step-8", f"expected the step-8 checkpoint, found {checkpoint}"
    assert 8 < last_logged < TOTAL, f"the killed process logged up to step {last_logged}: nothing after the checkpoint to drop"
    assert not (run / "final").exists()

    result = runner.invoke(app, ["sft", "--config", str(config_file), "--resume"])
    assert result.exit_code == 0, result.output

    rows = read_metrics(run)
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, TOTAL + 1)), f"metrics.jsonl must hold each step exactly once, in order; got {steps}"
    # Lines carry wall-clock fields, so they tell which process wrote them: steps 1-8 are the killed
    # process's (kept), steps 9.. were computed again by the resumed one (the killed lines were dropped).
    assert rows[:8] == killed_rows[:8], "the lines up to the checkpoint must be kept as the killed process wrote them"
    rewritten = [r["step"] for r, k in zip(rows[8:last_logged], killed_rows[8:last_logged]) if r["seconds"] != k["seconds"]]
    assert rewritten == list(range(9, last_logged + 1)), "steps after the checkpoint must come from the resumed process"
    losses = {r["step"]: r["loss"] for r in rows}
    assert_close_per_step(losses, {r["step"]: r["loss"] for r in ref_rows}, 1e-6, "losses after SIGKILL + resume")
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert_close_per_step(evals, ref_evals, 1e-6, "eval losses after SIGKILL + resume")
    assert max(abs(a - b) for a, b in zip(reference.losses, [r["loss"] for r in rows])) <= 1e-6
    assert max_weight_diff(run / "final" / "model.safetensors", tmp_path / "reference" / "final" / "model.safetensors") <= 1e-6


# -- incomplete checkpoints -------------------------------------------------------------------


def test_incomplete_checkpoints_are_never_loaded(tmp_path):
    data = write_color_data(tmp_path / "data.jsonl")
    run = tmp_path / "run"
    # Packing on here (the default), several epochs in 16 steps: the resume also crosses an epoch reshuffle.
    cfg = sft_config(data, run, data={"packing": True}, train={"max_steps": 16, "save_every": 4, "keep_last": 10, "neftune_alpha": 5})
    first = train(load_config(cfg))
    assert len(first.losses) == 16
    root = run / loop.CHECKPOINT_DIR
    assert loop.checkpoint_steps(run) == [4, 8, 12, 16]

    # A crash while writing step 12 leaves a temporary directory (here a complete-looking one, state.json
    # and all, so loading it would go unnoticed but for the losses), and a step-16 directory without
    # state.json and with a half-written weights file stands for a checkpoint that is not whole.
    shutil.rmtree(root / "step-12")
    shutil.copytree(root / "step-16", root / ".tmp-step-12")
    (root / ".tmp-step-12" / "garbage.bin").write_bytes(os.urandom(1000))
    (root / "step-16" / "state.json").unlink()
    weights = root / "step-16" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    assert loop.latest_checkpoint(run) == root / "step-8"
    assert loop.checkpoint_steps(run) == [4, 8]

    resumed = train(load_config({**cfg, "resume": True}))
    assert len(resumed.losses) == 8, f"resume must start after step 8, it ran {len(resumed.losses)} steps"
    assert max(abs(a - b) for a, b in zip(resumed.losses, first.losses[8:])) <= 1e-6, (resumed.losses, first.losses[8:])
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 17))
    assert not (root / ".tmp-step-12").exists(), "the next save removes stale temporary directories"
    assert (root / "step-16" / "state.json").exists() and json.loads((root / "step-16" / "state.json").read_text())["step"] == 16


def test_resume_survives_a_cut_short_metrics_line(tmp_path):
    data = write_color_data(tmp_path / "data.jsonl")
    run = tmp_path / "run"
    cfg = sft_config(data, run, train={"max_steps": 8, "save_every": 4})
    first = train(load_config(cfg))
    shutil.rmtree(run / loop.CHECKPOINT_DIR / "step-8")
    shutil.rmtree(run / "final")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "lo')
    resumed = train(load_config({**cfg, "resume": True}))
    assert max(abs(a - b) for a, b in zip(resumed.losses, first.losses[4:])) <= 1e-6
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))


# -- resume modes -----------------------------------------------------------------------------


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    data = write_color_data(tmp_path / "data.jsonl")
    run = tmp_path / "run"
    run.mkdir()
    # Lines from an earlier attempt that never reached a checkpoint: a fresh start must not keep them.
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 99.0}) + "\n" for s in (1, 2, 3)))
    cfg = sft_config(data, run, train={"max_steps": 4}, resume="auto")
    result = train(load_config(cfg))
    assert result.steps == 4 and len(result.losses) == 4
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx(result.losses, abs=0) and 99.0 not in [r["loss"] for r in rows]
    assert loop.checkpoint_steps(run) == [4]


def test_resume_flag_without_checkpoint_fails_clearly(tmp_path):
    data = write_color_data(tmp_path / "data.jsonl")
    run = tmp_path / "empty-run"
    config_file = write_yaml(sft_config(data, run, train={"max_steps": 4}), tmp_path / "sft.yaml")
    result = runner.invoke(app, ["sft", "--config", str(config_file), "--resume"])
    assert result.exit_code == 1, result.output
    assert "no complete checkpoint" in result.output and "Traceback" not in result.output, result.output
    assert not (run / "metrics.jsonl").exists() and not (run / "final").exists()

    with pytest.raises(loop.TrainingError, match="no complete checkpoint"):
        train(load_config(sft_config(data, run, train={"max_steps": 4}, resume=True)))


# -- non-finite loss ------------------------------------------------------------------------------


def _explode(tmp_path: Path, lr: float, save_every: int | None) -> tuple[Path, str]:
    data = write_color_data(tmp_path / "data.jsonl")
    run = tmp_path / f"run-{lr:g}-{save_every}"
    cfg = sft_config(data, run, train={"max_steps": 10, "save_every": save_every, "lr": lr, "max_grad_norm": None, "warmup_steps": 0})
    with pytest.raises(loop.TrainingError) as info:
        train(load_config(cfg))
    return run, str(info.value)


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(tmp_path):
    # lr 1e12 without clipping: step 1 is finite, its update makes step 2's loss nan.
    run, message = _explode(tmp_path, 1e12, save_every=1)
    assert "loss became" in message, message
    last = loop.latest_checkpoint(run)
    assert last is not None and str(last) in message, message
    assert (last / "state.json").exists() and json.loads((last / "state.json").read_text())["step"] == int(last.name.split("-")[1])
    assert all(torch.isfinite(v).all() for v in load_file(last / "trainable.safetensors").values()), f"{last} holds non-finite weights"
    logged = [r["step"] for r in read_metrics(run)]
    assert logged == list(range(1, int(last.name.split("-")[1]) + 1)), f"no line for the step whose loss was not finite: {logged}"
    assert not (run / "final").exists()

    run, message = _explode(tmp_path, 1e12, save_every=None)
    assert "loss became" in message and "No checkpoint was written yet" in message, message


def test_the_checkpoint_named_after_a_non_finite_loss_has_finite_weights(tmp_path):
    run, message = _explode(tmp_path, 1e20, save_every=1)
    # Step 2's loss is finite but its gradients are not: the run stops before stepping on them.
    assert "gradient norm became" in message, message
    last = loop.latest_checkpoint(run)
    assert last is not None and str(last) in message
    bad = [k for k, v in load_file(last / "trainable.safetensors").items() if not torch.isfinite(v).all()]
    assert not bad, f"'{last}' is called the last good checkpoint but {len(bad)} tensors are non-finite, e.g. {bad[:2]}"
