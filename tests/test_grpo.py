"""GRPO end to end on tiny models: a learnable reward rises (verifier and function rewards), the LoRA
reference is the disabled adapter (no second copy of the weights), resume repeats the uninterrupted run,
and configs that cannot work fail before any model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sft_fixtures import read_metrics, torch_threads

from posttrain.config import ConfigError, GRPOConfig, ModelConfig, load_config
from posttrain.models.adapters import apply_adapter
from posttrain.models.load import load_model
from posttrain.train import grpo
from posttrain.train.forward import Forward, pack, scored_examples, scored_mask
from posttrain.train.losses import IGNORE

QUESTIONS = [
    "What color is the sky?",
    "Write a poem about the sea.",
    "Give me three tips for staying healthy.",
    "Translate good morning into Spanish.",
    "What is two plus two?",
    "Summarize the meeting notes.",
    "Explain how photosynthesis works.",
    "Tell me about Paris.",
]

# Learnable by a tiny random model in a few steps: about 1 in 5 of its 6-token samples uses the letter
# "e" twice, so most groups hold both rewards and the advantages are not zero; a shift of the output
# distribution towards tokens with an "e" is all it takes. No commas passes ~97% from the start: it is
# there so that pass rates are logged per instruction type.
E_TWICE = {"letter": "e", "let_frequency": 2, "let_relation": "at least"}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def write_ifeval_prompts(path: Path) -> Path:
    with path.open("w") as f:
        for key, q in enumerate(QUESTIONS):
            ids, kwargs = ["keywords:letter_frequency"], [E_TWICE]
            if key % 2:
                ids, kwargs = ids + ["punctuation:no_comma"], kwargs + [{}]
            f.write(
                json.dumps({"key": key, "prompt": f"{q} Use the letter e at least twice.", "instruction_id_list": ids, "kwargs": kwargs})
                + "\n"
            )
    return path


def write_plain_prompts(path: Path) -> Path:
    """The prompts format: only a prompt per line (and a field the reward function reads)."""
    with path.open("w") as f:
        for q in QUESTIONS:
            f.write(json.dumps({"prompt": q, "letter": "e"}) + "\n")
    return path


def letter_reward(prompt: str, completion: str, record: dict) -> float:
    """1 when the completion uses the record's letter at least twice: a programmatic reward for GRPO."""
    assert isinstance(prompt, str) and prompt in QUESTIONS
    return float(completion.lower().count(record["letter"]) >= 2)


def grpo_config(prompts_path: Path, run_dir: Path, /, **sections: Any) -> GRPOConfig:
    """Full fine-tuning of tiny-llama, 25 steps of 4 prompts × 8 samples of 6 tokens, lr 5e-3, β 0; ``sections`` override."""
    raw: dict[str, Any] = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(prompts_path)},
        "adapter": {"kind": "full"},
        "train": {
            "lr": 5e-3,
            "max_steps": 25,
            "seed": 0,
            "device": "cpu",
            "micro_batch_size": 16,
            "schedule": "constant",
            "warmup_steps": 0,
        },
        "grpo": {
            "group_size": 8,
            "prompts_per_step": 4,
            "max_new_tokens": 6,
            "temperature": 1.0,
            "beta": 0.0,
            "reward": "verifiers:strict",
        },
        "output_dir": str(run_dir),
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(raw, cls=GRPOConfig)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verifier_reward_rises(tmp_path, seed):
    cfg = grpo_config(write_ifeval_prompts(tmp_path / "prompts.jsonl"), tmp_path / "run", train={"seed": seed})
    result = grpo.train(cfg)

    first, last = mean(result.rewards[:5]), mean(result.rewards[-5:])
    assert last - first >= 0.3, f"reward did not rise: {[round(r, 2) for r in result.rewards]}"
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 26))
    for key in ("loss", "reward_mean", "reward_std", "kl", "clip_fraction", "completion_length", "lr", "grad_norm"):
        assert all(key in r for r in rows), key
    assert all(r["kl"] == 0.0 and r["clip_fraction"] == 0.0 for r in rows)  # β = 0, μ = 1: no reference, ratio 1
    assert all(0 < r["completion_length"] <= 6 for r in rows)
    letter = [r["pass_rate/keywords:letter_frequency"] for r in rows]
    assert mean(letter[-5:]) - mean(letter[:5]) >= 0.3
    assert any("pass_rate/punctuation:no_comma" in r for r in rows)
    files = {str(p.relative_to(result.run_dir)) for p in result.run_dir.rglob("*") if p.is_file()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "reward.png",
        "data_stats.json",
        "final/model.safetensors",
        "checkpoints/step-25/trainable.safetensors",
    } <= files
    assert load_config(result.run_dir / "config.yaml", cls=GRPOConfig) == cfg
    assert result.reference == "none"


def test_function_reward_on_plain_prompts_rises_with_several_updates_per_batch(tmp_path):
    """A ``module:function`` reward on prompts without instructions; μ = 2 updates move the ratio off 1."""
    cfg = grpo_config(
        write_plain_prompts(tmp_path / "prompts.jsonl"),
        tmp_path / "run",
        grpo={"reward": "test_grpo:letter_reward", "updates_per_batch": 2},
        train={"lr": 3e-3},
    )
    result = grpo.train(cfg)
    assert mean(result.rewards[-5:]) - mean(result.rewards[:5]) >= 0.3, [round(r, 2) for r in result.rewards]
    rows = read_metrics(result.run_dir)
    assert any(r["clip_fraction"] > 0 for r in rows)  # the second update sees ratios away from 1
    assert not any(k.startswith("pass_rate/") for r in rows for k in r)


@pytest.mark.parametrize("kind", ["lora", "wegeft"])
def test_lora_reference_is_the_disabled_adapter_not_a_copy(tmp_path, monkeypatch, kind):
    cfg = grpo_config(
        write_ifeval_prompts(tmp_path / "prompts.jsonl"),
        tmp_path / "run",
        adapter={"kind": kind, "r": 8},
        grpo={"beta": 0.04},
        train={"lr": 3e-2, "max_steps": 6},
    )
    # 1. the reference's log-probs are the base model's, whatever the adapter has learnt
    torch.manual_seed(0)
    policy = apply_adapter(load_model(cfg.model, torch.device("cpu")), cfg.adapter)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name or name.endswith(".phi"):
                p.normal_(0, 0.5)  # an adapter that has moved the model
    reference = grpo.make_reference(policy, cfg.grpo.beta, cfg.adapter.kind)
    assert reference.kind == "adapter" and reference.frozen is None
    batch = pack(scored_examples([[5, 17, 42, 99, 7, 3], [8, 2, 61, 5]], [3, 2]), pad_id=0)  # tokens 99, 7, 3 and 61, 5 scored
    base = load_model(cfg.model, torch.device("cpu"))
    want = grpo.sequence_logps(Forward(base), batch)
    assert want.shape == (2, 6) and (want[:, :1] == 0).all() and (want[0, 2:5] != 0).all() and (want[1, 1:3] != 0).all()
    assert torch.allclose(reference.logps(batch), want, atol=1e-5)
    assert not torch.allclose(grpo.sequence_logps(Forward(policy), batch), want, atol=1e-3)  # the adapter is back on

    # 2. a run with β > 0 loads the model once and copies no module
    loads = []
    real_load = grpo.load_model
    monkeypatch.setattr(grpo, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))

    real_deepcopy = grpo.copy.deepcopy

    def no_copies(obj, *args):
        assert not isinstance(obj, torch.nn.Module), f"the reference copied a {type(obj).__name__}"
        return real_deepcopy(obj, *args)

    monkeypatch.setattr(grpo.copy, "deepcopy", no_copies)
    result = grpo.train(cfg)
    assert result.reference == "adapter" and len(loads) == 1
    rows = read_metrics(result.run_dir)
    assert rows[0]["kl"] < 1e-6  # the adapter starts as the identity (lora_B = 0, WeGeFT's phi = 0)
    assert rows[-1]["kl"] > 0 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_reference_kinds():
    model = load_model(ModelConfig(name="tiny-llama"), torch.device("cpu"))
    assert grpo.make_reference(model, 0.0, "full").kind == "none"
    frozen = grpo.make_reference(model, 0.04, "full")
    assert frozen.kind == "copy" and frozen.frozen is not model
    assert not any(p.requires_grad for p in frozen.frozen.parameters())


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    prompts = write_ifeval_prompts(tmp_path / "prompts.jsonl")
    whole = grpo.train(grpo_config(prompts, tmp_path / "whole", train={"max_steps": 6, "save_every": 3, "keep_last": 3}))
    # the same run stopped after its step-3 checkpoint, then resumed
    part = tmp_path / "part"
    grpo.train(grpo_config(prompts, part, train={"max_steps": 6, "save_every": 3, "keep_last": 3}))
    (part / "checkpoints" / "step-6" / "state.json").unlink()  # an incomplete checkpoint is never loaded
    resumed = grpo.train(grpo_config(prompts, part, train={"max_steps": 6, "save_every": 3, "keep_last": 3}, resume=True))
    assert len(resumed.rewards) == 3
    want = {r["step"]: (r["reward_mean"], r["loss"]) for r in read_metrics(whole.run_dir)}
    got = {r["step"]: (r["reward_mean"], r["loss"]) for r in read_metrics(part)}
    assert got == want


def test_samples_are_packed_without_padding_and_score_only_completion_tokens():
    batch = pack(scored_examples([[1, 2, 3, 4, 5], [1, 2, 6], [7, 8]], [3, 2, 1]), pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 6, 7, 8]] and batch.attention_mask is None  # two sequences share a row
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert batch.target_ids.tolist() == [[IGNORE, IGNORE, 4, 5, IGNORE], [IGNORE, 6, IGNORE, 8, IGNORE]]
    assert scored_mask(batch).int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]  # each sequence from column 0


def test_configs_that_cannot_work_fail_before_loading(tmp_path):
    prompts = write_plain_prompts(tmp_path / "prompts.jsonl")
    with pytest.raises(ConfigError) as err:
        grpo_config(prompts, tmp_path / "run", data={"format": "prompts"}, grpo={"reward": "not a spec", "group_size": 1})
    text = str(err.value)
    assert "grpo.reward" in text and "grpo.group_size" in text  # every problem at once
    with pytest.raises(ConfigError, match="grad_accum"):
        grpo_config(prompts, tmp_path / "run", train={"grad_accum": 2})
    with pytest.raises(ConfigError, match="needs IFEval-format prompts"):
        grpo_config(prompts, tmp_path / "run", data={"format": "prompts"})
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        grpo.train(grpo_config(prompts, tmp_path / "run", grpo={"reward": "no_such_module:f"}))
    with pytest.raises(grpo.loop.TrainingError, match="needs IFEval-format prompts"):
        grpo.train(grpo_config(prompts, tmp_path / "run"))  # verifier reward, detected prompts format


def test_python_rewards_are_named_the_same_way_for_grpo_and_ppo(tmp_path):
    """package.module:function, with or without python:, two or three parameters: one importer for both loops."""
    from posttrain.train.reward import import_reward_function

    two = import_reward_function("python:test_grpo:_two_args")
    three = import_reward_function("test_grpo:_three_args")
    assert two("p", "abc", {"k": 1}) == 3.0 and three("p", "abc", {"k": 1}) == 4.0
    with pytest.raises(ValueError, match="has no function 'nope'"):
        import_reward_function("test_grpo:nope")


def _two_args(prompt, completion):
    return len(completion)


def _three_args(prompt, completion, record):
    return len(completion) + record["k"]


def test_cpu_updates_run_each_micro_batch_as_one_row_with_the_same_losses(tmp_path, monkeypatch):
    # On CPU a micro-batch's samples run as one row, each group's prompt once (Forward's one row); the
    # losses equal those of the rows as given (the first step's samples are the same in both runs).
    from transformers.models.llama import modeling_llama

    from posttrain.train import packed_attention

    prompts = write_ifeval_prompts(tmp_path / "prompts.jsonl")
    calls = []
    real = modeling_llama.LlamaModel.forward

    def forward(self, *args, **kwargs):
        if packed_attention.active(self):
            calls.append(tuple(kwargs["input_ids"].shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", forward)
    settings = {"train": {"max_steps": 2}, "grpo": {"beta": 0.04}, "adapter": {"kind": "lora", "r": 8, "alpha": 16}}
    with torch_threads(1):
        one_row = grpo.train(grpo_config(prompts, tmp_path / "one_row", **settings))
        assert calls and all(rows == 1 for rows, _ in calls)  # the reference's and the update's forwards
        calls.clear()
        monkeypatch.setattr(grpo, "one_row_here", lambda *a: False)
        rows = grpo.train(grpo_config(prompts, tmp_path / "rows", **settings))
    assert not calls
    assert one_row.losses[0] == pytest.approx(rows.losses[0], rel=1e-4, abs=1e-6)
    assert one_row.rewards[0] == rows.rewards[0]
