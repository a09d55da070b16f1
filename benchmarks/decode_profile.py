"""Where a fast-decoder step's time goes, and what the key/value blocks changed in its attention.

    python benchmarks/decode_profile.py [--rows 64,128] [--cache 200] [--precisions bf16,fp32] [--steps 6] [--kernels-only]
    python benchmarks/decode_profile.py --projections 1,8,16,32,64,128 [--precisions bf16,fp32]

SmolLM2-135M-Instruct (fetched; else the random tiny-llama, with a note), torch's threads. For each row count
and precision: a cache of ``--cache`` tokens is prefilled, then ``--steps`` one-token steps of
``FastDecoder`` (``generate/fast.py``) are timed (median ms a step, tokens/s, GFLOP/s at 2·N a token), and
one more round is profiled with torch's profiler, its self CPU time grouped as the projections' matmuls
(``aten::mm``), attention's batched matmuls (``aten::bmm``/``baddbmm``) and everything else (elementwise ops,
copies, Python). Then attention at the largest row count in both key/value layouts on the same data
(``generate/kv_blocks.py``): blocks of 64 columns with the last masked past the current column (bf16's), and
one block cut at the current column, a strided slice (float32's); 30 layers' distinct buffers, fastest of 8
alternating rounds; and whole decode steps in each layout, alternating; at 2-15 rows in fp32, whole steps with
the products padded to 16 columns against over the rows themselves (``fast._mm``), alternating. And attention over left-padded rows (random prompt lengths of 44-168 tokens, the spread of the first IFEval
prompts, longest first as the engine fills a batch) with every row in every block against only the rows each
block holds keys for (``block_rows``), over 30 layers' distinct buffers, fastest of 12 alternating rounds.
Where the decode kernels run (``generate/decode_kernels.py``: float32 on x86-64, bf16 with AVX512-BF16), each
step's profile counts their time as attention (the attention kernel), projections (the projections' kernel,
``decode_matmul.c``) and the rest (the others), and whole steps through the kernels are timed against the kernels
with torch's products for the projections and against torch's ops (``POSTTRAIN_CPU_KERNELS=0``), three decoders
on the same cache, alternating. ``--projections``: a step's projections alone (each layer's four and the
vocabulary's, the model's weights), the kernel against ``torch.mm`` at each row count given. ``--kernels-only``: the profile and that comparison, not the layouts'.
Not a test: run it by hand, with nothing else running.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from datetime import date

import torch

from posttrain.config import ModelConfig
from posttrain.generate import decode_kernels
from posttrain.generate.context import bf16_weights
from posttrain.generate.fast import NARROW, FastDecoder
from posttrain.generate.kv_blocks import BLOCK, KVBlocks, attend, block_rows, cuts, round_up, step_bias
from posttrain.models.fetch import is_fetched
from posttrain.models.load import cache_kwarg, load_model

REAL_MODEL = "smollm2-135m-instruct"
ATTENTION_OPS = ("aten::bmm", "aten::baddbmm", "posttrain::attention")  # the last: the C kernel's profiler scope
PROJECTION_OPS = ("aten::mm", "aten::linear", "posttrain::matmul")  # torch's products, and the projections' kernel


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
        group = "mm" if e.key in PROJECTION_OPS else "bmm" if e.key in ATTENTION_OPS else "other"
        spent[group] += e.self_cpu_time_total
    total = sum(spent.values())
    step = statistics.median(times)
    return (
        f"{step * 1e3:.1f} ms a step, {rows / step:.0f} tok/s, {rows * 2 * n_params / step / 1e9:.0f} GFLOP/s; profile: projections' mm "
        f"{100 * spent['mm'] / total:.0f}%, attention ({'our kernel' if decoder.kernel else 'bmm'}) {100 * spent['bmm'] / total:.0f}%, "
        f"the rest {100 * spent['other'] / total:.0f}%"
    )


def step_kernel(model, rows: int, length: int, steps: int, rounds: int = 4) -> str:
    """Whole decode steps through our C kernels (``generate/decode_kernels*.c``, their key/value layouts), through
    them with torch's products for the projections (``decode_kernels.use_matmul`` off), and through torch's ops
    (blocks of BLOCK columns): decoders on the same prefilled cache, alternating rounds of ``steps`` steps; the
    median step of each and how often the next tokens agree with the kernels'."""
    cache = prefilled(model, rows, length)
    decoders = {}
    for name in ("kernels", "kernels, torch's products", "torch's ops"):
        with torch_attention(name == "torch's ops"):
            decoder = FastDecoder(model)
            decoder.start(cache, torch.ones(rows, length, dtype=torch.long), max_new_tokens=rounds * steps + 2)
        decoders[name] = decoder if name == "kernels" else _TorchProducts(decoder)
    if not decoders["kernels"].kernel:
        return f"{rows} rows: the decode kernels are not used here (not x86-64, no AVX512-BF16 for bf16, no C compiler, or POSTTRAIN_CPU_KERNELS=0)"
    tokens, positions = torch.randint(0, model.config.vocab_size, (rows,)), torch.full((rows,), length)
    logits = {name: decoder.step(tokens, positions).float() for name, decoder in decoders.items()}
    agree = {name: (logits[name].argmax(-1) == logits["kernels"].argmax(-1)).float().mean().item() for name in logits}
    ms = alternated(decoders, tokens, positions, rounds, steps)
    mine, products, ops = ms.values()
    same_products, same_ops = (100 * agree[name] for name in ("kernels, torch's products", "torch's ops"))
    return (
        f"{rows} rows, whole steps: decode kernels {mine:.1f} ms, with torch's products {products:.1f} ms, torch's ops {ops:.1f} ms "
        f"(kernels/torch {mine / ops:.2f}, the projections' kernel/torch's products {mine / products:.2f}; {rounds} alternating rounds "
        f"of {steps}); same next token as the kernels' on {same_products:.0f}% and {same_ops:.0f}% of rows"
    )


class _TorchProducts:
    """A decoder whose steps multiply with torch (``decode_kernels.use_matmul`` off during each step)."""

    def __init__(self, decoder: FastDecoder):
        self.decoder = decoder

    def step(self, *args, **kwargs):
        decode_kernels.use_matmul = False
        try:
            return self.decoder.step(*args, **kwargs)
        finally:
            decode_kernels.use_matmul = True


def projections(model, rows: list[int], rounds: int = 7) -> str:
    """The step's projections alone, each layer's four and the vocabulary's, on the model's weights and random
    inputs: ``decode_kernels.matmul`` against ``torch.mm`` at each row count, alternating rounds; median ms of a
    step's worth and GFLOP/s."""
    weights = [w for layer in FastDecoder(model).layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    weights.append(model.get_output_embeddings().weight)
    dtype = weights[0].dtype
    lines = []
    for r in rows:
        inputs = [torch.randn(w.shape[1], r).to(dtype) for w in weights]
        if decode_kernels.matmul(weights[0], inputs[0]) is None:
            return "the projections' kernel does not run here (kernels off or not built, or bf16 without AVX512-BF16)"
        times = {"kernel": [], "torch": []}
        for _ in range(rounds):
            for name, spent in times.items():
                start = time.perf_counter()
                for w, x in zip(weights, inputs):
                    decode_kernels.matmul(w, x) if name == "kernel" else torch.mm(w, x)
                spent.append(time.perf_counter() - start)
        flops = 2 * r * sum(w.numel() for w in weights)
        mine, theirs = (statistics.median(t) for t in times.values())
        lines.append(
            f"{r} rows: kernel {mine * 1e3:.1f} ms ({flops / mine / 1e9:.0f} GFLOP/s), torch.mm {theirs * 1e3:.1f} ms "
            f"({flops / theirs / 1e9:.0f} GFLOP/s), torch/kernel {theirs / mine:.2f}"
        )
    return f"projections of a step ({len(weights)} products, {rounds} alternating rounds):\n    " + "\n    ".join(lines)


def alternated(decoders: dict, tokens: torch.Tensor, positions: torch.Tensor, rounds: int, steps: int) -> dict:
    """Median ms a step of each decoder, ``rounds`` rounds of ``steps`` steps, the decoders taking turns each round."""
    times = {name: [] for name in decoders}
    for r in range(rounds):
        for name, decoder in decoders.items():
            for i in range(steps):
                start = time.perf_counter()
                decoder.step(tokens, positions + 1 + r * steps + i)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


@contextlib.contextmanager
def torch_attention(on: bool = True):
    """Decoders started inside use torch's ops (plain blocks) rather than the C kernels."""
    before = os.environ.get("POSTTRAIN_CPU_KERNELS")
    if on:
        os.environ["POSTTRAIN_CPU_KERNELS"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("POSTTRAIN_CPU_KERNELS", None)
        else:
            os.environ["POSTTRAIN_CPU_KERNELS"] = before


def step_layouts(model, rows: int, length: int, steps: int, rounds: int = 4) -> str:
    """Whole decode steps with each key/value layout on the same prefilled cache: blocks of BLOCK columns (bf16's)
    against one block cut at the current column (float32's), ``rounds`` alternating rounds of ``steps`` steps;
    the median step of each and whether their logits agree."""
    from posttrain.generate import kv_blocks

    cache = prefilled(model, rows, length)
    decoders, made_by = {}, kv_blocks.cuts
    for name, cut in (("blocks", False), ("cut", True)):
        kv_blocks.cuts = lambda dtype, cut=cut: cut  # the layout KVBlocks.zeros picks for this decoder
        try:
            with torch_attention():  # torch's layouts, not the C kernel's
                decoders[name] = FastDecoder(model)
                decoders[name].start(cache, torch.ones(rows, length, dtype=torch.long), max_new_tokens=rounds * steps + 2)
        finally:
            kv_blocks.cuts = made_by
    tokens, positions = torch.randint(0, model.config.vocab_size, (rows,)), torch.full((rows,), length)
    logits = {name: decoder.step(tokens, positions) for name, decoder in decoders.items()}
    same = torch.allclose(*logits.values(), atol=1e-4 if logits["cut"].dtype == torch.float32 else 5e-2)
    ms = alternated(decoders, tokens, positions, rounds, steps)
    return (
        f"{rows} rows, whole steps by layout ({rounds} alternating rounds of {steps}): blocks of {BLOCK} {ms['blocks']:.1f} ms, "
        f"one cut block {ms['cut']:.1f} ms (cut/blocks {ms['cut'] / ms['blocks']:.2f}); same logits: {same}"
    )


def step_narrow(model, rows: int, length: int, steps: int, rounds: int = 4) -> str:
    """Whole decode steps with a few rows where torch multiplies (the projections' kernel off): products padded to
    ``fast.NARROW`` columns against products over the rows themselves (``NARROW`` 0), alternating rounds of ``steps``
    steps on one decoder; the median step of each."""
    from posttrain.generate import fast

    decode_kernels.use_matmul = False
    decoder = FastDecoder(model)
    decoder.start(prefilled(model, rows, length), torch.ones(rows, length, dtype=torch.long), max_new_tokens=2 * rounds * steps + 2)
    tokens, positions = torch.randint(0, model.config.vocab_size, (rows,)), torch.full((rows,), length)
    padded_to, times, logits = fast.NARROW, {"padded": [], "rows": []}, {}
    try:
        for r in range(rounds):
            for name, narrow in (("padded", padded_to), ("rows", 0)):
                fast.NARROW = narrow
                for i in range(steps):
                    start = time.perf_counter()
                    out = decoder.step(tokens, positions + (2 * r + (name == "rows")) * steps + i)
                    times[name].append(time.perf_counter() - start)
                logits[name] = out
    finally:
        fast.NARROW, decode_kernels.use_matmul = padded_to, True
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return (
        f"{rows} rows, products padded to {padded_to} columns {ms['padded']:.1f} ms a step, over the rows themselves {ms['rows']:.1f} ms "
        f"(padded/rows {ms['padded'] / ms['rows']:.2f}; {rounds} alternating rounds of {steps})"
    )


def attention_layouts(model, rows: int, t: int, dtype: torch.dtype, layers: int = 30, rounds: int = 8) -> str:
    """One step's attention over t + 1 columns, both key/value layouts on the same data: blocks of BLOCK
    columns, the last masked past t (bf16's layout), against one block cut at column t (float32's, a strided
    slice). ``layers`` distinct buffers, so the cache is read from memory as in a step; the fastest of
    ``rounds`` alternating rounds, ms a layer."""
    c = model.config
    kv = c.num_key_value_heads
    group = c.num_attention_heads // kv
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    columns = round_up(t + 1 + 2 * BLOCK)
    data = [(torch.randn(rows, kv, t + 1, d, dtype=dtype), torch.randn(rows, kv, t + 1, d, dtype=dtype)) for _ in range(layers)]

    def buffers(block: int) -> list[tuple[KVBlocks, KVBlocks]]:
        out = []
        for k, v in data:
            kb, vb = (KVBlocks(k.new_zeros((columns // block, rows, kv, block, d)), cut=block == columns) for _ in range(2))
            kb.write(slice(None), 0, k)
            vb.write(slice(None), 0, v)
            out.append((kb, vb))
        return out

    bias = torch.zeros(rows, columns)
    layouts = {"blocks": (buffers(BLOCK), (t // BLOCK + 1) * BLOCK), "cut": (buffers(columns), t + 1)}
    q = torch.randn(rows * kv, group, d, dtype=dtype) * 0.125
    best = dict.fromkeys(layouts, math.inf)
    for _ in range(rounds):
        for name, (pairs, span) in layouts.items():
            step = step_bias(bias, rows, t, span)
            start = time.perf_counter()
            for kb, vb in pairs:
                attend(q, kb, vb, step)
            best[name] = min(best[name], (time.perf_counter() - start) / layers * 1e3)
    outs = [attend(q, *pairs[0], step_bias(bias, rows, t, span)).float() for pairs, span in layouts.values()]
    same = torch.allclose(*outs, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    return (
        f"attention at {rows} rows over {t + 1} columns: blocks of {BLOCK} {best['blocks']:.2f} ms a layer, one block cut at the "
        f"column {best['cut']:.2f} ms ({dtype_name(dtype)} uses {'the cut block' if cuts(dtype) else 'blocks'}); same output: {same}"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def padded_spans(model, rows: int, dtype: torch.dtype, layers: int = 30, rounds: int = 12) -> str:
    """Attention over left-padded rows (prompts of 44-168 tokens, longest first, 32 tokens generated): every row
    in every block vs only the rows a block holds keys for (``block_rows``); ``layers`` distinct buffers, so the
    cache is read from memory as in a step; the fastest of ``rounds`` alternating rounds, ms a layer. Blocks of
    BLOCK columns (bf16's layout) in either precision: float32's one cut block has a single span."""
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
    bias = step_bias(mask, rows, t, (t // BLOCK + 1) * BLOCK)
    spans = block_rows(bias, BLOCK)
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
                attend(q, kb, vb, bias, span)
            best[name] = min(best[name], (time.perf_counter() - start) / layers * 1e3)
    same = torch.equal(attend(q, *blocks[0], bias), attend(q, *blocks[0], bias, spans))
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
    ap.add_argument("--kernels-only", action="store_true", help="each step's profile and the kernels against torch's ops; not the layouts")
    ap.add_argument(
        "--projections", default="", help="row counts (e.g. 1,8,64,128): the projections' kernel against torch.mm alone, then exit"
    )
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
            if args.projections:
                print(f"  {precision} {projections(model, [int(r) for r in args.projections.split(',')])}", flush=True)
                continue
            for r in rows:
                print(f"  {precision} {r} rows: {step_profile(model, r, args.cache, args.steps, n_params)}", flush=True)
                print(f"  {precision} {step_kernel(model, r, args.cache, args.steps)}", flush=True)
                if args.kernels_only:
                    continue
                print(f"  {precision} {step_layouts(model, r, args.cache, args.steps)}", flush=True)
                if 1 < r < NARROW and not bf16:
                    print(f"  {precision} {step_narrow(model, r, args.cache, args.steps)}", flush=True)
            if args.kernels_only:
                continue
            print(f"  {precision} {padded_spans(model, rows[-1], torch.bfloat16 if bf16 else torch.float32)}", flush=True)
            print(
                f"  {precision} {attention_layouts(model, rows[-1], args.cache + args.steps, torch.bfloat16 if bf16 else torch.float32)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
