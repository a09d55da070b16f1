"""Small learnable chat data and configs for the SFT tests (resume, DDP, export)."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

COLORS = {
    "apple": "red",
    "banana": "yellow",
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "orange": "orange",
    "plum": "purple",
    "lemon": "yellow",
    "cherry": "red",
    "ocean": "blue",
    "leaf": "green",
}

# Held-out prompts for generation checks (objects the data trains on).
PROMPTS = ["What color is the apple?", "What color is the sky?", "What color is the coal?"]


def write_color_data(path: Path, n: int = 64, seed: int = 0, max_reps: int = 3) -> Path:
    """``n`` chat records "What color is the {obj}?" -> "The {obj} is {color}.", objects drawn with ``seed``.

    Each record repeats the question and the answer 1..``max_reps`` times, so examples differ in length
    (padded micro-batches then contain real padding, and packing has something to pack).
    """
    rng = random.Random(seed)
    objects = sorted(COLORS)
    with path.open("w") as f:
        for _ in range(n):
            obj = rng.choice(objects)
            reps = rng.randint(1, max_reps)
            user = " ".join([f"What color is the {obj}?"] * reps)
            answer = " ".join([f"The {obj} is {COLORS[obj]}."] * reps)
            f.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}) + "\n")
    return path


def sft_config(data_path: Path, output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for tiny-llama on ``data_path``; ``sections`` update model/data/adapter/train (shallow per section)."""
    cfg: dict[str, Any] = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(data_path), "max_length": 128, "packing": False},
        "adapter": {"kind": "full"},
        "train": {
            "lr": 3e-3,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "warmup_steps": 2,
            "schedule": "cosine",
            "seed": 0,
            "device": "cpu",
            "log_every": 1,
        },
        "output_dir": str(output_dir),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


def write_yaml(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return rows


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ (so POSTTRAIN_CACHE is shared with the test session) plus ``extra``; src and tests/ importable."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    # The tests' own modules (reward functions such as test_ppo:vowel_reward) import in the subprocess too.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    subcommand: str, config_file: Path, *args: str, probe: Path | None = None, cache: Path | None = None, nproc: int = 2, timeout: int = 300
) -> None:
    """``torchrun --nproc_per_node 2 -m posttrain.cli SUBCOMMAND --config FILE ARGS`` on CPU (gloo), one thread each
    (``SUBCOMMAND`` may be two words: ``"rm train"``).

    ``probe``: run through ``tests/collective_probe.py`` instead, which writes each rank's collectives to
    ``probe/rank-N.json`` (see :func:`probed_collectives`). ``cache``: a cache directory of its own
    (``$POSTTRAIN_CACHE``), so the processes tokenize (and precompute) themselves instead of reading
    what an earlier run in the test session made.
    """
    import subprocess

    entry = [str(Path(__file__).parent / "collective_probe.py")] if probe is not None else ["-m", "posttrain.cli"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        *entry, *subcommand.split(), "--config", str(config_file), *args,
    ]  # fmt: skip
    extra = {"OMP_NUM_THREADS": "1"}
    if cache is not None:
        extra["POSTTRAIN_CACHE"] = str(cache)
    if probe is not None:
        probe.mkdir(parents=True, exist_ok=True)
        extra["POSTTRAIN_PROBE_DIR"] = str(probe)
    proc = subprocess.run(command, env=subprocess_env(**extra), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def probed_collectives(probe: Path, nproc: int = 2) -> list[list[list[str | None]]]:
    """Each rank's recorded collectives, after asserting that every rank made the same calls in the same
    order and that every tensor lived on the group's device."""
    ranks = [json.loads((probe / f"rank-{r}.json").read_text()) for r in range(nproc)]
    calls = [r["calls"] for r in ranks]
    assert all(c == calls[0] for c in calls), "the ranks made different sequences of collectives: " + ", ".join(
        f"rank {r}: {len(c)} calls" for r, c in enumerate(calls)
    )
    device = ranks[0]["group_device"]
    wrong = [(name, where) for name, where in calls[0] if where is not None and where != device]
    assert not wrong, f"collectives with tensors off the group's device ({device}): {wrong[:5]}"
    assert calls[0], "no collective was recorded"
    return calls


def kill_at_step(proc: Any, run_dir: Path, step: int, *, group: bool = False, log: Path | None = None, timeout: float = 120) -> None:
    """SIGKILL the training process ``proc`` (its whole process group with ``group``: torchrun and its ranks)
    as soon as ``run_dir``'s metrics reach ``step``; fail the test if it ends or stalls first. Waits for it."""
    import os
    import signal
    import time

    import pytest

    kill = (lambda: os.killpg(proc.pid, signal.SIGKILL)) if group else (lambda: os.kill(proc.pid, signal.SIGKILL))
    deadline = time.monotonic() + timeout
    try:
        while True:
            rows = read_metrics(run_dir)
            if rows and rows[-1]["step"] >= step:
                kill()
                return
            if proc.poll() is not None:
                shown = f"; log:\n{log.read_text()[-3000:]}" if log is not None and log.exists() else ""
                pytest.fail(f"the run ended (rc {proc.returncode}) before step {step} was seen{shown}")
            if time.monotonic() > deadline:
                pytest.fail(f"step {step} not logged within {timeout:.0f} s")
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            kill()
        proc.wait()


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run in-process training on ``n`` threads (as the subprocesses do with OMP_NUM_THREADS=1), then restore.

    Same thread count, same float reduction order; and on a small shared machine one thread per process
    is much faster than oversubscribed cores.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
