"""PPO end to end on tiny-llama: reward rises while KL stays finite and is logged every step; a reward
model run scores the samples; under LoRA the reference is the policy with its adapter disabled (the base
weights are in memory once); a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import gc
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sft_fixtures import COLORS, torch_threads
from test_reward import rm_config, write_pairs

from posttrain.config import ConfigError, ModelConfig, PPOConfig, RewardConfig, load_config
from posttrain.models.load import load_model
from posttrain.train import ppo, reward


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


# -- programmatic rewards (referenced as python:test_ppo:NAME) ----------------------------------


def vowel_reward(prompt, response: str) -> float:
    """Share of the response's characters that are vowels: learnable by a tiny random policy in a few dozen steps."""
    return sum(ch in "aeiou" for ch in response) / max(1, len(response))


FINGERPRINTS: list[tuple[tuple[int, ...], float]] = []  # (shape, sum) of each 2-D weight of the initial model
COPIES: list[tuple[int, int]] = []  # per step: (fewest, most) live tensors matching one fingerprint
CALLS = {"left": 0, "per_step": 1}  # reward calls left in this step; calls per step (one per sample)


def count_copies() -> tuple[int, int]:
    gc.collect()
    warnings.simplefilter("ignore", FutureWarning)  # isinstance() on deprecated module attributes gc also finds
    shapes = {shape for shape, _ in FINGERPRINTS}
    sums = [
        float(o.detach().sum())
        for o in gc.get_objects()
        if isinstance(o, torch.Tensor) and tuple(o.shape) in shapes and o.dtype == torch.float32
    ]
    counts = [sum(1 for s in sums if abs(s - total) < 1e-4 * (1 + abs(total))) for _, total in FINGERPRINTS]
    return min(counts), max(counts)


def counting_reward(prompt, response: str) -> float:
    """vowel_reward; the first call of each step (when every model of the run exists) also counts the copies of the base weights."""
    if CALLS["left"] == 0:
        COPIES.append(count_copies())
        CALLS["left"] = CALLS["per_step"]
    CALLS["left"] -= 1
    return vowel_reward(prompt, response)


# -- helpers ------------------------------------------------------------------------------------


def write_prompts(path: Path) -> Path:
    with path.open("w") as f:
        for obj in sorted(COLORS) * 2:
            prompt = [{"role": "user", "content": f"What color is the {obj}?"}]
            f.write(json.dumps({"prompt": prompt, "completion": [{"role": "assistant", "content": f"The {obj} is {COLORS[obj]}."}]}) + "\n")
    return path


def ppo_config(prompts: Path, output_dir: Path, reward_spec: str = "python:test_ppo:vowel_reward", **sections) -> dict:
    cfg = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(prompts)},
        "reward": reward_spec,
        "adapter": {"kind": "full"},
        "train": {"lr": 1e-3, "max_steps": 40, "micro_batch_size": 8, "grad_accum": 1, "schedule": "constant", "device": "cpu", "seed": 0},
        "ppo": {"prompts_per_step": 16, "max_new_tokens": 4, "epochs": 4, "kl_coef": 0.01},
        "output_dir": str(output_dir),
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- tests --------------------------------------------------------------------------------------


def test_ppo_raises_reward_while_kl_stays_finite_and_logged(tmp_path):
    cfg = load_config(ppo_config(write_prompts(tmp_path / "prompts.jsonl"), tmp_path / "run"), cls=PPOConfig)
    result = ppo.train(cfg)

    rows = metrics(result.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))
    keys = {"reward", "kl", "entropy", "value_loss", "policy_loss", "clip_fraction", "response_length", "lr", "grad_norm"}
    assert all(keys <= set(r) and all(math.isfinite(r[k]) for k in keys) for r in rows)
    assert abs(rows[0]["kl"]) < 1e-5  # the policy starts as the reference
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (rows[:5], rows[-5:]))
    assert last > first + 0.1, f"reward did not rise: {[round(r['reward'], 3) for r in rows]}"
    assert max(r["kl"] for r in rows[-5:]) > 0.1  # it got there by moving away from the reference, and the KL shows it

    files = {p.name for p in result.final_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", ppo.VALUE_HEAD, ppo.INFO} <= files
    assert (result.run_dir / "reward.png").exists() and result.losses == [r["loss"] for r in rows]
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 40 * ppo.SAMPLES_PER_STEP and all(
        abs(s["score"] - vowel_reward(s["prompt"], s["response"])) < 1e-6 for s in samples
    )


def test_lora_reference_is_the_policy_with_its_adapter_disabled(tmp_path):
    """Each base weight of the model is in memory once under LoRA (no frozen copy), twice in full fine-tuning."""
    base = load_model(ModelConfig(name="tiny-llama"), torch.device("cpu"))
    FINGERPRINTS[:] = [(tuple(p.shape), float(p.detach().sum())) for p in base.parameters() if p.dim() == 2]
    del base
    # Copies other tests may still hold (a module fixture's zoo model) are counted too: measure them first.
    held_min, held_max = count_copies()
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    spec = "python:test_ppo:counting_reward"
    CALLS.update(left=0, per_step=16)

    COPIES.clear()
    lora = load_config(
        ppo_config(prompts, tmp_path / "lora", spec, adapter={"kind": "lora", "r": 8}, train={"max_steps": 3, "lr": 1e-2}), cls=PPOConfig
    )
    rows = ppo.train(lora).records
    assert COPIES == [(held_min + 1, held_max + 1)] * 3, COPIES
    # The reference really is the disabled adapter: KL is 0 before the first update, then the adapter moves the policy away.
    assert abs(rows[0]["kl"]) < 1e-5 and all(r["kl"] != 0 for r in rows[1:])

    # WeGeFT the same way: its switched-off pairs are the reference, no copy of the base
    COPIES.clear()
    CALLS.update(left=0)
    wegeft = load_config(
        ppo_config(prompts, tmp_path / "wegeft", spec, adapter={"kind": "wegeft", "r": 8}, train={"max_steps": 3, "lr": 5e-3}), cls=PPOConfig
    )
    rows = ppo.train(wegeft).records
    assert COPIES == [(held_min + 1, held_max + 1)] * 3, COPIES
    assert abs(rows[0]["kl"]) < 1e-5 and all(r["kl"] != 0 for r in rows[1:])

    COPIES.clear()
    CALLS.update(left=0)
    full = load_config(ppo_config(prompts, tmp_path / "full", spec, train={"max_steps": 1}), cls=PPOConfig)
    ppo.train(full)
    assert COPIES == [(held_min + 2, held_max + 2)], COPIES  # the frozen reference copy: the count does see copies


def test_ppo_scores_samples_with_a_reward_model_run(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 32, seed=0)
    rm_cfg = rm_config(pairs, write_pairs(tmp_path / "eval.jsonl", 8, seed=1), tmp_path / "rm", train={"max_steps": 4, "eval_every": None})
    rm_run = reward.train(load_config(rm_cfg, cls=RewardConfig)).run_dir

    # The preference file's prompts are the PPO prompts; reward: the rm run.
    cfg = load_config(
        ppo_config(pairs, tmp_path / "ppo", str(rm_run), train={"max_steps": 2}, ppo={"prompts_per_step": 8, "max_new_tokens": 8}),
        cls=PPOConfig,
    )
    result = ppo.train(cfg)
    rows = metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["kl"]) and math.isfinite(r["reward"]) for r in rows)

    scorer = reward.load_reward_model(rm_run, device="cpu")
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    rescored = scorer.score([ppo.scored_record(s["prompt"], s["response"]) for s in samples])
    assert len(samples) == 2 * ppo.SAMPLES_PER_STEP
    assert all(abs(a - s["score"]) < 1e-4 for a, s in zip(rescored, samples))


def test_resumed_ppo_repeats_the_uninterrupted_run(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    whole = ppo.train(load_config(ppo_config(prompts, tmp_path / "whole", train={"max_steps": 6, "save_every": 3}), cls=PPOConfig))

    # A run that stopped after step 3: the same config with only step 3's checkpoint, resumed.
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole.run_dir / "checkpoints" / "step-3", tmp_path / "resumed" / "checkpoints" / "step-3")
    resumed = ppo.train(
        load_config(ppo_config(prompts, tmp_path / "resumed", train={"max_steps": 6, "save_every": 3}, resume=True), cls=PPOConfig)
    )

    assert [r["step"] for r in resumed.records] == [4, 5, 6]
    for got, want in zip(resumed.records, whole.records[3:]):
        bad = {k: (got[k], want[k]) for k in want if k != "seconds" and abs(got[k] - want[k]) > 1e-6}
        assert not bad, f"step {want['step']}: {bad}"
    a = load_file(whole.run_dir / "checkpoints" / "step-6" / "trainable.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-6" / "trainable.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_ppo_config_lists_every_problem(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    raw = ppo_config(prompts, tmp_path / "run", "only_a_module", train={"micro_batch_size": 5, "neftune_alpha": 5})
    with pytest.raises(ConfigError) as err:
        load_config(raw, cls=PPOConfig)
    message = str(err.value)
    assert "package.module:function" in message and "multiple of train.micro_batch_size" in message and "neftune_alpha" in message
    with pytest.raises(ConfigError, match="no such directory"):
        load_config(ppo_config(prompts, tmp_path / "run", str(tmp_path / "missing-rm")), cls=PPOConfig)
