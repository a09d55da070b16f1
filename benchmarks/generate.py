"""Batched vs one-at-a-time greedy generation: tokens/s of posttrain's engine, fp32 and bf16.

    python benchmarks/generate.py [--quick] [--prompts 64] [--max-new-tokens 64] [--batch-size 32]
                                  [--repeats 1] [--threads N] [--no-hf] [--precisions fp32,bf16]
    python benchmarks/generate.py --decoders [--prompts 124] [--max-new-tokens 192] [--batch-size 128]
    python benchmarks/generate.py --narrow [--prompts 136] [--max-new-tokens 128] [--batch-size 128]

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

``--narrow``: the same batched greedy run (fp32) with the fast decoder's products over 2-15 rows padded to 16
columns (``generate/fast.py``'s ``_mm``, the default where torch multiplies) and without (``fast.NARROW = 0``),
alternating, both with torch's products (the projections' kernel off: it is where the kernels run, and pads
nothing); the batch's last sequences are where it matters. Prints ``ratio=<padded / unpadded tokens/s>``.

Each run is timed whole (prompts in, tokens out), and within it the engine times its prefill (``Engine.prefill_seconds``:
the prompts' forwards, which also give each prompt's first token). *Decode* tokens/s is what the
one-token steps make: (generated − first tokens) / (whole − prefill seconds). Shares of the machine's
limit, per run: *compute*, decode tokens/s × 2·N FLOPs (N the parameters a decode step multiplies by: the
whole model, the LM head included, the embedding lookup not, tied weights once) over the matmul peak of
that precision, measured in the same invocation before and after that precision's runs, the higher of the two
(``benchmarks/matmul_peak.py --quick``'s shapes; one read in a slow stretch of a shared machine would flatter);
*memory*, the tokens/s a step could reach if it only had to read the weights and the batch's KV cache
once at the measured memory bandwidth (a large copy), the bound that matters at small batches. Prefill
is reported beside it: prompt tokens/s and its compute share (2·N without the LM head, which the prefill
computes for the last position only).

``--llamacpp``: the same prompts (posttrain's token ids, chat template applied) through llama.cpp on a
GGUF of the same model in the same precision (f32 for fp32, bf16 for bf16), at the same batch sizes and one
at a time, split into prefill and decode by a second run with one new token (its prefill is one ``llama_decode``
call a group, no other work; ``benchmarks/llamacpp_generate.py``, run in the venv
``benchmarks/llamacpp.sh`` builds; the GGUF from ``benchmarks/llamacpp_gguf.sh``, llama.cpp's own
converter; both cached under benchmarks/.cache/llamacpp). Its rows join the table, and the last line is
``llamacpp_ratio=<posttrain's / llama.cpp's whole tokens/s at the largest batch, faster precision>``.
When llama.cpp cannot be built or converted, the benchmark says so plainly and goes on without it.

``--quick`` (about a minute): 64 prompts batched at 64, 6 one at a time, 32 new tokens, fp32 and bf16.
The last lines are ``ratio=<batched / one-at-a-time tokens/s>`` (whole runs) for fp32 and
``limit_share=<decode's share of the compute limit at the largest batch, in the faster precision>``. Not a test:
run it by hand, with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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


def timed(engine: Engine, ids: list[list[int]], params: SamplingParams, batch_size: int) -> tuple[float, int, list[list[int]], float]:
    """(seconds, generated tokens, each prompt's tokens, seconds of it spent prefilling) for one greedy run."""
    start = time.perf_counter()
    out = engine.generate_ids(ids, params, progress=False, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return seconds, sum(c[0].num_tokens for c in out), [c[0].token_ids for c in out], engine.prefill_seconds


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


def decode_params(model: torch.nn.Module) -> int:
    """N of 2·N FLOPs a token: every parameter a decode step multiplies by (the input embedding's lookup is not a matmul,
    unless it is tied to the LM head, which is)."""
    seen, total = set(), 0
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight if model.get_output_embeddings() is not None else None
    for p in model.parameters():
        if id(p) in seen or (p is embedding and p is not head):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Bytes read + written per second by a large tensor copy (GB/s), the median of ``repeats``."""
    src = torch.empty(size_mb * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    rates = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        rates.append(2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates[1:])


def kv_bytes_per_token(model: torch.nn.Module, element_bytes: int) -> int:
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * head_dim * element_bytes


def shares(
    rate: float, batch: int, context: float, *, n_params: int, peak_gflops: float, bandwidth_gbs: float, model: torch.nn.Module, bf16: bool
) -> tuple[float, float]:
    """(share of the compute limit, share of the memory limit) of ``rate`` tokens/s at ``batch`` rows of ``context`` mean tokens."""
    compute = rate * 2 * n_params / (peak_gflops * 1e9)
    weight_bytes = n_params * (2 if bf16 else 4)  # bf16 runs read bf16 copies of the weights
    step_bytes = weight_bytes + batch * context * kv_bytes_per_token(model, 2 if bf16 else 4)  # the cache is in the compute dtype
    memory_limit = batch * bandwidth_gbs * 1e9 / step_bytes
    return compute, rate / memory_limit


def table_rows(
    precision: str,
    mode: str,
    width: int,
    rates: tuple[float, float, float],
    *,
    context: float,
    n_params: int,
    head: int,
    peak: float,
    bandwidth: float,
    model: torch.nn.Module,
    bf16: bool,
) -> list[tuple[str, str, float, float, float]]:
    """The table's whole, decode and prefill rows of one run (``rates``: those tokens/s), with their shares of the limits."""
    whole, decode, prefill = rates
    compute, memory = shares(decode, width, context, n_params=n_params, peak_gflops=peak, bandwidth_gbs=bandwidth, model=model, bf16=bf16)
    return [
        (precision, f"{mode}, whole", whole, math.nan, math.nan),
        (precision, f"{mode}, decode", decode, compute, memory),
        (precision, f"{mode}, prefill", prefill, prefill * 2 * (n_params - head) / (peak * 1e9), math.nan),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a < 60 s run: fewer prompts and tokens")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--single-prompts", type=int, default=None, help="prompts in the one-at-a-time runs (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes to time besides one at a time (default: --batch-size)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-hf", action="store_true", help="skip timing transformers' generate")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (bf16 is slow where it is emulated)")
    ap.add_argument("--decoders", action="store_true", help="compare the fast decoder with the model's forward (batched, fp32)")
    ap.add_argument(
        "--narrow", action="store_true", help="compare products over 2-15 rows padded to 16 columns with unpadded (batched, fp32)"
    )
    ap.add_argument("--llamacpp", action="store_true", help="also time llama.cpp on a GGUF of the same model (built once, cached)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.single_prompts, args.max_new_tokens, args.no_hf, args.batch_size = 64, 6, 32, True, 64
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
        f"batch {args.batch_sizes or args.batch_size} vs 1 ({len(single)} prompts); {platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads; load average {load[0]:.1f}; {date.today()}",
        flush=True,
    )
    engine.generate_ids(ids[:2], SamplingParams(max_new_tokens=2), progress=False)  # warm up allocators
    if args.decoders:
        compare_decoders(engine, ids, SamplingParams(max_new_tokens=args.max_new_tokens), args.batch_size, args.repeats)
        return
    if args.narrow:
        compare_narrow(engine, ids, SamplingParams(max_new_tokens=args.max_new_tokens), args.batch_size, args.repeats)
        return

    from matmul_peak import measure  # benchmarks/ is this script's folder

    n_params = decode_params(engine.model)
    bandwidth = memory_bandwidth_gbs()
    precisions = args.precisions.split(",")
    peaks = {p: measure(torch.bfloat16 if p == "bf16" else torch.float32, quick=True)["peak_gflops"] for p in precisions}
    print(
        f"limits: N = {n_params / 1e6:.1f}M parameters a token (2·N FLOPs); matmul peak "
        + ", ".join(f"{p} {g:,.0f} GFLOP/s" for p, g in peaks.items())
        + f"; memory bandwidth {bandwidth:,.1f} GB/s (copy)",
        flush=True,
    )
    widths = sorted({int(b) for b in (args.batch_sizes or str(args.batch_size)).split(",")})
    mean_prompt = sum(map(len, ids)) / len(ids)
    context = mean_prompt + args.max_new_tokens / 2
    rows, ratios, top_share, llama_ratio = [], {}, {}, {}
    llama = llamacpp_setup(name) if args.llamacpp else None
    for precision in precisions:
        bf16 = precision == "bf16"
        params = SamplingParams(max_new_tokens=args.max_new_tokens, bf16=bf16)
        modes = [(f"batch {b}", ids, b) for b in widths] + [("one-at-a-time", single, 1)]
        runs: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode, _, _ in modes}  # (whole, decode, prefill) rates
        outputs = {}
        for _ in range(args.repeats):  # alternate, so drift in the machine's load hits every mode
            for mode, prompts, width in modes:
                seconds, tokens, outputs[mode], prefill_seconds = timed(engine, prompts, params, width)
                prompt_tokens = sum(map(len, prompts))
                decode = (tokens - len(prompts)) / max(seconds - prefill_seconds, 1e-9)
                runs[mode].append((tokens / seconds, decode, prompt_tokens / prefill_seconds))
                print(
                    f"  {precision} {mode:<14} {tokens:>6} tokens {seconds:>7.1f} s {tokens / seconds:>8.1f} tok/s; prefill {prefill_seconds:.1f} s "
                    f"({prompt_tokens / prefill_seconds:,.0f} prompt tok/s), decode {decode:.1f} tok/s",
                    flush=True,
                )
        again = measure(torch.bfloat16 if bf16 else torch.float32, quick=True)["peak_gflops"]
        print(f"  {precision} matmul peak again after the runs: {again:,.0f} GFLOP/s; the limit takes the higher of the two", flush=True)
        peaks[precision] = max(peaks[precision], again)  # a peak read in a slow stretch of the machine would flatter the shares
        largest = f"batch {widths[-1]}"
        same = sum(a == b for a, b in zip(outputs[largest], outputs["one-at-a-time"]))
        head = engine.model.get_output_embeddings().weight.numel()
        limits = {
            "context": context,
            "n_params": n_params,
            "head": head,
            "peak": peaks[precision],
            "bandwidth": bandwidth,
            "model": engine.model,
            "bf16": bf16,
        }
        for mode, prompts, width in modes:
            rows += table_rows(precision, mode, width, tuple(statistics.median(r[k] for r in runs[mode]) for k in range(3)), **limits)
        ratios[precision] = statistics.median(r[0] for r in runs[largest]) / statistics.median(r[0] for r in runs["one-at-a-time"])
        top_share[precision] = next(r[3] for r in rows if r[0] == precision and r[1] == f"{largest}, decode")
        print(f"  {precision}: {largest} and one-at-a-time identical on {same}/{len(single)} prompts", flush=True)
        if llama is not None:
            llama_runs = llamacpp_runs(llama, precision, ids, engine, args.max_new_tokens, widths, len(single))
            for run in llama_runs:
                width = run["batch"]
                mode = f"llama.cpp, {'one-at-a-time' if width == 1 else f'batch {width}'}"
                prompt_tokens = sum(map(len, ids[: len(single)] if width == 1 else ids))
                n_prompts = len(single) if width == 1 else len(ids)
                whole = run["tokens"] / run["seconds"]
                decode = (run["tokens"] - n_prompts) / max(run["seconds"] - run["prefill_seconds"], 1e-9)
                rows += table_rows(precision, mode, width, (whole, decode, prompt_tokens / run["prefill_seconds"]), **limits)
                agree = sum(a == b for a, b in zip(run["outputs"], outputs[f"batch {widths[-1]}"]))
                print(
                    f"  {precision} {mode:<24} {run['tokens']:>6} tokens {run['seconds']:>7.1f} s {whole:>8.1f} tok/s; decode {decode:.1f} tok/s; "
                    f"same tokens as posttrain's batch {widths[-1]} on {agree}/{len(run['outputs'])} prompts",
                    flush=True,
                )
            if llama_runs:
                ours = statistics.median(r[0] for r in runs[largest])
                theirs = next(r["tokens"] / r["seconds"] for r in llama_runs if r["batch"] == widths[-1])
                llama_ratio[precision] = ours / theirs
        if not args.no_hf:
            seconds, tokens = timed_hf(engine, ids, params, widths[-1])
            rate = tokens / seconds
            compute, memory = shares(
                rate,
                widths[-1],
                context,
                n_params=n_params,
                peak_gflops=peaks[precision],
                bandwidth_gbs=bandwidth,
                model=engine.model,
                bf16=bf16,
            )
            rows.append((precision, f"transformers, batch {widths[-1]}", rate, compute, memory))
            print(f"  {precision} {'hf generate':<14} {tokens:>6} tokens {seconds:>7.1f} s {rate:>8.1f} tok/s", flush=True)

    print(f"\n{'precision':<10}{'mode':<32}{'tokens/s':>10}{'compute limit':>15}{'memory limit':>14}")
    for precision, mode, rate, compute, memory in rows:
        cells = "".join(f"{'' if math.isnan(x) else f'{x:.1%}':>{w}}" for x, w in ((compute, 15), (memory, 14)))
        print(f"{precision:<10}{mode:<32}{rate:>10.1f}{cells}")
    shown = ", ".join(f"{p} {r:.2f}x" for p, r in ratios.items())
    print(f"batched / one-at-a-time: {shown}; load average now {os.getloadavg()[0]:.1f}")
    print(f"ratio={next(iter(ratios.values())):.2f}")
    faster = max(top_share, key=lambda p: next(r[2] for r in rows if r[0] == p and r[1] == f"batch {widths[-1]}, decode"))
    print(f"limit_share={top_share[faster]:.3f}")
    if args.llamacpp:
        if llama_ratio.get(faster):
            print(
                f"posttrain / llama.cpp whole tokens/s at batch {widths[-1]}: " + ", ".join(f"{p} {r:.2f}x" for p, r in llama_ratio.items())
            )
            print(f"llamacpp_ratio={llama_ratio[faster]:.2f}")
        else:
            print("llamacpp_ratio=unavailable (llama.cpp was not run: see the note above)")


def llamacpp_setup(name: str) -> dict | None:
    """The llama.cpp venv's python and the model's folder, or None (with the reason printed) when it cannot be built."""
    from posttrain.models.fetch import fetched_path

    here = Path(__file__).resolve().parent
    built = subprocess.run(["bash", str(here / "llamacpp.sh")], check=False, capture_output=True, text=True)
    if built.returncode != 0:
        print(
            f"note: no llama.cpp side: {built.stderr.strip().splitlines()[-1] if built.stderr.strip() else 'benchmarks/llamacpp.sh failed'}",
            flush=True,
        )
        return None
    if name != REAL_MODEL:
        print("note: no llama.cpp side: it needs the fetched model's folder to convert", flush=True)
        return None
    return {"python": built.stdout.strip().splitlines()[-1], "model_dir": fetched_path(name), "here": here}


def llamacpp_runs(
    llama: dict, precision: str, ids: list[list[int]], engine: Engine, max_new_tokens: int, widths: list[int], single: int
) -> list[dict]:
    """llama.cpp's runs of ``ids`` at ``widths`` and one at a time (``single`` prompts), in ``precision``'s GGUF; [] when it fails."""
    outtype = {"fp32": "f32", "bf16": "bf16"}[precision]
    env = {**os.environ, "PYTHON": sys.executable}
    made = subprocess.run(
        ["bash", str(llama["here"] / "llamacpp_gguf.sh"), str(llama["model_dir"]), outtype],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    if made.returncode != 0:
        print(
            f"note: no llama.cpp side in {precision}: {made.stderr.strip().splitlines()[-1] if made.stderr.strip() else 'llamacpp_gguf.sh failed'}",
            flush=True,
        )
        return []
    gguf = made.stdout.strip().splitlines()[-1]
    job = {
        "prompts": ids,
        "end_ids": sorted(engine.end_token_ids),
        "max_new_tokens": max_new_tokens,
        "batch_sizes": [*widths, 1],
        "single_prompts": single,
        "threads": torch.get_num_threads(),
        "prefill": True,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        done = subprocess.run(
            [llama["python"], str(llama["here"] / "llamacpp_generate.py"), gguf, f.name], check=False, capture_output=True, text=True
        )
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        print(f"note: llama.cpp failed in {precision}: {(done.stderr.strip().splitlines() or ['no message'])[-1]}", flush=True)
        return []
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def compare_narrow(engine: Engine, ids: list[list[int]], params: SamplingParams, batch_size: int, repeats: int) -> None:
    """Batched greedy tokens/s (fp32) with the fast decoder's narrow products padded to 16 columns and unpadded."""
    from posttrain.generate import decode_kernels, fast

    decode_kernels.use_matmul = False  # the padding is for torch's products: the projections' kernel pads nothing
    padded_to = fast.NARROW
    runs: dict[str, list[float]] = {"padded": [], "unpadded": []}
    outputs = {}
    try:
        for _ in range(repeats):
            for mode, narrow in (("padded", padded_to), ("unpadded", 0)):
                fast.NARROW = narrow
                seconds, tokens, outputs[mode], _ = timed(engine, ids, params, batch_size)
                runs[mode].append(tokens / seconds)
                print(f"  {mode:<9} {tokens:>6} tokens {seconds:>7.1f} s {tokens / seconds:>8.1f} tok/s", flush=True)
    finally:
        fast.NARROW, decode_kernels.use_matmul = padded_to, True
    same = sum(a == b for a, b in zip(outputs["padded"], outputs["unpadded"]))
    padded, unpadded = (statistics.median(r) for r in runs.values())
    print(f"padded to {padded_to} columns {padded:.1f} tok/s, unpadded {unpadded:.1f} tok/s; identical tokens on {same}/{len(ids)} prompts")
    print(f"ratio={padded / unpadded:.2f}")


def compare_decoders(engine: Engine, ids: list[list[int]], params: SamplingParams, batch_size: int, repeats: int) -> None:
    """Batched greedy tokens/s with the decode steps on the FastDecoder and on the model's forward."""
    runs: dict[str, list[float]] = {"fast decoder": [], "model forward": []}
    outputs = {}
    for _ in range(repeats):
        for mode, fast in (("fast decoder", True), ("model forward", False)):
            engine.fast = fast
            seconds, tokens, outputs[mode], _ = timed(engine, ids, params, batch_size)
            runs[mode].append(tokens / seconds)
            print(f"  {mode:<14} {tokens:>6} tokens {seconds:>7.1f} s {tokens / seconds:>8.1f} tok/s", flush=True)
    engine.fast = True
    same = sum(a == b for a, b in zip(outputs["fast decoder"], outputs["model forward"]))
    fast_rate, forward_rate = (statistics.median(r) for r in runs.values())
    print(f"fast decoder {fast_rate:.1f} tok/s, model forward {forward_rate:.1f} tok/s; identical tokens on {same}/{len(ids)} prompts")
    print(f"ratio={fast_rate / forward_rate:.2f}")


if __name__ == "__main__":
    main()
