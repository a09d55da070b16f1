"""GRPO's update on CPU: one row per micro-batch, each group's prompt once (``Forward(one_row=True)``, the CPU default) vs packed rows.

    python benchmarks/grpo_rows.py [--model smollm2-135m-instruct] [--prompts IFEVAL_JSONL] [--steps 2] [--repeats 2] [--bf16 | --fp32]

``posttrain grpo`` with the demo's GRPO settings (LoRA r 16, 8 prompts a step, 4 samples each, micro-batches
of 8 samples, β 0.04, verifier rewards; 128 new tokens) on the first ``8 × steps`` IFEval prompts. Each run is
a fresh subprocess, in rotation A B A B; the packed variant only switches ``one_row`` off (each micro-batch's
samples packed into rows as wide as the longest: the GPU path). Both variants sample the same completions
(the sampling seed is the step's; the first step's policy is the same). Reported per step from the runs'
metrics: the update time (step seconds minus generation seconds: the reference pass, the update's forward and
backward, the optimizer), and the generation time for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys
import posttrain.train.grpo as grpo
if sys.argv[1] == "packed":
    grpo.one_row_here = lambda *a: False
from posttrain.cli import app
app(sys.argv[2:])
"""
IFEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifeval_input_data.jsonl"


def run(variant: str, model: str, prompts: Path, out: Path, steps: int, bf16: bool) -> tuple[float, list[dict]]:
    sets = {
        "model.name": model, "data.path": prompts, "adapter.kind": "lora", "adapter.r": 16, "adapter.alpha": 32,
        "train.lr": 5e-5, "train.micro_batch_size": 8, "train.schedule": "constant", "train.bf16": str(bf16).lower(),
        "grpo.group_size": 4, "grpo.prompts_per_step": 8, "grpo.beta": 0.04, "grpo.temperature": 1.0,
        "grpo.reward": "verifiers:loose", "grpo.max_new_tokens": 128,
    }  # fmt: skip
    args = ["grpo", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], "--max-steps", str(steps), "-o", str(out)]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, variant, *args], check=True, capture_output=True)
    wall = time.perf_counter() - started
    return wall, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=Path, default=IFEVAL, help="IFEval-format JSONL (default: ../shared/data's IFEval prompts)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="bf16", action="store_true", default=True)
    precision.add_argument("--fp32", dest="bf16", action="store_false")
    a = parser.parse_args()
    results: dict[str, list[tuple[float, list[dict]]]] = {"one_row": [], "packed": []}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(a.prompts.read_text().splitlines(keepends=True)[: 8 * a.steps]))
        for r in range(a.repeats):
            for variant, runs in results.items():
                runs.append(run(variant, a.model, prompts, Path(tmp) / f"{variant}-{r}", a.steps, a.bf16))
                wall, rows = runs[-1]
                update = [round(m["seconds"] - m["generation_seconds"], 1) for m in rows]
                print(f"{variant:8s} run {r}: {wall:6.1f} s wall, update s per step {update}, generation s {[round(m['generation_seconds'], 1) for m in rows]}, loss {[round(m['loss'], 5) for m in rows]}", flush=True)
    update = {v: statistics.median(m["seconds"] - m["generation_seconds"] for _, rows in runs for m in rows) for v, runs in results.items()}
    generation = {v: statistics.median(m["generation_seconds"] for _, rows in runs for m in rows) for v, runs in results.items()}
    for v in results:
        print(f"{v:8s} median update {update[v]:6.1f} s a step, generation {generation[v]:6.1f} s a step")
    print(f"precision={'bf16' if a.bf16 else 'fp32'} update_ratio={update['packed'] / update['one_row']:.2f}")


if __name__ == "__main__":
    main()
