"""One decode step, taken apart: posttrain's FastDecoder vs the model's forward, and the pieces around it.

    python benchmarks/decode_step.py [--rows 32,64,128] [--cache 100] [--repeats 3] [--steps 5] [--no-profile]

SmolLM2-135M-Instruct when fetched (`posttrain models fetch smollm2-135m-instruct`), else the random
tiny-llama (a note is printed; the numbers then say little), fp32, torch's threads. For each row count:
a cache of ``--cache`` tokens is prefilled with the model's forward, then ``--steps`` one-token steps are
timed on ``FastDecoder`` (``generate/fast.py``) and on the model's forward with its ``DynamicCache``,
alternating ``--repeats`` times (so drift in the machine's load hits both); the median ms per step is
reported. Then:

* a torch profile of the model-forward step at the middle row count: the share of ``aten::cat``
  (``DynamicCache`` joining keys and values) and the fused SDPA kernel's ms per layer;
* the vocabulary projection and the MLP's gate/up projection as ``h @ W.T`` (``F.linear``) and as
  ``W @ h.T`` (what FastDecoder does for the vocabulary);
* drawing one token per row at the largest row count: ``torch.multinomial`` row by row (the engine's
  earlier sampler) vs the engine's inverse-CDF draw (``sampling.choose``).

The last line is ``ratio=<forward ms / fast ms per step at the largest row count>``. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F

from posttrain.config import ModelConfig
from posttrain.generate import SamplingParams
from posttrain.generate.fast import FastDecoder
from posttrain.generate.sampling import choose
from posttrain.models.fetch import is_fetched
from posttrain.models.load import load_model

REAL_MODEL = "smollm2-135m-instruct"


def ms(fn, repeats: int = 10) -> float:
    """Median ms of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def prefilled(model, rows: int, length: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=torch.tensor([length - 1]))
    return cache


def forward_step(model, cache, tokens, mask, positions):
    return model(
        input_ids=tokens[:, None],
        attention_mask=mask,
        position_ids=positions[:, None],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits


def compare_steps(model, rows: int, length: int, steps: int, repeats: int) -> tuple[float, float]:
    """(fast ms, forward ms) per step: medians over ``repeats`` alternating rounds of ``steps`` steps."""
    vocab = model.config.vocab_size
    tokens, positions = torch.randint(0, vocab, (rows,)), torch.full((rows,), length)
    fast_cache, own_cache = prefilled(model, rows, length), prefilled(model, rows, length)
    decoder = FastDecoder(model)
    decoder.start(fast_cache, torch.ones(rows, length, dtype=torch.long), max_new_tokens=steps * repeats + 1)
    mask = torch.ones(rows, length, dtype=torch.long)
    fast, own = [], []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(steps):
            decoder.step(tokens, positions + r * steps + i)
        fast.append((time.perf_counter() - start) / steps * 1e3)
        start = time.perf_counter()
        for i in range(steps):
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            forward_step(model, own_cache, tokens, mask, positions + r * steps + i)
        own.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(fast), statistics.median(own)


def profile_forward(model, rows: int, length: int, steps: int) -> None:
    from torch.profiler import profile

    cache = prefilled(model, rows, length)
    tokens, positions = torch.randint(0, model.config.vocab_size, (rows,)), torch.full((rows,), length)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
    forward_step(model, cache, tokens, mask, positions)  # warm-up
    with profile() as prof:
        for i in range(steps):
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            forward_step(model, cache, tokens, mask, positions + 1 + i)
    events = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in events.values())
    cat = events.get("aten::cat")
    sdpa = next((e for k, e in events.items() if "scaled_dot_product" in k and "flash" in k), None)
    layers = model.config.num_hidden_layers
    print(f"  model forward, {rows} rows, profiled over {steps} steps:")
    if cat is not None:
        print(f"    aten::cat (DynamicCache joins, rotary halves): {100 * cat.self_cpu_time_total / total:.1f}% of the step's CPU time")
    if sdpa is not None:
        print(f"    fused SDPA: {sdpa.self_cpu_time_total / 1e3 / steps / layers:.2f} ms a layer")


def layouts(model, rows: int) -> None:
    hidden = model.config.hidden_size
    h = torch.randn(rows, hidden)
    head = model.lm_head.weight
    gate_up = torch.cat([model.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].mlp.up_proj.weight])
    for name, w in (("vocabulary projection", head), ("MLP gate/up", gate_up)):
        linear = ms(lambda w=w: F.linear(h, w))
        transposed = ms(lambda w=w: torch.matmul(w, h.T))
        print(
            f"  {name} {tuple(w.shape)} at {rows} rows: h @ W.T {linear:.2f} ms, W @ h.T {transposed:.2f} ms ({linear / transposed:.2f}x)"
        )


def samplers(vocab: int, rows: int) -> None:
    logits = torch.randn(rows, vocab)
    params = SamplingParams(temperature=0.8)

    def multinomial():
        generators = [torch.Generator().manual_seed(i) for i in range(rows)]
        probs = (logits / params.temperature).softmax(-1)
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])

    def inverse_cdf():
        return choose(logits, [params] * rows, [torch.Generator().manual_seed(i) for i in range(rows)])

    print(
        f"  one draw for {rows} rows of {vocab:,} tokens: torch.multinomial row by row {ms(multinomial, 5):.1f} ms, inverse CDF {ms(inverse_cdf, 5):.1f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="32,64,128", help="comma-separated row counts (batch widths)")
    ap.add_argument("--cache", type=int, default=100, help="tokens already in the cache")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed round")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds per decoder")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile of the model-forward step")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]

    name = REAL_MODEL if is_fetched(REAL_MODEL) else "tiny-llama"
    if name != REAL_MODEL:
        print(f"note: {REAL_MODEL} is not fetched; timing the random tiny-llama instead")
    model = load_model(ModelConfig(name=name, dtype="float32"), torch.device("cpu")).eval()
    print(f"{name}, fp32, {torch.get_num_threads()} torch threads, cache {args.cache} tokens; {date.today()}", flush=True)
    ratio = None
    with torch.inference_mode():
        for r in rows:
            fast, own = compare_steps(model, r, args.cache, args.steps, args.repeats)
            ratio = own / fast
            print(
                f"  {r:>4} rows: FastDecoder {fast:7.1f} ms/step ({fast / r:.2f} ms a row), model forward {own:7.1f} ms/step ({own / fast:.2f}x)",
                flush=True,
            )
        if not args.no_profile:
            profile_forward(model, rows[len(rows) // 2], args.cache, args.steps)
        layouts(model, rows[-1])
        layouts(model, rows[0])
        samplers(model.config.vocab_size, rows[-1])
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
