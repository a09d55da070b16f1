"""Batched vs one-at-a-time greedy generation: tokens/s of posttrain's engine, fp32 and bf16.

    python benchmarks/generate.py [--quick] [--prompts 64] [--max-new-tokens 64] [--batch-size 32]
                                  [--repeats 1] [--threads N] [--no-hf] [--precisions fp32,bf16]
    python benchmarks/generate.py --decoders [--prompts 124] [--max-new-tokens 192] [--batch-size 128]

SmolLM2-135M-Instruct when fetched (`posttrain models fetch smollm2-135m-instruct`), else the random
tiny-llama (then the numbers say little: a note is printed). Prompts are the first IFEval prompts
(../shared/data/ifeval_input_data.jsonl) with the model's chat template. For each precision the
batched run (``--batch-size`` sequences at once) and the one-at-a-time run (batch size 1) alternate,
``--repeats`` times each, so a change in the machine's load hits both; the median is reported.
Tokens/s counts generated tokens (a sequence that ends early counts what it generated) over wall time,
prefill included. Full runs also time transformers' ``model.generate`` at the same batch size, the
reference the engine's decode loop was chosen against.

``--decoders``: the same batched greedy run with the decode steps on posttrain's ``FastDecoder``
(``generate/fast.py``) and on the model's own forward with its ``DynamicCache`` (``Engine(fast=False)``),
alternating, fp32; checks the tokens agree and prints ``ratio=<fast / forward tokens/s>``.

``--quick`` (under a minute): 32 prompts batched, 6 one at a time, 32 new tokens, fp32 and bf16.
The last line is ``ratio=<batched / one-at-a-time tokens/s>`` for fp32. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from posttrain.generate import Engine, SamplingParams
from posttrain.models.fetch import is_fetched

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_MODEL = "smollm2-135m-instruct"


def ifeval_prompts(n: int) -> list[str]:
    path = DATA / "ifeval_input_data.jsonl"
    with path.open(encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line, _ in zip(f, range(n))]
    if len(prompts) < n:
        raise SystemExit(f"{path} holds only {len(prompts)} prompts, {n} asked for")
    return prompts


def timed(engine: Engine, ids: list[list[int]], params: SamplingParams, batch_size: int) -> tuple[float, int, list[list[int]]]:
    """(seconds, generated tokens, each prompt's tokens) for one greedy run."""
    start = time.perf_counter()
    out = engine.generate_ids(ids, params, progress=False, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return seconds, sum(c[0].num_tokens for c in out), [c[0].token_ids for c in out]


def timed_hf(engine: Engine, ids: list[list[int]], params: SamplingParams, batch_size: int) -> tuple[float, int]:
    """transformers' generate on the same prompts, left-padded, batch by batch (bf16 as autocast)."""
    model, ends = engine.model, sorted(engine.end_token_ids)
    start, tokens = time.perf_counter(), 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=params.bf16)
    with torch.inference_mode(), autocast:
        for b in range(0, len(ids), batch_size):
            chunk = ids[b : b + batch_size]
            width = max(map(len, chunk))
            x = torch.tensor([[engine.pad_token_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(
                input_ids=x,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=params.max_new_tokens,
                eos_token_id=ends,
                pad_token_id=engine.pad_token_id,
                use_cache=True,
            )
            for row in out[:, width:].tolist():
                tokens += next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a < 60 s run: fewer prompts and tokens")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--single-prompts", type=int, default=None, help="prompts in the one-at-a-time runs (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-hf", action="store_true", help="skip timing transformers' generate")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (bf16 is slow where it is emulated)")
    ap.add_argument("--decoders", action="store_true", help="compare the fast decoder with the model's forward (batched, fp32)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.single_prompts, args.max_new_tokens, args.no_hf = 32, 6, 32, True
    if args.threads:
        torch.set_num_threads(args.threads)

    name = REAL_MODEL if is_fetched(REAL_MODEL) else "tiny-llama"
    if name != REAL_MODEL:
        print(f"note: {REAL_MODEL} is not fetched (`posttrain models fetch {REAL_MODEL}`); timing the random tiny-llama instead")
    engine = Engine.from_name(name, device="cpu", batch_size=args.batch_size)
    ids = engine.encode(ifeval_prompts(args.prompts))
    single = ids[: args.single_prompts or len(ids)]
    load = os.getloadavg()
    print(
        f"{name}: {len(ids)} IFEval prompts ({min(map(len, ids))}-{max(map(len, ids))} tokens), {args.max_new_tokens} new tokens, greedy; "
        f"batch {args.batch_size} vs 1 ({len(single)} prompts); {platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads; load average {load[0]:.1f}; {date.today()}",
        flush=True,
    )
    engine.generate_ids(ids[:2], SamplingParams(max_new_tokens=2), progress=False)  # warm up allocators
    if args.decoders:
        compare_decoders(engine, ids, SamplingParams(max_new_tokens=args.max_new_tokens), args.batch_size, args.repeats)
        return

    rows, ratios = [], {}
    for precision in args.precisions.split(","):
        params = SamplingParams(max_new_tokens=args.max_new_tokens, bf16=precision == "bf16")
        runs: dict[str, list[float]] = {"batched": [], "one-at-a-time": []}
        outputs = {}
        for _ in range(args.repeats):  # alternate, so drift in the machine's load hits both modes
            for mode, prompts, width in (("batched", ids, args.batch_size), ("one-at-a-time", single, 1)):
                seconds, tokens, outputs[mode] = timed(engine, prompts, params, width)
                runs[mode].append(tokens / seconds)
                print(f"  {precision} {mode:<14} {tokens:>6} tokens {seconds:>7.1f} s {tokens / seconds:>8.1f} tok/s", flush=True)
        same = sum(a == b for a, b in zip(outputs["batched"], outputs["one-at-a-time"]))
        for mode, rates in runs.items():
            rows.append((precision, mode, statistics.median(rates)))
        ratios[precision] = statistics.median(runs["batched"]) / statistics.median(runs["one-at-a-time"])
        print(f"  {precision}: batched and one-at-a-time identical on {same}/{len(single)} prompts", flush=True)
        if not args.no_hf:
            seconds, tokens = timed_hf(engine, ids, params, args.batch_size)
            rows.append((precision, "transformers generate", tokens / seconds))
            print(f"  {precision} {'hf generate':<14} {tokens:>6} tokens {seconds:>7.1f} s {tokens / seconds:>8.1f} tok/s", flush=True)

    print(f"\n{'precision':<10}{'mode':<24}{'tokens/s':>10}")
    for precision, mode, rate in rows:
        print(f"{precision:<10}{mode:<24}{rate:>10.1f}")
    shown = ", ".join(f"{p} {r:.2f}x" for p, r in ratios.items())
    print(f"batched / one-at-a-time: {shown}; load average now {os.getloadavg()[0]:.1f}")
    print(f"ratio={next(iter(ratios.values())):.2f}")


def compare_decoders(engine: Engine, ids: list[list[int]], params: SamplingParams, batch_size: int, repeats: int) -> None:
    """Batched greedy tokens/s with the decode steps on the FastDecoder and on the model's forward."""
    runs: dict[str, list[float]] = {"fast decoder": [], "model forward": []}
    outputs = {}
    for _ in range(repeats):
        for mode, fast in (("fast decoder", True), ("model forward", False)):
            engine.fast = fast
            seconds, tokens, outputs[mode] = timed(engine, ids, params, batch_size)
            runs[mode].append(tokens / seconds)
            print(f"  {mode:<14} {tokens:>6} tokens {seconds:>7.1f} s {tokens / seconds:>8.1f} tok/s", flush=True)
    engine.fast = True
    same = sum(a == b for a, b in zip(outputs["fast decoder"], outputs["model forward"]))
    fast_rate, forward_rate = (statistics.median(r) for r in runs.values())
    print(f"fast decoder {fast_rate:.1f} tok/s, model forward {forward_rate:.1f} tok/s; identical tokens on {same}/{len(ids)} prompts")
    print(f"ratio={fast_rate / forward_rate:.2f}")


if __name__ == "__main__":
    main()
