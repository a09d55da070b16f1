"""gpu_check's ``steer`` check: steering and InstABoost on the device, the fast decoder against the model's forward.

    python benchmarks/gpu_check_steer.py MODEL PROMPTS NEW_TOKENS

Fits directions for two instruction types on posttrain's built-in prompts (training split), then
generates the held-out prompts greedily, in fp32, once per path: steered (``adjust`` at the middle
layer) plus InstABoost (m = 5), with ``Engine(fast=True)`` (the fast decoder: per-row edits, the boost in
its mask) and ``Engine(fast=False)`` (forward hooks and a 4-D attention mask, which on CUDA goes through
SDPA's masked kernel). The last line gives each one's tokens/s and how many sequences agree token for
token; with the unsteered tokens as the check that the interventions changed something.
"""

from __future__ import annotations

import sys
import time

import torch

from posttrain.config import ModelConfig
from posttrain.generate import Engine, SamplingParams
from posttrain.generate.intervene import Intervention
from posttrain.models.load import load_model, load_tokenizer
from posttrain.steer.fit import examples_from_records, fit_directions
from posttrain.steer.vectors import SteeringSet
from posttrain.synth.verifiable import build_prompts

TYPES = ["change_case:english_lowercase", "punctuation:no_comma"]


def examples(split: str, n: int) -> list:
    return [ex for t in TYPES for ex in examples_from_records(build_prompts(split, n, 0, 1, [t], parts=True), split)]


def timed(engine: Engine, prompts: list[str], params: SamplingParams, **kwargs) -> tuple[list[list[int]], float]:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate(prompts, params, progress=False, **kwargs)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    tokens = [c[0].token_ids for c in out]
    return tokens, sum(len(t) for t in tokens) / (time.perf_counter() - t0)


def main() -> None:
    name, n, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(ModelConfig(name=name), device).eval()
    tokenizer = load_tokenizer(name)
    fast, slow = Engine(model, tokenizer, batch_size=n, fast=True), Engine(model, tokenizer, batch_size=n, fast=False)
    steering = SteeringSet(name, fit_directions(fast, examples("train", 16)))
    middle = model.config.num_hidden_layers // 2
    held = examples("heldout", n // len(TYPES))
    interventions = [Intervention((steering.steering(ex.type, mode="adjust", layer=middle),), boost=5.0) for ex in held]
    prompts, instructions = [ex.prompt for ex in held], [ex.instruction for ex in held]
    greedy = SamplingParams(max_new_tokens=new)
    timed(fast, prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    kwargs = {"intervention": interventions, "instructions": instructions}
    fast_tokens, fast_rate = timed(fast, prompts, greedy, **kwargs)
    slow_tokens, slow_rate = timed(slow, prompts, greedy, **kwargs)
    plain, plain_rate = timed(fast, prompts, greedy)
    same = sum(a == b for a, b in zip(fast_tokens, slow_tokens))
    changed = sum(a != b for a, b in zip(fast_tokens, plain))
    print(
        f"{name} on {device.type}, {len(prompts)} prompts x {new} tokens, steering + InstABoost m=5: fast {fast_rate:,.0f} tok/s, "
        f"forward {slow_rate:,.0f} tok/s, unsteered fast {plain_rate:,.0f} tok/s; steered sequences identical on both paths {same}/{len(prompts)}, "
        f"changed by steering {changed}/{len(prompts)}"
    )
    if same < len(prompts) // 2 or changed == 0:
        raise SystemExit(f"the paths disagree on {len(prompts) - same} of {len(prompts)} sequences, or steering changed none ({changed})")


if __name__ == "__main__":
    main()
