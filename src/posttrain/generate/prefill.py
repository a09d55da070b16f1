"""Prefill pieces: how prompts are grouped for one forward, and the shared prefix's keys and values.

:func:`prefill` runs the prompts through the model's own forward; see the engine's docstring for why
prompts are grouped by length and a shared prefix is prefilled once (:class:`PrefixCache` keeps the
server's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from posttrain.generate.intervene import Intervention, attention_bias, boost_columns

if TYPE_CHECKING:
    from posttrain.generate.engine import Engine
    from posttrain.generate.sequences import DecodeSequence

MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is not worth a separate forward pass
PREFILL_TOKENS = 4096  # most tokens (padding included) in one prefill forward, to bound activation memory
PREFILL_PADDING = 1.1  # a prefill group grows while its padded size stays within this factor of its real tokens (see prefill_groups)


@dataclass
class Prefix:
    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, (1, kv heads, length, head dim)


def prefill_groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Split lengths sorted longest first into runs ``[lo, hi)`` worth prefilling together.

    A run grows while padding every row to its first (longest) row costs at most ``PREFILL_PADDING`` times
    its real tokens and stays within ``PREFILL_TOKENS``: little compute on padding, few forward passes. The demo's 136
    evaluation prompts (6,485 tokens after the shared system prompt) pad to 8,067 tokens in 4 forwards at 1.25 and to
    7,108 in 7 at 1.1, which prefilled them in 0.88 of the time (medians) (machine G, bf16, four alternating runs, ad-hoc); at
    1.05, 6,787 tokens in 14 forwards, no faster than 1.1.
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


class PrefixCache:
    """One fixed run of tokens (the chat template's preamble: its default system prompt) prefilled once per adapter.

    For the server, whose batches are whatever requests are waiting: a batch whose prompts all start with
    ``tokens`` (and have a token of their own after them) gets the cached keys and values; any other
    batch is prefilled whole. Built inside the engine's session, so the cache has the session's dtype.
    """

    def __init__(self, engine: Engine, tokens: list[int]):
        self.engine, self.tokens = engine, list(tokens)
        self._cached: dict[tuple[int, Intervention | None], Prefix | None] = {}

    def get(self, batch: list[DecodeSequence]) -> Prefix | None:
        n = len(self.tokens)
        if n < MIN_SHARED_PREFIX or any(len(s.prompt_ids) <= n or s.prompt_ids[:n] != self.tokens for s in batch):
            return None
        if any(s.instruction is not None and s.instruction[0] < n for s in batch):
            return None  # a boosted instruction inside the preamble: its keys need the boost in the prefill
        group = batch[0].group  # steering changes the preamble's keys and values too
        if group not in self._cached:
            with self.engine._using(group):
                self._cached[group] = self.engine._prefix([self.tokens + [0]])
        return self._cached[group]


def prefill(
    engine: Engine, prompts: list[list[int]], prefix: Prefix | None, spans: list[tuple[int, int] | None] | None = None, log_boost: float = 0.0
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the prompts (longest first) through the model: (cache, attention mask, next positions, last logits, boost).

    Rows are left-padded to a common width; with a shared prefix, the padding sits between the prefix
    and each prompt's own tokens (the mask hides it and positions skip it). Prompts are run in groups
    of similar length so little compute goes to padding, and the groups' caches joined. With InstABoost
    (``log_boost`` and the prompts' instruction ``spans``), ``boost`` is ``log m`` at each row's
    instruction columns of the mask (else None), and the forwards get it in a 4-D attention mask.
    """
    device, shared = engine.device, prefix.length if prefix else 0
    lengths = [len(p) - shared for p in prompts]
    runs = prefill_groups(lengths) if (prefix or engine._plain_cache()) else [(0, len(prompts))]
    width = lengths[0]  # the longest, as prompts come longest first
    parts, masks, logits = [], [], []
    boost = None
    if log_boost and spans is not None and any(span is not None for span in spans):
        boost = boost_columns(shared + width, spans, [len(p) for p in prompts], log_boost, device)
    for lo, hi in runs:
        rows, own = hi - lo, lengths[lo]
        ids = torch.full((rows, own), engine.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for r, p in enumerate(prompts[lo:hi]):
            ids[r, own - len(p) + shared :] = torch.tensor(p[shared:])
            mask[r, shared + width - len(p) + shared :] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = engine._new_cache()
        if prefix:
            for layer, (k, v) in enumerate(prefix.layers):
                cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), layer)
        group_mask = torch.cat([mask[:, :shared], mask[:, shared + width - own :]], dim=1)
        # positions count real tokens only: a padded prompt is embedded exactly as it would be alone
        positions = (group_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        attention = group_mask
        if boost is not None:
            rows_boost = boost[lo:hi]
            group_boost = torch.cat([rows_boost[:, :shared], rows_boost[:, shared + width - own :]], dim=1)
            attention = attention_bias(group_mask, group_boost, own, engine._dtype)
        out = engine.model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            **{engine._cache_kwarg: cache},
            use_cache=True,
            logits_to_keep=last_index(own, device),
        )
        parts.append((cache, own))
        masks.append(mask)
        logits.append(out.logits[:, -1])
    if len(parts) == 1 and parts[0][1] == width:
        cache = parts[0][0]
    else:
        cache = engine._new_cache()
        for layer in range(len(parts[0][0].layers)):
            keys = [pad_middle(c.layers[layer].keys, shared, width - own) for c, own in parts]
            values = [pad_middle(c.layers[layer].values, shared, width - own) for c, own in parts]
            cache.update(torch.cat(keys), torch.cat(values), layer)
    mask = torch.cat(masks)
    next_position = torch.tensor([len(p) for p in prompts], device=device)
    return cache, mask, next_position, torch.cat(logits), boost
