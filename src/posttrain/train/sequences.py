"""The DPO family's forward pass: a micro-batch's chosen and rejected (and KTO's mismatched) sequences packed
into rows, and each sequence's summed response log-prob from one pass over them (:class:`SequenceLogps`).

Our own code: packing pairs without padding between them, and running each sequence alone on CPU
(sharing a pair's prompt), is where DPO's speed on a CPU comes from.
"""

from __future__ import annotations

import numpy as np
import torch

from posttrain.data.cache import TokenizedData
from posttrain.data.chat import IGNORE
from posttrain.data.packing import Batch, best_fit_decreasing, collate_packed
from posttrain.train.losses import token_logps

SHAPE_QUANTUM = 32  # SequenceLogps(one_by_one=True) pads each sequence to a multiple of this many tokens


class SequenceLogps(torch.nn.Module):
    """(summed log-prob, scored-token count) of each sequence's response; the module DDP wraps.

    Takes a packed batch: ``example_ids`` [R,T] says which sequence each position belongs to (-1 for
    padding) and ``spans[j]`` = (row, start, end) where sequence j lies; the result has one entry per
    sequence, in ``spans``' order.

    ``one_by_one`` runs the decoder on each sequence alone instead of on the rows (the default on CPU).
    On CPU, scaled-dot-product attention costs rows × width² whatever the mask (causal or
    block-diagonal: fully masked blocks are still computed), so a 512-wide row holding two 256-token
    sequences costs twice what the two cost apart, and matmuls need no big batch to run at full speed:
    on the DPO benchmark's data, forward+backward took 8% (bf16) to 14% (fp32) less CPU time this way,
    4 pairs per pass. A pair's chosen and rejected sequences start with the same prompt: it runs once, and
    both responses run on its keys and values (:meth:`_one_by_one`). Each sequence run alone, and each
    group's responses, are right-padded to a multiple of ``SHAPE_QUANTUM`` tokens (causal
    attention: the padding changes nothing before it) because bf16 matmuls on CPU go through oneDNN,
    which keeps compiled kernels for every shape it meets: with exact lengths, resident memory grew by
    ~6 MB per new length, 1.3 GB to 2.1 GB over one epoch. On GPUs one call over the rows keeps them busy.
    """

    def __init__(self, model: torch.nn.Module, one_by_one: bool = False):
        from posttrain.models.load import plain_cache

        super().__init__()
        self.model = model
        self.one_by_one = one_by_one
        self.plain_cache = one_by_one and plain_cache(model.config)  # whether _one_by_one may share prompts

    def forward(self, input_ids, position_ids, attention_mask, target_ids, example_ids, spans: list[tuple[int, int, int]]):
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        if self.one_by_one:
            if attention_mask is not None:
                raise ValueError("one_by_one takes packed rows (no attention mask)")
            # Each sequence's hidden states (padding cut off again), end to end in one row: the LM head
            # then runs once for the whole batch.
            pieces = self._one_by_one(decoder, input_ids, target_ids, spans)
            hidden = torch.cat(pieces, dim=1)
            target_ids = torch.cat([target_ids[row, start:end] for row, start, end in spans])[None]
            example_ids = torch.cat([torch.full((end - start,), j, device=hidden.device) for j, (_, start, end) in enumerate(spans)])[None]
        else:
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)[0]
        per_token = token_logps(hidden, target_ids, head)  # 0 where not scored
        where = example_ids.clamp(min=0).flatten()  # padding adds its 0 to sequence 0
        sums = per_token.new_zeros(len(spans)).index_add(0, where, per_token.flatten())
        counts = torch.zeros(len(spans), dtype=torch.long, device=where.device).index_add(0, where, (target_ids != IGNORE).flatten().long())
        return sums, counts

    def _one_by_one(self, decoder: torch.nn.Module, input_ids, target_ids, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Hidden states [1, n, H] of each span, each sequence run alone; a prompt its sequences share runs once.

        Sequences whose tokens agree up to their first scored position (a pair's chosen and rejected
        responses after their prompt; KTO's mismatched sequence too) form a group: the decoder runs that
        prefix once, keeping its keys and values, then every member's continuation in one call on top of
        them (gradients reach the prefix through the cache). What it saves is the prompt's share of the
        compute, less on a CPU where the prompts are short: the shorter runs use its matmuls less well (the
        demo's pairs, whose prompts are short, gain little). Not under gradient
        checkpointing, which runs the decoder without a cache, nor for caches other than plain attention
        layers (sliding windows). A shared prompt runs at its exact length (padding it would put the
        padding inside the cache).
        """
        from transformers import DynamicCache

        from posttrain.models.load import cache_kwarg

        share = self.plain_cache and not (decoder.training and getattr(decoder, "gradient_checkpointing", False))
        groups: dict[tuple[int, ...], list[int]] = {}
        prefix_of: list[int] = []
        for j, (row, start, end) in enumerate(spans):
            scored = (target_ids[row, start:end] != IGNORE).nonzero()
            p = int(scored[0]) + 1 if len(scored) else end - start  # the hidden state at p - 1 predicts the first scored token
            prefix_of.append(p)
            key = (p, *input_ids[row, start : start + p].tolist()) if share else (j,)
            groups.setdefault(key, []).append(j)
        pieces: list[torch.Tensor | None] = [None] * len(spans)
        for members in groups.values():
            if len(members) == 1:
                row, start, end = spans[members[0]]
                n = end - start
                width = -(-n // SHAPE_QUANTUM) * SHAPE_QUANTUM
                ids = torch.nn.functional.pad(input_ids[row, start:end], (0, width - n))[None]
                positions = torch.arange(width, device=ids.device)[None]
                pieces[members[0]] = decoder(input_ids=ids, position_ids=positions, use_cache=False)[0][:, :n]
                continue
            row, start, _ = spans[members[0]]
            p = prefix_of[members[0]]
            cache = DynamicCache(config=decoder.config)
            ids = input_ids[row, start : start + p][None]
            shared = decoder(input_ids=ids, position_ids=torch.arange(p, device=ids.device)[None], use_cache=True, **{cache_kwarg(decoder): cache})[0]
            rest = [spans[j][2] - spans[j][1] - p for j in members]
            width = -(-max(rest) // SHAPE_QUANTUM) * SHAPE_QUANTUM
            after = shared
            if width:
                ids = torch.stack([torch.nn.functional.pad(input_ids[r, s + p : e], (0, width - (e - s - p))) for r, s, e in (spans[j] for j in members)])
                positions = torch.arange(p, p + width, device=ids.device).expand(len(members), -1)
                expanded = DynamicCache(config=decoder.config)
                for layer, cached in enumerate(cache.layers):
                    expanded.update(cached.keys.expand(len(members), -1, -1, -1), cached.values.expand(len(members), -1, -1, -1), layer)
                after = decoder(input_ids=ids, position_ids=positions, use_cache=True, **{cache_kwarg(decoder): expanded})[0]
            for k, j in enumerate(members):
                pieces[j] = torch.cat([shared, after[k : k + 1, : rest[k]]], dim=1) if rest[k] else shared
        return pieces  # type: ignore[return-value]


def pack(examples: list[dict], pad_id: int) -> Batch:
    """The sequences packed into rows as wide as the longest (best fit, longest first): no padding between them.

    Each position attends only within its own sequence (position ids restart at 0 and the model gets no
    attention mask; see :mod:`posttrain.data.packing`). ``segments[k].index`` is the sequence's place in
    ``examples``.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    return collate_packed(examples, best_fit_decreasing(lengths, max(lengths)), pad_id)


def example_ids(batch: Batch) -> torch.Tensor:
    """[R,T]: the place in the packed list of the sequence each position belongs to; -1 for padding."""
    ids = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
    for s in batch.segments:
        ids[s.row, s.start : s.end] = s.index
    return ids


def run_logps(module: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts) of every sequence of a packed batch, in the order they were packed (``segments[k].index``)."""
    b = batch.to(device)
    spans = [(s.row, s.start, s.end) for s in sorted(batch.segments, key=lambda s: s.index)]
    return module(b.input_ids, b.position_ids, b.attention_mask, b.target_ids, example_ids(batch).to(device), spans)


def pair_examples(data: TokenizedData, pairs: list[int], mismatched: bool = False) -> list[dict]:
    """``[chosen of each pair..., rejected of each pair...]`` (pair i is examples 2i and 2i+1).

    With ``mismatched`` (KTO), a third block: pair i's prompt followed by pair (i+1)'s chosen response,
    spliced at the token level where the response starts. The partner is fixed (i+1 modulo the number of
    pairs), not drawn per batch, so the reference log-probs of these rows can be precomputed too.
    """
    chosen = [data[2 * i] for i in pairs]
    rejected = [data[2 * i + 1] for i in pairs]
    extra = [splice(data[2 * i], data[2 * ((i + 1) % (len(data) // 2))]) for i in pairs] if mismatched else []
    return chosen + rejected + extra


def pair_batch(data: TokenizedData, pairs: list[int], pad_id: int, mismatched: bool = False) -> Batch:
    """The pairs' sequences (:func:`pair_examples`' order) packed into rows for one forward pass."""
    return pack(pair_examples(data, pairs, mismatched), pad_id)


def splice(prompt_of: dict, response_of: dict) -> dict:
    """``prompt_of``'s tokens before its first scored token, then ``response_of``'s tokens from its first scored one."""
    a = int(np.flatnonzero(np.asarray(prompt_of["labels"]) != IGNORE)[0])
    b = int(np.flatnonzero(np.asarray(response_of["labels"]) != IGNORE)[0])
    return {
        "input_ids": np.concatenate([np.asarray(prompt_of["input_ids"][:a]), np.asarray(response_of["input_ids"][b:])]),
        "labels": np.concatenate([np.full(a, IGNORE), np.asarray(response_of["labels"][b:])]),
    }
