"""DPO's CPU forward on short pairs: one row with shared prompts (``Forward(one_row=True)``, the CPU default) vs packed rows.

    python benchmarks/dpo_rows.py RUN_DIR [--steps 6] [--repeats 2] [--bf16 | --fp32]

``RUN_DIR`` is a finished ``posttrain demo`` run (e.g. ``runs/demo``): its SFT model (``sft/merged``) and
round-1 pairs (``label/pairs.jsonl``), with the demo's DPO settings (LoRA r 16, 4 pairs a step, lr 4e-4,
beta 0.1). Each run is a fresh subprocess, ``posttrain dpo --max-steps N``, in rotation A B A B; the packed
variant only switches ``one_row`` off (the rows as the batch packs them, each as wide as its longest
sequence: the GPU path). Wall time includes loading, the reference pass and saving. Until 2026-12-06 the
CPU default ran each sequence alone (a pair's prompt once, on a KV cache); its figures are in
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys
import posttrain.train.forward as forward
if sys.argv[1] == "packed":
    original = forward.Forward.__init__
    forward.Forward.__init__ = lambda self, model, head=None, one_row=False: original(self, model, head, one_row=False)
from posttrain.cli import app
app(sys.argv[2:])
"""


def run(variant: str, run_dir: Path, out: Path, steps: int, bf16: bool) -> tuple[float, list[float]]:
    sets = {
        "model.name": run_dir / "sft" / "merged", "data.path": run_dir / "label" / "pairs.jsonl", "adapter.kind": "lora",
        "adapter.r": 16, "adapter.alpha": 32, "train.lr": 4e-4, "train.micro_batch_size": 4, "train.bf16": str(bf16).lower(),
        "data.max_length": 512, "dpo.beta": 0.1,
    }  # fmt: skip
    args = ["dpo", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], "--max-steps", str(steps), "-o", str(out)]
    started = time.perf_counter()
    # Each run its own cache: a reference precompute one run caches would otherwise spare the next one.
    env = {**os.environ, "POSTTRAIN_CACHE": str(out.parent / f"{out.name}-cache")}
    subprocess.run([sys.executable, "-c", CHILD, variant, *args], check=True, capture_output=True, env=env)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return wall, [r["pairs_per_s"] for r in rows if "pairs_per_s" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="bf16", action="store_true", default=True)
    precision.add_argument("--fp32", dest="bf16", action="store_false")
    a = parser.parse_args()
    results: dict[str, list[tuple[float, list[float]]]] = {"one_row": [], "packed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for variant, runs in results.items():
                runs.append(run(variant, a.run_dir, Path(tmp) / f"{variant}-{r}", a.steps, a.bf16))
                wall, pps = runs[-1]
                print(f"{variant:10s} run {r}: {wall:6.1f} s wall, pairs/s per step {[round(p, 2) for p in pps]}", flush=True)
    walls = {v: statistics.median(w for w, _ in runs) for v, runs in results.items()}
    step_rate = {v: statistics.median(p for _, pps in runs for p in pps) for v, runs in results.items()}
    for v in results:
        print(f"{v:10s} median wall {walls[v]:6.1f} s, median step {step_rate[v]:.2f} pairs/s")
    print(
        f"precision={'bf16' if a.bf16 else 'fp32'} wall_ratio={walls['packed'] / walls['one_row']:.2f} step_ratio={step_rate['one_row'] / step_rate['packed']:.2f}"
    )


if __name__ == "__main__":
    main()
