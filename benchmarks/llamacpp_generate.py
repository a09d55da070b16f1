"""Greedy generation with llama.cpp on a GGUF model, batched and one at a time, for ``benchmarks/generate.py``.

    <llama.cpp venv>/bin/python benchmarks/llamacpp_generate.py MODEL.gguf JOB.json

Runs inside the venv ``benchmarks/llamacpp.sh`` makes (llama-cpp-python built from source), never in the
project's. ``JOB.json``: ``{"prompts": [[token ids], ...], "end_ids": [...], "max_new_tokens": N,
"batch_sizes": [B, ...], "single_prompts": S, "threads": T, "prefill": true}``. The prompts are the token
ids posttrain's tokenizer gave, with the chat template applied, so both sides decode the same prompts;
``S`` is how many of them the batch-1 run decodes (default all). For each batch size the prompts go through
in groups of ``B`` sequences, each group prefilled in one ``llama_decode`` (every prompt's tokens, logits
at its last token only) and then decoded one token per live sequence a step until each has emitted an end
token or ``max_new_tokens``: llama.cpp's own batched API (one sequence id per prompt, the KV cache split
per sequence), greedy (argmax over the logits of each row in numpy). A sequence that ends leaves the next
step's batch, so llama.cpp never computes a finished row. With ``"prefill": true`` each group is also run
with one new token, so the caller can split whole time into prefill and decode as it does for posttrain.

Prints one JSON line per batch size: ``{"batch": B, "seconds": s, "tokens": n, "prefill_seconds": p,
"outputs": [[ids], ...]}``. Our own script around llama-cpp-python's low-level bindings; its high-level
``Llama`` object decodes one sequence at a time.
"""

from __future__ import annotations

import json
import sys
import time

import llama_cpp as L
import numpy as np


def context(model, batch: int, width: int, threads: int):
    """A context with room for ``batch`` sequences of ``width`` tokens each, prefilled in one decode."""
    params = L.llama_context_default_params()
    params.n_seq_max = batch
    params.n_ctx = batch * width
    params.n_batch = max(512, batch * width)  # the prompts go in one llama_decode call, split into n_ubatch pieces
    params.n_threads = params.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        raise SystemExit(f"llama.cpp could not make a context for {batch} sequences of {width} tokens")
    return ctx


def fill(batch, items: list[tuple[int, int, int, bool]]) -> None:
    """Set ``batch``'s tokens to ``items``: (token, position, sequence id, logits wanted)."""
    for i, (token, pos, seq, logits) in enumerate(items):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if logits else 0
    batch.n_tokens = len(items)


def greedy(ctx, batch, n_vocab: int, prompts: list[list[int]], end_ids: set[int], max_new_tokens: int) -> list[list[int]]:
    """Every prompt of one group decoded together: the generated ids of each."""
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    fill(batch, [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)])
    if L.llama_decode(ctx, batch) != 0:
        raise SystemExit("llama_decode failed on the prompts")
    live = list(range(len(prompts)))
    outputs: list[list[int]] = [[] for _ in prompts]
    while True:
        logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(live), n_vocab))
        picked = logits.argmax(axis=1).tolist()
        step = []
        for s, token in zip(live, picked):
            outputs[s].append(token)
            if token not in end_ids and len(outputs[s]) < max_new_tokens:
                step.append(s)
        if not step:
            return outputs
        fill(batch, [(outputs[s][-1], len(prompts[s]) + len(outputs[s]) - 1, s, True) for s in step])
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed on a decode step")
        live = step


def run(
    model, n_vocab: int, prompts: list[list[int]], end_ids: set[int], max_new_tokens: int, width: int, threads: int
) -> tuple[float, list[list[int]]]:
    """(seconds, outputs) for every prompt, ``width`` sequences at a time; the context is made outside the clock."""
    longest = max(map(len, prompts)) + max_new_tokens
    ctx = context(model, width, longest, threads)
    batch = L.llama_batch_init(max(512, width * longest), 0, 1)
    try:
        start, outputs = time.perf_counter(), []
        for lo in range(0, len(prompts), width):
            outputs += greedy(ctx, batch, n_vocab, prompts[lo : lo + width], end_ids, max_new_tokens)
        return time.perf_counter() - start, outputs
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


def main() -> None:
    model_path, job_path = sys.argv[1], sys.argv[2]
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp could not load {model_path}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    prompts, end_ids, new, threads = job["prompts"], set(job["end_ids"]), job["max_new_tokens"], job["threads"]
    run(model, n_vocab, prompts[:2], end_ids, 2, 2, threads)  # warm up
    for width in job["batch_sizes"]:
        group = prompts[: job.get("single_prompts") or len(prompts)] if width == 1 else prompts
        seconds, outputs = run(model, n_vocab, group, end_ids, new, width, threads)
        prefill = run(model, n_vocab, group, end_ids, 1, width, threads)[0] if job.get("prefill") else None
        print(
            json.dumps(
                {"batch": width, "seconds": seconds, "tokens": sum(map(len, outputs)), "prefill_seconds": prefill, "outputs": outputs}
            ),
            flush=True,
        )
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
