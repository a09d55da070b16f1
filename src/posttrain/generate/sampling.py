"""The next token of each row of a batch whose rows may each carry their own sampling parameters.

Our own code: the server batches requests with different temperatures, top-k, top-p and seeds in one
decode step, and every row draws from its own ``torch.Generator`` so that what a seed gives does not
depend on which other rows share the batch.

Sampling follows transformers' order: temperature, then top-k, then top-p (nucleus: the smallest set of
tokens whose probability reaches ``top_p``, always at least one); the token is then drawn by inverse CDF
from one uniform number of the row's generator. ``temperature=0`` is greedy (argmax; top-k and top-p
ignored) and uses no randomness. Log-probabilities are the model's own distribution (temperature 1, no
filters), whatever the token was drawn at.

On a CPU where the decode kernels load (:mod:`posttrain.generate.decode_kernels`), a step whose rows want no top
log-probs takes its argmaxes, its temperature-only draws and its tokens' log-probabilities there, each in one pass
over the logits in their own dtype. A draw takes the same uniform number and the same inverse CDF, over float64
sums of the exponentials rather than of float32 probabilities, so a number within rounding of a boundary between
two tokens may take the other one; log-probabilities sum their exponentials in float64 too (torch's logsumexp in
float32). torch's ops below took 48 ms a step to sample 128 rows of a 49k vocabulary (float64 copies of the whole
batch's distribution), the kernel about 5 (ad-hoc timings, machine G of docs/PERFORMANCE.md, 2026-12-07).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from posttrain.generate import decode_kernels
from posttrain.generate.params import SamplingParams


class Picked(NamedTuple):
    """One step's choice: ``tokens`` (rows,); ``logprobs`` (rows,) when any row wants scores, else None;
    ``top`` (ids, log-probs), each (rows, k), for the largest ``top_logprobs`` asked, else None."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None
    top: tuple[torch.Tensor, torch.Tensor] | None


def pick(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> Picked:
    """The next token of each row of ``logits`` (rows, vocab), row ``r`` sampled with ``params[r]`` from ``generators[r]``.

    A row whose generator is None takes the argmax (greedy rows, and rows that have finished). On a CPU with the
    decode kernels, argmaxes, temperature-only draws and the tokens' log-probabilities each take one pass over the
    logits in their own dtype (:func:`_through_kernels`); top-k, top-p and top log-probs use torch's ops below.
    """
    drawn = [r for r, g in enumerate(generators) if g is not None and not params[r].greedy]
    wanted = any(p.scores for p in params)
    picked, u = _through_kernels(logits, params, generators, drawn, wanted)
    if picked is not None:
        return picked
    # float32 scores, row-major (the fast decoder's logits may be a transpose: one converting copy makes both)
    scores = logits.float() if logits.is_contiguous() else torch.empty(logits.shape, device=logits.device).copy_(logits)
    tokens = scores.argmax(-1)
    if drawn:
        index = torch.tensor(drawn, device=scores.device)
        chosen = choose(scores[index], [params[r] for r in drawn], [generators[r] for r in drawn], u)  # type: ignore[misc]
        tokens[index] = chosen
    if not wanted:
        return Picked(tokens, None, None)
    norm = scores.logsumexp(-1)
    logprobs = scores.gather(-1, tokens[:, None])[:, 0] - norm
    k = max(p.top_logprobs for p in params)
    top = None
    if k:
        values, ids = scores.topk(min(k, scores.shape[-1]), dim=-1)
        top = (ids, values - norm[:, None])
    return Picked(tokens, logprobs, top)


def _through_kernels(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None], drawn: list[int], wanted: bool
) -> tuple[Picked | None, torch.Tensor | None]:
    """``pick`` through the decode kernels (:func:`decode_kernels.argmax`, ``.sample``, ``.logprobs``) where they load
    and every drawn row is temperature-only and no row wants top log-probs; else None. Also the uniform numbers drawn
    from the rows' generators on the way, for torch's path to use when a kernel declines (a row with a NaN or +inf),
    so that every generator ends where torch's path alone leaves it."""
    if any(p.top_logprobs for p in params) or not all(_temperature_only(params[r], logits.shape[-1]) for r in drawn):
        return None, None
    tokens = decode_kernels.argmax(logits)
    if tokens is None:
        return None, None
    u = None
    if drawn:
        u = uniforms([generators[r] for r in drawn])  # type: ignore[misc]
        chosen = decode_kernels.sample(logits, drawn, [params[r].temperature for r in drawn], u)
        if chosen is None:
            return None, u
        tokens[torch.tensor(drawn, device=tokens.device)] = chosen.to(tokens.device)
    if not wanted:
        return Picked(tokens, None, None), u
    logprobs = decode_kernels.logprobs(logits, list(range(len(params))), tokens)
    return (Picked(tokens, logprobs, None) if logprobs is not None else None), u


def _temperature_only(p: SamplingParams, vocabulary: int) -> bool:
    """Whether ``choose`` would apply neither top-k nor top-p to a row with ``p``."""
    return not 0 < p.top_k < vocabulary and p.top_p >= 1


def uniforms(generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One uniform float64 number in [0, 1) from each row's generator: what each row's draw takes from it."""
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device) for g in generators])


def choose(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator], u: torch.Tensor | None = None
) -> torch.Tensor:
    """A draw for each row of ``logits`` (rows, vocab) with its own temperature, top-k, top-p and generator (``u``: the
    rows' :func:`uniforms` when already drawn)."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    logits = logits / temperature[:, None]
    top_k = [p.top_k if 0 < p.top_k < logits.shape[-1] else 0 for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k):
        k = max(top_k)
        kth = torch.topk(logits, k, dim=-1).values  # (rows, k), descending
        at = torch.tensor([max(t, 1) - 1 for t in top_k], device=device)
        threshold = kth.gather(-1, at[:, None])
        threshold[torch.tensor([t == 0 for t in top_k], device=device)] = float("-inf")  # rows without top-k keep all
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if any(p < 1 for p in top_p):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p; the first always stays. Rows with
        # top_p 1 drop nothing (their cumulative sum can reach 1.0 early by rounding).
        p = torch.tensor(top_p, dtype=probs.dtype, device=device)[:, None]
        drop = ((probs.cumsum(-1) - probs) >= p) & (p < 1)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # Inverse-CDF draw: one uniform number from each row's generator, then one batched cumulative sum and
    # search. For 128 rows of SmolLM2's 49k-token vocabulary torch.multinomial row by row (it rebuilds each
    # row's distribution) took 207-238 ms, this 21-40 ms (benchmarks/decode_step.py, two runs). float64 keeps the CDF exact.
    cdf = logits.softmax(-1).double().cumsum_(-1)
    u = (uniforms(generators) if u is None else u).to(cdf.device)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return picked.clamp_(max=logits.shape[-1] - 1)


def generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator seeded with ``seed`` on ``device``: one per sequence."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
