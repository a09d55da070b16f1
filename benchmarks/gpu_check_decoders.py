"""gpu_check's ``decoders`` check: greedy generation with the fast decoder and with the model's forward.

    python benchmarks/gpu_check_decoders.py MODEL PROMPTS NEW_TOKENS

On the GPU when there is one (else the CPU): the same batched greedy run in fp32 with posttrain's
``FastDecoder`` (``Engine(fast=True)``, the default) and on the model's own forward with its cache
(``Engine(fast=False)``); then the fast decoder in bf16. The last line says each one's generated
tokens/s and how many fp32 sequences the two decoders agree on token for token (batched matmuls of
different shapes round differently, so a near-tie may flip; on the tiny models they agree).
"""

from __future__ import annotations

import sys
import time

import torch

from posttrain.config import ModelConfig
from posttrain.generate import Engine, SamplingParams
from posttrain.models.load import load_model, load_tokenizer

TOPICS = ["the sea", "a city at night", "the first day of school", "a red bicycle", "winter mornings", "an old library", "the moon", "a garden"]


def timed(engine: Engine, prompts: list[str], params: SamplingParams) -> tuple[list[list[int]], float]:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate(prompts, params, progress=False)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = [c[0].token_ids for c in out]
    return tokens, sum(len(t) for t in tokens) / seconds


def main() -> None:
    name, n, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(ModelConfig(name=name), device).eval()
    tokenizer = load_tokenizer(name)
    prompts = [f"Write {k % 3 + 2} sentences about {TOPICS[k % len(TOPICS)]}." for k in range(n)]
    greedy = SamplingParams(max_new_tokens=new, temperature=0.0)
    fast, slow = Engine(model, tokenizer, batch_size=n, fast=True), Engine(model, tokenizer, batch_size=n, fast=False)
    timed(fast, prompts[:4], SamplingParams(max_new_tokens=4))  # warm-up (kernels, allocator)
    fast_tokens, fast_rate = timed(fast, prompts, greedy)
    slow_tokens, slow_rate = timed(slow, prompts, greedy)
    _, bf16_rate = timed(fast, prompts, SamplingParams(max_new_tokens=new, temperature=0.0, bf16=True))
    same = sum(a == b for a, b in zip(fast_tokens, slow_tokens))
    print(
        f"{name} on {device.type}, {n} prompts x {new} tokens: fast {fast_rate:,.0f} tok/s, forward {slow_rate:,.0f} tok/s "
        f"(fast/forward {fast_rate / slow_rate:.2f}), fast bf16 {bf16_rate:,.0f} tok/s; fp32 sequences identical {same}/{n}"
    )
    if same < n // 2:
        raise SystemExit(f"the decoders disagree on {n - same} of {n} greedy sequences")


if __name__ == "__main__":
    main()
