"""Where a fast-decoder step's time goes, and what the key/value blocks changed in its attention.

    python benchmarks/decode_profile.py [--rows 64,128] [--cache 200] [--precisions bf16,fp32] [--steps 6]

SmolLM2-135M-Instruct (fetched; else the random tiny-llama, with a note), torch's threads. For each row count
and precision: a cache of ``--cache`` tokens is prefilled, then ``--steps`` one-token steps of
``FastDecoder`` (``generate/fast.py``) are timed (median ms a step, tokens/s, GFLOP/s at 2·N a token), and
one more round is profiled with torch's profiler, its self CPU time grouped as the projections' matmuls
(``aten::mm``), attention's batched matmuls (``aten::bmm``/``baddbmm``) and everything else (elementwise ops,
copies, Python). Then one layer's attention at the largest row count, three ways on the same data: the
plain ``(rows, kv heads, columns, head dim)`` buffer sliced to the first ``t + 1`` columns (the layout before
``generate/kv_blocks.py``), the same with the copies it makes counted, and the block layout (``attend``).
And attention over left-padded rows (random prompt lengths of 44-168 tokens, the spread of the first IFEval
prompts, longest first as the engine fills a batch) with every row in every block against only the rows each
block holds keys for (``block_rows``), over 30 layers' distinct buffers, fastest of 12 alternating rounds.
Not a test: run it by hand, with nothing else running.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from datetime import date

import torch

from posttrain.config import ModelConfig
from posttrain.generate.context import bf16_weights
from posttrain.generate.fast import FastDecoder
from posttrain.generate.kv_blocks import BLOCK, KVBlocks, attend, block_rows, step_bias
from posttrain.models.fetch import is_fetched
from posttrain.models.load import cache_kwarg, load_model

REAL_MODEL = "smollm2-135m-instruct"


def prefilled(model, rows: int, length: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
    return cache


def step_profile(model, rows: int, length: int, steps: int, n_params: int) -> str:
    from torch.profiler import profile

    decoder = FastDecoder(model)
    decoder.start(prefilled(model, rows, length), torch.ones(rows, length, dtype=torch.long), max_new_tokens=2 * steps + 2)
    tokens, positions = torch.randint(0, model.config.vocab_size, (rows,)), torch.full((rows,), length)
    decoder.step(tokens, positions)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        decoder.step(tokens, positions + 1 + i)
        times.append(time.perf_counter() - start)
    with profile() as prof:
        for i in range(steps):
            decoder.step(tokens, positions + 1 + steps + i)
    spent = {"mm": 0.0, "bmm": 0.0, "other": 0.0}
    for e in prof.key_averages():
        group = "mm" if e.key == "aten::mm" else "bmm" if e.key in ("aten::bmm", "aten::baddbmm") else "other"
        spent[group] += e.self_cpu_time_total
    total = sum(spent.values())
    step = statistics.median(times)
    return (
        f"{step * 1e3:.1f} ms a step, {rows / step:.0f} tok/s, {rows * 2 * n_params / step / 1e9:.0f} GFLOP/s; profile: projections' mm "
        f"{100 * spent['mm'] / total:.0f}%, attention's bmm {100 * spent['bmm'] / total:.0f}%, the rest {100 * spent['other'] / total:.0f}%"
    )


def attention_layouts(model, rows: int, t: int, dtype: torch.dtype, repeats: int = 20) -> str:
    """One layer's attention over t + 1 columns: the strided slice of one long buffer vs the block layout."""
    from torch.profiler import profile

    c = model.config
    kv = c.num_key_value_heads
    group = c.num_attention_heads // kv
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    columns = t + 1 + 2 * BLOCK
    q = torch.randn(rows, kv, group, d, dtype=dtype)
    keys, values = torch.randn(rows, kv, columns, d, dtype=dtype), torch.randn(rows, kv, columns, d, dtype=dtype)
    bias = torch.zeros(rows, columns)
    kb, vb = KVBlocks.zeros(rows, kv, columns, d, keys), KVBlocks.zeros(rows, kv, columns, d, values)
    kb.write(slice(None), 0, keys)
    vb.write(slice(None), 0, values)

    def strided():
        scores = torch.matmul(q, keys[:, :, : t + 1].transpose(-1, -2)) * 0.125
        probs = (scores.float() + bias[:, None, None, : t + 1]).softmax(-1).to(dtype)
        return torch.matmul(probs, values[:, :, : t + 1]).reshape(rows, -1)

    def blocked():
        return attend(q.reshape(rows * kv, group, d) * 0.125, kb, vb, t, step_bias(bias, rows, t))

    out = {}
    for name, fn in (("strided", strided), ("blocks", blocked)):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        ms = (time.perf_counter() - start) / repeats * 1e3
        with profile() as prof:
            fn()
        copies = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::copy_") / 1e3
        out[name] = (ms, copies)
    same = torch.allclose(strided().float(), blocked().float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    return (
        f"one layer's attention at {rows} rows, {t + 1} columns: strided slice {out['strided'][0]:.2f} ms ({out['strided'][1]:.2f} ms of copies "
        f"in one profiled call), blocks {out['blocks'][0]:.2f} ms ({out['blocks'][1]:.2f} ms); same output: {same}"
    )


def padded_spans(model, rows: int, dtype: torch.dtype, layers: int = 30, rounds: int = 12) -> str:
    """Attention over left-padded rows (prompts of 44-168 tokens, longest first, 32 tokens generated): every row
    in every block vs only the rows a block holds keys for (``block_rows``); ``layers`` distinct buffers, so the
    cache is read from memory as in a step; the fastest of ``rounds`` alternating rounds, ms a layer."""
    c = model.config
    kv = c.num_key_value_heads
    group = c.num_attention_heads // kv
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    width, t = 168, 168 + 31
    columns = t + 1 + 2 * BLOCK
    gen = torch.Generator().manual_seed(0)
    lengths = sorted(torch.randint(44, width + 1, (rows,), generator=gen).tolist(), reverse=True)
    mask = torch.zeros(rows, columns)
    for r, n in enumerate(lengths):
        mask[r, : width - n] = float("-inf")
    bias = step_bias(mask, rows, t)
    spans = block_rows(bias)
    blocks = [
        (
            KVBlocks(torch.randn(columns // BLOCK + 1, rows, kv, BLOCK, d, dtype=dtype)),
            KVBlocks(torch.randn(columns // BLOCK + 1, rows, kv, BLOCK, d, dtype=dtype)),
        )
        for _ in range(layers)
    ]
    q = torch.randn(rows * kv, group, d, dtype=dtype) * 0.125
    best = {"all": math.inf, "spans": math.inf}
    for _ in range(rounds):
        for name, span in (("all", None), ("spans", spans)):
            start = time.perf_counter()
            for kb, vb in blocks:
                attend(q, kb, vb, t, bias, span)
            best[name] = min(best[name], (time.perf_counter() - start) / layers * 1e3)
    same = torch.equal(attend(q, *blocks[0], t, bias), attend(q, *blocks[0], t, bias, spans))
    return (
        f"attention over left-padded rows at {rows} rows ({t + 1} columns, rows per block {spans}): every row {best['all']:.2f} ms a layer, "
        f"only the rows each block holds {best['spans']:.2f} ms; identical output: {same}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="64,128")
    ap.add_argument("--cache", type=int, default=200)
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    name = REAL_MODEL if is_fetched(REAL_MODEL) else "tiny-llama"
    if name != REAL_MODEL:
        print(f"note: {REAL_MODEL} is not fetched; the random tiny-llama instead (the numbers say little)")
    model = load_model(ModelConfig(name=name, dtype="float32"), torch.device("cpu")).eval()
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings once: the LM head's matmul, not the lookup
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{name}: {args.cache}-token cache, {torch.get_num_threads()} torch threads; {date.today()}")
    for precision in args.precisions.split(","):
        bf16 = precision == "bf16"
        with torch.inference_mode(), bf16_weights(model, bf16, torch.device("cpu")):
            for r in rows:
                print(f"  {precision} {r} rows: {step_profile(model, r, args.cache, args.steps, n_params)}", flush=True)
            print(f"  {precision} {padded_spans(model, rows[-1], torch.bfloat16 if bf16 else torch.float32)}", flush=True)
            print(
                f"  {precision} {attention_layouts(model, rows[-1], args.cache + args.steps, torch.bfloat16 if bf16 else torch.float32)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
