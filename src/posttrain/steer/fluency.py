"""Fluency of steered text: perplexity under the unsteered model, and how much of it repeats itself.

Steering too hard, or at the wrong layer, makes a model degenerate: the same phrase over and over, or
words that no longer follow one another. Two measures catch it, both our own few lines:

* **perplexity under the unsteered model**, given the prompt *with* its instruction: how plausible the
  text is as an answer to the instructed prompt. Conditioning on the instruction matters: an answer in
  capitals is unlikely after a plain question and likely after "answer in capitals", and steering is
  meant to produce the latter. Reported as the geometric mean over texts (the exponent of the mean
  per-token negative log-likelihood of each text, averaged in log space);
* **repetition**: the share of a text's word 4-grams that repeat an earlier 4-gram of the same text
  (0 for no repeat; a loop of one sentence tends to 1), averaged over texts.

:class:`Bounds` holds what a condition may reach relative to the unsteered model's own answers to the
instructed prompts (its baseline): perplexity within a factor of it, repetition within an amount of it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NGRAM = 4
_WORD = re.compile(r"\w+|[^\w\s]")


def repetition(text: str, n: int = NGRAM) -> float:
    """The share of ``text``'s word ``n``-grams that already occurred earlier in it (0 when it has none)."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@torch.no_grad()
def completion_nll(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, batch_size: int = 16, pad_id: int = 0
) -> list[float]:
    """Mean negative log-likelihood per token of each completion after its prompt, under ``model`` as it is (nan for an empty one)."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(completions[i])))
    result = [math.nan] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = [i for i in order[start : start + batch_size] if completions[i]]
        if not chunk:
            continue
        seqs = [list(prompts[i]) + list(completions[i]) for i in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        for row, i in enumerate(chunk):
            n = len(completions[i])
            result[i] = -float(logp[row, -n:].mean())
    return result


@dataclass(frozen=True)
class Fluency:
    """A condition's fluency: geometric-mean perplexity and mean repetition over its texts."""

    perplexity: float
    repetition: float
    n: int

    @classmethod
    def of(cls, nlls: Sequence[float], texts: Sequence[str]) -> Fluency:
        finite = [x for x in nlls if math.isfinite(x)]
        ppl = math.exp(sum(finite) / len(finite)) if finite else math.nan
        reps = [repetition(t) for t in texts]
        return cls(ppl, sum(reps) / len(reps) if reps else math.nan, len(texts))


@dataclass(frozen=True)
class Bounds:
    """What a steered condition may reach: ``perplexity`` times the baseline's, ``repetition`` more than the baseline's."""

    perplexity: float = 2.0
    repetition: float = 0.10

    def limits(self, baseline: Fluency) -> tuple[float, float]:
        return baseline.perplexity * self.perplexity, baseline.repetition + self.repetition

    def within(self, fluency: Fluency, baseline: Fluency) -> bool:
        ppl, rep = self.limits(baseline)
        return fluency.perplexity <= ppl and fluency.repetition <= rep


DEFAULT_BOUNDS = Bounds()
