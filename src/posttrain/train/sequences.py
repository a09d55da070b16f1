"""The DPO family's forward pass: a micro-batch's chosen and rejected (and KTO's mismatched) sequences packed
into rows, and each sequence's summed response log-prob from one pass over them (:class:`SequenceLogps`).

Our own code: packing pairs without padding between them, and on CPU one row per pass in which a
pair's prompt runs once, is where DPO's speed on a CPU comes from.
"""

from __future__ import annotations

import numpy as np
import torch

from posttrain.data.cache import TokenizedData
from posttrain.data.chat import IGNORE
from posttrain.data.packing import Batch, best_fit_decreasing, collate_packed
from posttrain.train.losses import token_logps

SHAPE_QUANTUM = 32  # SequenceLogps(one_row=True) pads its row to a multiple of this many tokens


class SequenceLogps(torch.nn.Module):
    """(summed log-prob, scored-token count) of each sequence's response; the module DDP wraps.

    Takes a packed batch: ``example_ids`` [R,T] says which sequence each position belongs to (-1 for
    padding) and ``spans[j]`` = (row, start, end) where sequence j lies; the result has one entry per
    sequence, in ``spans``' order.

    ``one_row`` (the default on CPU) lays the sequences out again in a single row and runs the decoder
    once over it, with :mod:`posttrain.train.packed_attention`'s attention: each sequence attends only to
    itself (the work is Σ nᵢ², not rows × width²), and a pair's chosen and rejected sequences, which start
    with the same prompt, run that prompt once: the rejected one is placed as its response alone, with
    positions that continue the prompt, and attends to the chosen sequence's prompt tokens. One call over
    one row keeps the matmuls as tall as the batch, without the rows' padding (the batch's rows are as
    wide as its longest sequence, so short sequences leave much of them empty). Measured on the demo's
    pairs (SmolLM2-135M, LoRA, 4 pairs a pass, fp32, 2-core CPU without bf16): see docs/PERFORMANCE.md
    (``benchmarks/dpo_rows.py``). The row is right-padded to a multiple of ``SHAPE_QUANTUM`` tokens
    because bf16 matmuls on CPU go through oneDNN, which keeps compiled kernels for every shape it meets
    (with exact lengths resident memory grew by ~6 MB per new length). Models whose attention is not
    plain causal self-attention in every layer (sliding windows, softcapping), and training under
    gradient checkpointing, run the rows as given, as on GPUs, where one call over the rows keeps them busy.
    """

    def __init__(self, model: torch.nn.Module, one_row: bool = False):
        from posttrain.train.packed_attention import supported

        super().__init__()
        self.model = model
        self.one_row = one_row and supported(model)

    def forward(self, input_ids, position_ids, attention_mask, target_ids, example_ids, spans: list[tuple[int, int, int]]):
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        # Gradient checkpointing recomputes the layers in the backward, after _one_row has given the model
        # its own attention back: those passes run the rows as given.
        if self.one_row and not (decoder.training and getattr(decoder, "gradient_checkpointing", False)):
            if attention_mask is not None:
                raise ValueError("one_row takes packed rows (no attention mask)")
            hidden = self._one_row(decoder, input_ids, target_ids, spans)  # every span end to end: the LM head runs once
            target_ids = torch.cat([target_ids[row, start:end] for row, start, end in spans])[None]
            example_ids = torch.cat([torch.full((end - start,), j, device=hidden.device) for j, (_, start, end) in enumerate(spans)])[None]
        else:
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)[0]
        per_token = token_logps(hidden, target_ids, head)  # 0 where not scored
        where = example_ids.clamp(min=0).flatten()  # padding adds its 0 to sequence 0
        sums = per_token.new_zeros(len(spans)).index_add(0, where, per_token.flatten())
        counts = torch.zeros(len(spans), dtype=torch.long, device=where.device).index_add(0, where, (target_ids != IGNORE).flatten().long())
        return sums, counts

    def _one_row(self, decoder: torch.nn.Module, input_ids, target_ids, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        """Hidden states [1, Σn, H] of the spans end to end, from one decoder call over one row (:func:`shared_row`)."""
        from posttrain.train.packed_attention import packed_attention

        ids, positions, index = shared_row(input_ids, target_ids, spans)
        with packed_attention(self.model):
            hidden = decoder(input_ids=ids[None], position_ids=positions[None], use_cache=False)[0]
        return hidden[:, index]


def shared_row(
    input_ids: torch.Tensor, target_ids: torch.Tensor, spans: list[tuple[int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, positions, index): the spans' sequences in one row, a prompt they share once; ``row[index]`` is every span end to end.

    Sequences whose tokens agree up to their first scored position (a pair's chosen and rejected
    responses after their prompt; KTO's mismatched sequence too) form a group: the first member is
    placed whole, each other member only from there on, with positions continuing the prompt (what
    :func:`posttrain.train.packed_attention.runs` reads as a continuation of the group's prompt). The
    row is right-padded to a multiple of ``SHAPE_QUANTUM`` with a run of its own. ``index`` maps each
    span's positions to the row: a continuing member's prompt positions are its group's first member's.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    shared: list[int] = []
    for j, (row, start, end) in enumerate(spans):
        scored = (target_ids[row, start:end] != IGNORE).nonzero()
        p = int(scored[0]) + 1 if len(scored) else end - start  # the hidden state at p - 1 predicts the first scored token
        shared.append(p)
        key = (p, *input_ids[row, start : start + p].tolist()) if p < end - start else (-1 - j,)
        groups.setdefault(key, []).append(j)
    pieces, placed, at = [], {}, 0
    for members in groups.values():
        for k, j in enumerate(members):
            row, start, end = spans[j]
            lo = shared[j] if k else 0
            pieces.append((input_ids[row, start + lo : end], torch.arange(lo, end - start)))
            placed[j] = (at, members[0], lo)
            at += end - start - lo
    width = -(-at // SHAPE_QUANTUM) * SHAPE_QUANTUM
    ids = torch.cat([t for t, _ in pieces] + [input_ids.new_zeros(width - at)])
    positions = torch.cat([q for _, q in pieces] + [torch.arange(width - at)]).to(ids.device)
    index = []
    for j, (_, start, end) in enumerate(spans):
        offset, first, lo = placed[j]
        own = torch.arange(offset, offset + end - start - lo)
        index.append(torch.cat([torch.arange(placed[first][0], placed[first][0] + lo), own]) if lo else own)
    return ids, positions, torch.cat(index).to(ids.device)


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
