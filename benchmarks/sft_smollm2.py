"""LoRA SFT of the real SmolLM2-135M-Instruct on IFEval's GPT-4 responses, fp32 then bf16, and export.

    python benchmarks/sft_smollm2.py [--steps 30] [--max-length 256] [--micro-batch 8]

Fetches the model once (`posttrain models fetch`), turns ../shared/data's 541 IFEval prompt/response
pairs into chat conversations, trains a LoRA adapter (r 16, all linear layers) for the same steps in
fp32 and with bf16 autocast, exports the bf16 run merged, and prints real (non-padding) tokens/s for
each. Not a timed test: run it by hand; docs quote its output.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

from posttrain.config import load_config
from posttrain.data.convert import to_format
from posttrain.data.formats import read_records
from posttrain.models.fetch import fetch
from posttrain.records import write_jsonl
from posttrain.train import sft

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifeval_input_response_data_gpt4_20231107_145030.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-sft-smollm2")
    args = ap.parse_args()

    fetch("smollm2-135m-instruct", progress=print)
    conversations = args.out / "ifeval_gpt4_messages.jsonl"
    write_jsonl(conversations, (to_format(r, "messages") for r in read_records(DATA)))

    rows = []
    for precision in ("fp32", "bf16"):
        cfg = load_config(
            {
                "model": {"name": "smollm2-135m-instruct"},
                "data": {"path": str(conversations), "max_length": args.max_length},
                "adapter": {"kind": "lora", "r": 16, "alpha": 32},
                "train": {"lr": 2e-4, "max_steps": args.steps, "micro_batch_size": args.micro_batch, "bf16": precision == "bf16", "warmup_steps": 3},
                "output_dir": str(args.out / precision),
            }
        )
        t0 = time.perf_counter()
        result = sft.train(cfg)
        wall = time.perf_counter() - t0
        metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        tps = statistics.median(m["tokens_per_s"] for m in metrics[1:])  # the first step warms up allocators
        rows.append((precision, tps, wall, result.losses[0], result.losses[-1]))

    merged = sft.export(args.out / "bf16", args.out / "merged")
    print(f"\nLoRA SFT of SmolLM2-135M-Instruct, {args.steps} steps × {args.micro_batch} packed rows of {args.max_length} tokens")
    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores; {date.today()}")
    print(f"{'precision':<10}{'real tokens/s':>15}{'wall s':>10}{'loss first':>12}{'loss last':>11}")
    for precision, tps, wall, first, last in rows:
        print(f"{precision:<10}{tps:>15,.0f}{wall:>10.1f}{first:>12.4f}{last:>11.4f}")
    print(f"merged model: {merged}")
    print(f"ratio={rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
