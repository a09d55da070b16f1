"""Reward models end to end on tiny-llama: Bradley–Terry training reaches high held-out pair accuracy, the
run directory holds a loadable model, ``score_file`` scores (prompt, response) records where training did,
and LoRA trains exactly the adapter and the head."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sft_fixtures import torch_threads

from posttrain.config import ConfigError, RewardConfig, load_config
from posttrain.data.chat import ChatRenderer, RenderOptions
from posttrain.data.formats import read_records
from posttrain.models.adapters import apply_adapter
from posttrain.models.load import load_model, load_tokenizer
from posttrain.train import reward

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "sea",
    "light",
    "water",
    "plants",
    "sugar",
    "morning",
    "meeting",
    "robot",
]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def write_pairs(path: Path, n: int, seed: int) -> Path:
    """Learnable preferences: both responses are the same random words with two words inserted at the same
    place, "thank you" in the chosen one and "go away" in the rejected one (same length, any position)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words = rng.sample(WORDS, 6)
            k = rng.randrange(len(words) + 1)
            chosen = " ".join(words[:k] + ["thank", "you"] + words[k:])
            rejected = " ".join(words[:k] + ["go", "away"] + words[k:])
            prompt = [{"role": "user", "content": f"Tell me about the {rng.choice(WORDS)}."}]
            f.write(
                json.dumps(
                    {
                        "prompt": prompt,
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}],
                    }
                )
                + "\n"
            )
    return path


def rm_config(data: Path, eval_data: Path, output_dir: Path, **sections) -> dict:
    cfg = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(data), "eval_path": str(eval_data), "max_length": 64},
        "adapter": {"kind": "full"},
        "train": {
            "lr": 3e-3,
            "max_steps": 20,
            "micro_batch_size": 4,
            "grad_accum": 2,
            "warmup_steps": 2,
            "device": "cpu",
            "eval_every": 10,
            "seed": 0,
        },
        "output_dir": str(output_dir),
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    data, held_out = write_pairs(root / "train.jsonl", 160, seed=0), write_pairs(root / "eval.jsonl", 40, seed=1)
    with torch_threads(1):
        cfg = load_config(rm_config(data, held_out, root / "run"), cls=RewardConfig)
        result = reward.train(cfg)
    return result, cfg, held_out


def test_rm_reaches_high_held_out_pair_accuracy(rm_run):
    result, cfg, held_out = rm_run
    # The untrained model (same seed, same head initialisation) is near chance on the held-out pairs.
    tokenizer = load_tokenizer(cfg.model.name)
    pairs, _ = reward.render_pairs(ChatRenderer(tokenizer, RenderOptions(max_length=64)), read_records(held_out))
    torch.manual_seed(cfg.train.seed)
    untrained = reward.reward_model(load_model(cfg.model, torch.device("cpu")))
    before = reward.evaluate(untrained, pairs, 8, reward.pad_id_of(tokenizer), torch.device("cpu"), False)["accuracy"]
    assert before < 0.75

    assert result.eval_accuracy is not None and result.eval_accuracy >= 0.9, result.records[-1]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all({"loss", "accuracy", "margin", "lr", "grad_norm"} <= set(r) for r in rows)
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [10, 20]
    assert sum(r["loss"] for r in rows[-5:]) < 0.5 * sum(r["loss"] for r in rows[:5])
    final = {p.name for p in result.final_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", reward.SCORE_HEAD, reward.INFO} <= final
    assert (result.run_dir / "loss.png").exists() and (result.run_dir / "checkpoints" / "step-20").is_dir()


def test_rm_score_writes_one_score_per_record_ranking_chosen_first(rm_run, tmp_path):
    result, _, held_out = rm_run
    pairs = read_records(held_out)
    records = tmp_path / "responses.jsonl"
    with records.open("w") as f:
        for p in pairs:
            for side in ("chosen", "rejected"):
                f.write(json.dumps({"prompt": p["prompt"], "completion": p[side]}) + "\n")
    n = reward.score_file(result.run_dir, records, tmp_path / "scores.jsonl", batch_size=7)
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert n == len(scored) == 2 * len(pairs)
    assert all(isinstance(r["score"], float) and "completion" in r for r in scored)
    chosen, rejected = [r["score"] for r in scored[0::2]], [r["score"] for r in scored[1::2]]
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 0.9 * len(pairs)

    # The loaded model scores a (prompt, response) exactly where training scored the pair's sides.
    scorer = reward.load_reward_model(result.run_dir, device="cpu")
    renderer = ChatRenderer(scorer.tokenizer, RenderOptions(max_length=64))
    train_pairs, _ = reward.render_pairs(renderer, pairs[:4])
    with torch.no_grad():
        c, r = reward.pair_scores(scorer.model, train_pairs, reward.pad_id_of(scorer.tokenizer), torch.device("cpu"))
    assert torch.allclose(c, torch.tensor(chosen[:4]), atol=1e-5) and torch.allclose(r, torch.tensor(rejected[:4]), atol=1e-5)


def test_lora_rm_trains_exactly_the_adapter_and_head(tmp_path):
    data, held_out = write_pairs(tmp_path / "train.jsonl", 64, seed=0), write_pairs(tmp_path / "eval.jsonl", 16, seed=1)
    cfg = load_config(
        rm_config(
            data, held_out, tmp_path / "run", adapter={"kind": "lora", "r": 8}, train={"lr": 1e-2, "max_steps": 8, "eval_every": None, "bf16": False}
        ),
        cls=RewardConfig,
    )
    torch.manual_seed(cfg.train.seed)  # peft initialises the adapter from the torch RNG, as train() does after seeding
    initial = reward.reward_model(apply_adapter(load_model(cfg.model, torch.device("cpu")), cfg.adapter))
    before = {n: p.detach().clone() for n, p in initial.named_parameters() if p.requires_grad}
    result = reward.train(cfg)

    after = load_file(result.run_dir / "checkpoints" / "step-8" / "trainable.safetensors")
    assert set(after) == set(before)
    assert all("lora_" in n or n.startswith("head.") for n in after) and {"head.weight", "head.bias"} <= set(after)
    assert not [n for n in after if torch.equal(after[n], before[n])], "trainable parameters that did not change"
    assert (result.final_dir / "adapter_config.json").exists() and not (result.final_dir / "model.safetensors").exists()

    # Loading merges the adapter; the loaded model agrees with the one evaluated at the end of training.
    scorer = reward.load_reward_model(result.run_dir, device="cpu")
    pairs, _ = reward.render_pairs(ChatRenderer(scorer.tokenizer, RenderOptions(max_length=64)), read_records(held_out))
    accuracy = reward.evaluate(scorer.model, pairs, 8, reward.pad_id_of(scorer.tokenizer), torch.device("cpu"), False)["accuracy"]
    assert accuracy == result.eval_accuracy


def test_rm_config_lists_every_problem(tmp_path):
    data = write_pairs(tmp_path / "train.jsonl", 4, seed=0)
    with pytest.raises(ConfigError) as err:
        load_config(
            {"model": {"name": "tiny-llama"}, "data": {"path": str(data), "packing": True}, "train": {"neftune_alpha": 5, "eval_every": 2}},
            cls=RewardConfig,
        )
    message = str(err.value)
    assert "data.packing" in message and "neftune_alpha" in message and "eval_every" in message


def test_resumed_rm_repeats_the_uninterrupted_run(tmp_path):
    data, held_out = write_pairs(tmp_path / "train.jsonl", 64, seed=0), write_pairs(tmp_path / "eval.jsonl", 8, seed=1)
    sections = {"train": {"max_steps": 8, "save_every": 4, "eval_every": None}}
    whole = reward.train(load_config(rm_config(data, held_out, tmp_path / "whole", **sections), cls=RewardConfig))
    # A run that stopped after step 4: only step 4's checkpoint, resumed with the same config.
    shutil.copytree(whole.run_dir / "checkpoints" / "step-4", tmp_path / "resumed" / "checkpoints" / "step-4")
    resumed = reward.train(load_config(rm_config(data, held_out, tmp_path / "resumed", resume=True, **sections), cls=RewardConfig))
    assert len(resumed.losses) == 4
    assert max(abs(a - b) for a, b in zip(resumed.losses, whole.losses[4:])) < 1e-6
    assert resumed.eval_accuracy == whole.eval_accuracy
