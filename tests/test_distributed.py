"""Several processes (torchrun, gloo on CPU) where the work does not split evenly: a short last step and an
odd number of eval rows give the ranks different numbers of micro-batches. Every rank must make the same
collectives in the same order, with its tensors on the group's device (recorded by collective_probe.py),
and the run must equal one process. SFT, DPO with KTO (its reference point is a collective), GRPO (ranks
get different numbers of prompts), reward models and PPO (which used to refuse torchrun)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from sft_fixtures import probed_collectives, read_metrics, sft_config, torch_threads, torchrun, write_color_data, write_yaml
from test_dpo import write_pairs
from test_grpo import write_ifeval_prompts
from test_ppo import write_prompts

from posttrain.config import GRPOConfig, PPOConfig, RewardConfig, load_config
from posttrain.train import dpo, grpo, ppo, reward
from posttrain.train.sft import train as sft_train


def assert_same_run(one: list[dict], two: list[dict], keys: tuple[str, ...], tol: float = 1e-5) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two] and one
    for key in keys:
        a, b = [r.get(key) for r in one], [r.get(key) for r in two]
        assert (a[0] is None) == (b[0] is None) and all((x is None) == (y is None) for x, y in zip(a, b)), key
        diffs = [abs(x - y) for x, y in zip(a, b) if x is not None]
        assert diffs and max(diffs) <= tol * max(1.0, max(abs(x) for x in a if x is not None)), (key, a, b)


def test_sft_short_last_step_and_odd_eval_split_match_one_process(tmp_path):
    # 30 examples, 3 held out: 27 training rows at 4 a step = 6 steps and a last one of 3 rows, which the
    # two processes split 1 / 2 (one micro-batch / two, at micro_batch_size 1). The 3 eval rows split 2 / 1.
    data = write_color_data(tmp_path / "data.jsonl", n=30, max_reps=4)
    common = dict(data={"max_length": 128, "eval_fraction": 0.1}, train={"max_steps": 7, "eval_every": 7, "lr": 3e-3, "bf16": False, "micro_batch_size": 1})
    single = sft_config(data, tmp_path / "single", **common)
    single["train"]["grad_accum"] = 4
    with torch_threads(1):
        sft_train(load_config(single))
    ddp = sft_config(data, tmp_path / "ddp", **common)
    ddp["train"]["grad_accum"] = 2
    # A cache of its own: the two processes tokenize half the records each, and rank 0 joins the halves.
    torchrun("sft", write_yaml(ddp, tmp_path / "ddp.yaml"), probe=tmp_path / "probe", cache=tmp_path / "ddp-cache")
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert one[-1]["trained_tokens"] < one[0]["trained_tokens"], "the last step should be the short one"
    assert_same_run(one, two, ("loss", "grad_norm", "trained_tokens", "eval_loss"))
    calls = probed_collectives(tmp_path / "probe")
    assert sum(name == "all_reduce" for name, _ in calls[0]) >= 7 * 2, "each step reduces its token count and its loss"
    stats = json.loads((tmp_path / "ddp" / "data_stats.json").read_text())
    assert stats["read"]["tokenized_by_process"] == [15, 15]
    (joined,) = (tmp_path / "ddp-cache" / "tokenized").iterdir()
    alone = Path(os.environ["POSTTRAIN_CACHE"]) / "tokenized" / joined.name
    for name in ("input_ids.npy", "labels.npy", "offsets.npy"):
        assert np.array_equal(np.load(joined / name), np.load(alone / name)), f"the joined shares differ from one process's {name}"


def test_dpo_kto_uneven_split_matches_one_process(tmp_path):
    # 30 pairs, 3 held out; 27 at 4 a step: the last step has 3 pairs (1 / 2 per process). KTO's reference
    # point is estimated over the whole step, so it is the same number however the pairs are split.
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=30)
    base = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(pairs), "max_length": 128, "eval_fraction": 0.1},
        "train": {"lr": 2e-3, "max_steps": 7, "micro_batch_size": 1, "eval_every": 7, "seed": 0, "device": "cpu", "bf16": False, "schedule": "constant"},
        "dpo": {"beta": 0.1, "loss_type": "kto"},
    }
    single = {**base, "train": {**base["train"], "grad_accum": 4}, "output_dir": str(tmp_path / "single")}
    with torch_threads(1):
        dpo.train(load_config(single, cls=dpo.DPOConfig))
    double = {**base, "train": {**base["train"], "grad_accum": 2}, "output_dir": str(tmp_path / "ddp")}
    torchrun("dpo", write_yaml(double, tmp_path / "ddp.yaml"), probe=tmp_path / "probe", cache=tmp_path / "ddp-cache")
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert_same_run(one, two, ("loss", "grad_norm", "kto_z0", "accuracy", "eval_loss", "eval_accuracy"))
    assert max(r["kto_z0"] for r in one) > 0, "z0 should move off 0 as the policy moves, for the test to mean something"
    probed_collectives(tmp_path / "probe")
    # The reference precompute was split: each process scored some of the 90 sequences (chosen, rejected,
    # mismatched of 30 pairs), and the summed table equals one process's.
    shares = json.loads((tmp_path / "ddp" / "data_stats.json").read_text())["reference"]["scored_by_process"]
    assert len(shares) == 2 and min(shares) > 0 and sum(shares) == 90, shares
    (split,) = (tmp_path / "ddp-cache" / "reference").iterdir()
    alone = np.load(Path(os.environ["POSTTRAIN_CACHE"]) / "reference" / split.name / "logps.npy")
    assert np.allclose(np.load(split / "logps.npy"), alone, rtol=0, atol=1e-6)


def test_grpo_uneven_prompts_match_one_process(tmp_path):
    # 3 prompts a step over 2 processes: 1 and 2 prompts, 2 and 4 samples, one and two micro-batches.
    prompts = write_ifeval_prompts(tmp_path / "prompts.jsonl")
    raw = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(prompts)},
        "adapter": {"kind": "full"},
        "train": {"lr": 5e-3, "max_steps": 4, "seed": 0, "device": "cpu", "micro_batch_size": 2, "schedule": "constant", "warmup_steps": 0, "bf16": False},
        "grpo": {"group_size": 2, "prompts_per_step": 3, "max_new_tokens": 6, "temperature": 1.0, "beta": 0.04, "reward": "verifiers:strict"},
    }
    with torch_threads(1):
        grpo.train(load_config({**raw, "output_dir": str(tmp_path / "single")}, cls=GRPOConfig))
    torchrun("grpo", write_yaml({**raw, "output_dir": str(tmp_path / "ddp")}, tmp_path / "ddp.yaml"), probe=tmp_path / "probe")
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert_same_run(one, two, ("loss", "reward_mean", "kl", "grad_norm", "completion_length"), tol=1e-4)
    assert len({r["reward_mean"] for r in one}) > 1 or one[0]["grad_norm"] > 0, "the run should have some signal"
    probed_collectives(tmp_path / "probe")


def test_reward_model_under_torchrun_matches_one_process(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=40)
    base = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(pairs), "max_length": 128, "eval_fraction": 0.125, "packing": False},
        "train": {"lr": 1e-3, "max_steps": 4, "micro_batch_size": 2, "seed": 0, "device": "cpu", "bf16": False},
    }
    with torch_threads(1):
        reward.train(load_config({**base, "train": {**base["train"], "grad_accum": 2}, "output_dir": str(tmp_path / "single")}, cls=RewardConfig))
    torchrun("rm train", write_yaml({**base, "output_dir": str(tmp_path / "ddp")}, tmp_path / "ddp.yaml"), probe=tmp_path / "probe")
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert_same_run(one, two, ("loss", "grad_norm", "accuracy", "eval_loss", "eval_accuracy"))
    assert (tmp_path / "ddp" / "final" / reward.SCORE_HEAD).exists()
    probed_collectives(tmp_path / "probe")


def test_ppo_runs_under_torchrun(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    raw = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(prompts)},
        "reward": "python:test_ppo:vowel_reward",
        "adapter": {"kind": "lora", "r": 4, "alpha": 8},
        "train": {"lr": 1e-3, "max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "seed": 0, "device": "cpu", "bf16": False},
        "ppo": {"prompts_per_step": 4, "samples_per_prompt": 1, "max_new_tokens": 6, "epochs": 1},
        "output_dir": str(tmp_path / "ddp"),
    }
    torchrun("ppo", write_yaml(raw, tmp_path / "ppo.yaml"), probe=tmp_path / "probe")
    rows = read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    assert (tmp_path / "ddp" / "final" / ppo.VALUE_HEAD).exists()
    probed_collectives(tmp_path / "probe")


@pytest.mark.parametrize("cls, section", [(GRPOConfig, "grpo"), (PPOConfig, "ppo")])
def test_fsdp_is_refused_where_the_loop_samples_from_the_policy(tmp_path, cls, section):
    from posttrain.config import ConfigError

    raw = {"model": {"name": "tiny-llama"}, "data": {"path": str(write_ifeval_prompts(tmp_path / "p.jsonl"))}, "train": {"distributed": "fsdp"}}
    if section == "ppo":
        raw["reward"] = "python:test_ppo:vowel_reward"
    with pytest.raises(ConfigError, match="train.distributed fsdp"):
        load_config(raw, cls=cls)


LEAVE = """
import atexit, os, sys
from pathlib import Path

import torch  # a worker has torch loaded by the time its command ends


class Teardown:
    def __del__(self, write=os.write):  # module globals may be gone by then
        write(2, b"interpreter teardown ran\\n")


keep = Teardown()  # freed only by the interpreter's own teardown
marker = Path(sys.argv[1])
atexit.register(lambda: marker.write_text("exit handlers ran"))
sys.argv = ["posttrain", *sys.argv[2:]]
from posttrain.cli import main

print("buffered line", end="")  # still in stdout's buffer when the command ends
main()
raise AssertionError("main() returned instead of exiting")
"""


@pytest.mark.parametrize("args, status", [(["--help"], 0), (["sft", "--config", "missing.yaml"], 1)])
@pytest.mark.parametrize("torchrun_env", [True, False])
def test_a_torchrun_worker_leaves_without_the_interpreters_teardown(tmp_path, args, status, torchrun_env):
    """Under torchrun a finished command's process runs Python's exit handlers, flushes its output and
    leaves with the command's status, skipping the teardown that once aborted an FSDP rank after its run
    had saved (see posttrain.cli._leave); outside torchrun nothing changes."""
    import subprocess
    import sys

    from sft_fixtures import free_port, subprocess_env

    extra = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())} if torchrun_env else {}
    env = {k: v for k, v in subprocess_env(**extra).items() if torchrun_env or k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    marker = tmp_path / "atexit.txt"
    proc = subprocess.run([sys.executable, "-c", LEAVE, str(marker), *args], check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (proc.returncode != 0) == bool(status), (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.startswith("buffered line"), proc.stdout[:200]
    assert marker.read_text() == "exit handlers ran"
    assert ("interpreter teardown ran" in proc.stderr) != torchrun_env, proc.stderr[-2000:]
