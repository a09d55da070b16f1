"""FSDP2 on CPU (torchrun, gloo, 2 processes): the same run as one process, sharded.

Per-step losses, gradient norms, eval losses and final weights equal one process's within 1e-5, for full
fine-tuning (with gradient checkpointing) and LoRA, with a short last step and an odd eval split that give
the two processes different numbers of micro-batches (every FSDP forward is a collective, so without
balancing them the run would hang); ``final/`` is a plain Hugging Face directory that transformers (and
peft) load and that generates the same greedy tokens as one process's; a run killed with SIGKILL resumes
from its sharded checkpoint to the uninterrupted run's losses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sft_fixtures import (
    PROMPTS,
    free_port,
    kill_at_step,
    probed_collectives,
    read_metrics,
    sft_config,
    subprocess_env,
    torch_threads,
    torchrun,
    write_color_data,
    write_yaml,
)

from posttrain.config import load_config
from posttrain.models.load import resolve
from posttrain.train import loop
from posttrain.train.sft import train


def greedy(final: Path, adapter: str, prompts: list[str], tokens: int = 8) -> list[list[int]]:
    """Greedy continuations from ``final/`` loaded by plain transformers (and peft for an adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    if adapter == "full":
        model = AutoModelForCausalLM.from_pretrained(final)
    elif adapter == "wegeft":
        from posttrain.models.wegeft import load_wegeft

        model = load_wegeft(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")), final)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")), str(final))
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            gen = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            out.append(gen[0, ids.shape[1] :].tolist())
    return out


@pytest.mark.parametrize("adapter, checkpointing", [("full", True), ("lora", False), ("wegeft", False)])
def test_fsdp_matches_one_process(tmp_path, adapter, checkpointing):
    # 27 training rows at 4 a step: 6 steps and a short 7th of 3 rows (1 / 2 per process, micro-batches of
    # one row); 3 eval rows (2 / 1).
    data = write_color_data(tmp_path / "data.jsonl", n=30, max_reps=4)
    common = dict(
        model={"name": "tiny-llama", "gradient_checkpointing": checkpointing},
        data={"max_length": 128, "eval_fraction": 0.1},
        adapter={"kind": adapter, "r": 8, "alpha": 16},
        train={"max_steps": 7, "eval_every": 7, "lr": 3e-3, "bf16": False, "micro_batch_size": 1},
    )
    single = sft_config(data, tmp_path / "single", **common)
    single["train"]["grad_accum"] = 4
    with torch_threads(1):
        train(load_config(single))
    sharded = sft_config(data, tmp_path / "fsdp", **common)
    sharded["train"].update(grad_accum=2, distributed="fsdp")
    torchrun("sft", write_yaml(sharded, tmp_path / "fsdp.yaml"), probe=tmp_path / "probe")

    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "fsdp")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 8))
    for key in ("loss", "grad_norm", "eval_loss"):
        pairs = [(a[key], b[key]) for a, b in zip(one, two) if key in a]
        assert pairs and max(abs(a - b) for a, b in pairs) <= 1e-5 * max(1.0, max(abs(a) for a, _ in pairs)), (key, pairs)
    assert one[-1]["loss"] < one[0]["loss"], "the run should learn, so a wrong update would show"

    name = "model.safetensors" if adapter == "full" else "adapter_model.safetensors"
    w1, w2 = load_file(tmp_path / "single" / "final" / name), load_file(tmp_path / "fsdp" / "final" / name)
    assert w1.keys() == w2.keys() and w1
    # WeGeFT's shared pair sums every layer's gradient, in another order under FSDP: 1.007e-5 seen after 7 steps
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= (2e-5 if adapter == "wegeft" else 1e-5)
    checkpoint = loop.latest_checkpoint(tmp_path / "fsdp")
    assert (checkpoint / loop.SHARDED_DIR / ".metadata").exists() and not (checkpoint / "trainable.safetensors").exists()
    with torch_threads(1):
        assert greedy(tmp_path / "fsdp" / "final", adapter, PROMPTS) == greedy(tmp_path / "single" / "final", adapter, PROMPTS)
    calls = probed_collectives(tmp_path / "probe")
    assert any(name in ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor") for name, _ in calls[0]), "FSDP's own collectives should be seen"


def launch(config_file: Path, *args: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "posttrain.cli", "sft", "--config", str(config_file), *args,
    ]  # fmt: skip
    env = subprocess_env(OMP_NUM_THREADS="1")
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_fsdp_sigkill_then_resume_repeats_the_uninterrupted_run(tmp_path):
    data = write_color_data(tmp_path / "data.jsonl", n=96, max_reps=8)
    base = dict(data={"max_length": 256}, adapter={"kind": "full"}, train={"max_steps": 16, "save_every": 4, "keep_last": 10, "lr": 3e-3, "bf16": False, "micro_batch_size": 2, "grad_accum": 1, "distributed": "fsdp"})
    whole = sft_config(data, tmp_path / "whole", **base)
    torchrun("sft", write_yaml(whole, tmp_path / "whole.yaml"))
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "whole")}

    run = tmp_path / "run"
    config_file = write_yaml(sft_config(data, run, **base), tmp_path / "run.yaml")
    proc = launch(config_file)
    kill_at_step(proc, run, 6, group=True, timeout=240)  # torchrun and both ranks, mid-run
    latest = loop.latest_checkpoint(run)
    assert latest is not None and int(latest.name.split("-")[1]) < 16, "the kill should land before the run's end"
    torchrun("sft", config_file, "--resume")
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert max(abs(r["loss"] - want[r["step"]]) for r in rows) <= 1e-6, [(r["loss"], want[r["step"]]) for r in rows]
    final = load_file(run / "final" / "model.safetensors")
    reference = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    assert max((final[k] - reference[k]).abs().max().item() for k in final) <= 1e-6


def test_fsdp_lora_in_bf16_trains(tmp_path):
    """bf16 through FSDP2's MixedPrecisionPolicy (fp32 shards, bf16 compute), as a GPU run would use it."""
    data = write_color_data(tmp_path / "data.jsonl", n=32)
    cfg = sft_config(data, tmp_path / "run", adapter={"kind": "lora", "r": 8, "alpha": 16}, train={"max_steps": 4, "bf16": True, "micro_batch_size": 2, "grad_accum": 1, "distributed": "fsdp"})
    torchrun("sft", write_yaml(cfg, tmp_path / "run.yaml"))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in rows)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


def test_fsdp_dpo_kto_matches_one_process_and_resumes_after_an_eval(tmp_path):
    """DPO under FSDP: the reference precompute runs sharded (split over the processes), evaluation and
    KTO's z0 pass run without a backward, and a checkpoint written right after an eval resumes exactly
    (FSDP2 keeps the root gathered after a forward without backward: those passes must free it again, or
    the optimizer and the checkpoint would hold the gathered tensors instead of the shards)."""
    from test_dpo import write_pairs

    from posttrain.train import dpo

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=30)
    base = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(pairs), "max_length": 128, "eval_fraction": 0.1},
        "adapter": {"kind": "full"},
        "train": {"lr": 2e-3, "max_steps": 7, "micro_batch_size": 1, "eval_every": 3, "save_every": 3, "keep_last": 5, "seed": 0, "device": "cpu", "bf16": False, "schedule": "constant"},
        "dpo": {"beta": 0.1, "loss_type": "kto"},
    }
    with torch_threads(1):
        dpo.train(load_config({**base, "train": {**base["train"], "grad_accum": 4}, "output_dir": str(tmp_path / "single")}, cls=dpo.DPOConfig))
    sharded = {**base, "train": {**base["train"], "grad_accum": 2, "distributed": "fsdp"}, "output_dir": str(tmp_path / "fsdp")}
    config_file = write_yaml(sharded, tmp_path / "fsdp.yaml")
    torchrun("dpo", config_file, cache=tmp_path / "fsdp-cache")
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "fsdp")
    for key in ("loss", "grad_norm", "kto_z0", "eval_loss"):
        got = [(a[key], b[key]) for a, b in zip(one, two) if key in a]
        assert len(got) >= 2 and max(abs(a - b) for a, b in got) <= 1e-5 * max(1.0, max(abs(a) for a, _ in got)), (key, got)
    import json

    assert json.loads((tmp_path / "fsdp" / "data_stats.json").read_text())["reference"]["scored_by_process"] == [45, 45]

    # Back to the step-3 checkpoint (written right after step 3's eval), then resume under torchrun.
    import shutil

    for name in ("step-6", "step-7"):
        shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / name)
    shutil.rmtree(tmp_path / "fsdp" / "final")
    torchrun("dpo", config_file, "--resume", cache=tmp_path / "fsdp-cache")
    resumed = read_metrics(tmp_path / "fsdp")
    assert [r["step"] for r in resumed] == list(range(1, 8))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(resumed, two)) <= 1e-6, ([r["loss"] for r in resumed], [r["loss"] for r in two])
