"""Prefill pieces: how prompts are grouped for one forward, and the shared prefix's keys and values.

The prefill itself runs the model's own forward (:meth:`Engine._prefill
<posttrain.generate.engine.Engine._prefill>`); see the engine's docstring for why prompts are grouped
by length and a shared prefix is prefilled once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is not worth a separate forward pass
PREFILL_TOKENS = 4096  # most tokens (padding included) in one prefill forward, to bound activation memory
PREFILL_PADDING = 1.25  # a prefill group grows while its padded size stays within this factor of its real tokens


@dataclass
class Prefix:
    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, (1, kv heads, length, head dim)


def prefill_groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Split lengths sorted longest first into runs ``[lo, hi)`` worth prefilling together.

    A run grows while padding every row to its first (longest) row costs at most ``PREFILL_PADDING`` times
    its real tokens and stays within ``PREFILL_TOKENS``: little compute on padding, few forward passes.
    """
    groups, lo, real = [], 0, 0
    for i, n in enumerate(lengths):
        rows = i - lo + 1
        if i > lo and (lengths[lo] * rows > PREFILL_PADDING * (real + n) or lengths[lo] * rows > PREFILL_TOKENS):
            groups.append((lo, i))
            lo, real = i, 0
        real += n
    groups.append((lo, len(lengths)))
    return groups


def last_index(length: int, device: torch.device) -> torch.Tensor:
    """``logits_to_keep`` for the last of ``length`` positions, as an index tensor, not the int 1.

    The int slices the hidden states to a non-contiguous (rows, 1, hidden) view, and a linear layer on that
    view broadcasts the vocabulary projection's weight to every row (a batched matmul over copies of a
    49k x 576 matrix): 1.5 s of SmolLM2's 3 s prefill at batch 32. Indexing gives a contiguous copy.
    """
    return torch.tensor([length - 1], device=device)


def pad_middle(states: torch.Tensor, shared: int, pad: int) -> torch.Tensor:
    """Insert ``pad`` zero positions after the first ``shared`` ones of (batch, heads, positions, dim) states."""
    if pad == 0:
        return states
    b, h, _, d = states.shape
    return torch.cat([states[:, :, :shared], states.new_zeros((b, h, pad, d)), states[:, :, shared:]], dim=2)
