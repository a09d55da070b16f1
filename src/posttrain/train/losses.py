"""Losses as pure functions on tensors (no models, no configs); shapes in the docstrings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_nll_sum(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, *, chunk: int = 2048) -> torch.Tensor:
    """Summed next-token negative log-likelihood over trained positions.

    ``hidden``: [rows, T, d] final hidden states; ``targets``: [rows, T], already shifted (``IGNORE`` where
    not trained); ``lm_head``: the output projection. Logits are computed only at trained positions, a
    chunk of positions at a time, and upcast to fp32 per chunk: the full [rows, T, vocab] logits are
    never materialised. Returns a scalar (the sum, not the mean: the loop divides by the step's
    trained-token count, so gradient accumulation and several processes give the same update).
    """
    keep = targets != IGNORE
    h = hidden[keep]
    y = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for k in range(0, h.shape[0], chunk):
        logits = lm_head(h[k : k + chunk]).float()
        total = total + F.cross_entropy(logits, y[k : k + chunk], reduction="sum")
    return total
