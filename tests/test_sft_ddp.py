"""DDP: two CPU processes (torchrun, gloo) with the same global batch train exactly like one process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.models.load import resolve
from posttrain.train import loop
from posttrain.train.sft import train
from sft_fixtures import read_metrics, sft_config, torch_threads, torchrun, write_color_data, write_yaml

STEPS = 8


def torchrun_sft(config_file: Path, *args: str) -> None:
    torchrun("sft", config_file, *args)


def resume_from_step_4(run: Path, config_file: Path, tmp_path: Path) -> list[dict]:
    """A copy of the finished DDP ``run`` cut back to its step-4 checkpoint, resumed under torchrun; its metrics."""
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / f"step-{STEPS}")
    shutil.rmtree(cut / "final")
    assert loop.latest_checkpoint(cut) == cut / "checkpoints" / "step-4"
    torchrun_sft(config_file, "--output-dir", str(cut), "--resume")
    return read_metrics(cut)


def test_two_processes_match_one_process(tmp_path):
    # Examples of different lengths, so the loss really is normalised by the step's token count over both
    # processes (a per-process mean would differ); eval is split between the processes too.
    data = write_color_data(tmp_path / "data.jsonl", max_reps=6)
    # fp32 (bf16: false): the two runs agree to float rounding only in fp32
    common = dict(data={"max_length": 256, "eval_fraction": 0.1}, train={"max_steps": STEPS, "save_every": 4, "eval_every": 4, "lr": 3e-3, "bf16": False})

    single_cfg = sft_config(data, tmp_path / "single", **common)
    single_cfg["train"].update(micro_batch_size=2, grad_accum=2)
    with torch_threads(1):
        train(load_config(single_cfg))

    ddp_cfg = sft_config(data, tmp_path / "ddp", **common)
    ddp_cfg["train"].update(micro_batch_size=2, grad_accum=1)  # 2 rows × 2 processes = the same 4 rows a step
    torchrun_sft(write_yaml(ddp_cfg, tmp_path / "ddp.yaml"))

    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1)), "rank 0 alone writes one line per step"
    assert [r["trained_tokens"] for r in one] == [r["trained_tokens"] for r in two], "each step must see the same rows"
    assert len({r["trained_tokens"] for r in one}) > 1, "steps should differ in token count for the test to mean something"
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    assert max(diffs) <= 1e-5, f"per-step losses differ: {[(a['loss'], b['loss']) for a, b in zip(one, two)]}"
    # Adam is almost blind to the gradient's scale, so compare the (pre-clipping) gradient norm as well:
    # a step's gradient must be the same sum over both processes, not half of it or a per-process mean.
    norms = [(a["grad_norm"], b["grad_norm"]) for a, b in zip(one, two)]
    assert all(abs(a - b) <= 1e-5 * max(1.0, a) for a, b in norms), f"gradient norms differ: {norms}"
    evals_one = [(r["step"], r["eval_loss"]) for r in one if "eval_loss" in r]
    evals_two = [(r["step"], r["eval_loss"]) for r in two if "eval_loss" in r]
    assert [s for s, _ in evals_one] == [s for s, _ in evals_two] == [4, 8]
    assert max(abs(a - b) for (_, a), (_, b) in zip(evals_one, evals_two)) <= 1e-5, (evals_one, evals_two)
    assert one[-1]["loss"] < one[0]["loss"] - 0.5, "the run should learn something, so a wrong update would show"

    w1 = load_file(tmp_path / "single" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst <= 1e-5, f"final weights differ by up to {worst}"
    w0 = load_file(Path(resolve("tiny-llama")) / "model.safetensors")
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1 if k in w0)
    assert moved > 1e-3, "the weights should have moved"

    # Resuming under DDP from the step-4 checkpoint repeats steps 5-8 of the uninterrupted DDP run.
    resumed = resume_from_step_4(tmp_path / "ddp", tmp_path / "ddp.yaml", tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(resumed, two)) <= 1e-6, ([r["loss"] for r in resumed], [r["loss"] for r in two])


def test_wegeft_two_processes_match_one_process(tmp_path):
    """WeGeFT's shared pairs take every layer's gradient on each process; DDP averages them as one process would."""
    data = write_color_data(tmp_path / "data.jsonl", max_reps=6)
    common = dict(data={"max_length": 256}, adapter={"kind": "wegeft", "r": 8}, train={"max_steps": STEPS, "lr": 5e-3, "bf16": False})
    single_cfg = sft_config(data, tmp_path / "single", **common)
    single_cfg["train"].update(micro_batch_size=2, grad_accum=2)
    with torch_threads(1):
        train(load_config(single_cfg))
    ddp_cfg = sft_config(data, tmp_path / "ddp", **common)
    ddp_cfg["train"].update(micro_batch_size=2, grad_accum=1)
    torchrun_sft(write_yaml(ddp_cfg, tmp_path / "ddp.yaml"))
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) <= 1e-5, [(a["loss"], b["loss"]) for a, b in zip(one, two)]
    assert all(abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * max(1.0, a["grad_norm"]) for a, b in zip(one, two))
    assert one[-1]["loss"] < one[0]["loss"] - 0.5
    w1 = load_file(tmp_path / "single" / "final" / "adapter_model.safetensors")
    w2 = load_file(tmp_path / "ddp" / "final" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys() and all(k.startswith("pairs.") for k in w1)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5


def test_ddp_resume_with_neftune_repeats_the_uninterrupted_run(tmp_path):
    data = write_color_data(tmp_path / "data.jsonl", max_reps=6)
    section = {"max_steps": STEPS, "save_every": 4, "keep_last": 5, "micro_batch_size": 2, "grad_accum": 1, "neftune_alpha": 5}
    cfg = sft_config(data, tmp_path / "ddp", data={"max_length": 256}, train=section)
    config_file = write_yaml(cfg, tmp_path / "ddp.yaml")
    torchrun_sft(config_file)
    uninterrupted = read_metrics(tmp_path / "ddp")
    resumed = resume_from_step_4(tmp_path / "ddp", config_file, tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    diffs = {r["step"]: (r["loss"], u["loss"]) for r, u in zip(resumed, uninterrupted) if abs(r["loss"] - u["loss"]) > 1e-6}
    assert not diffs, f"losses after a DDP resume differ at steps {sorted(diffs)}: {diffs}"

