"""Batches: padding-free packing (the default) and padded batches grouped by length.

Packing puts several examples in one row, best-fit-decreasing, and restarts ``position_ids`` at 0 at
each example. transformers 5 reads those restarts as sequence boundaries and keeps attention inside each
example (sdpa, eager, flash-attention-2) when the model gets ``attention_mask=None`` and
``use_cache=False`` — with a mask, or with the cache on, the boundaries are silently ignored.

Labels are shifted *within each example* before packing (``target_ids[t]`` is the label of token
``t+1`` of the same example), so the first token of one example is never a target of the last token
of the one before it. Rows are kept to ``max_tokens`` (e.g. 8 rows of 512 rather than one of 4,096),
which is faster on CPU. Every batch keeps each example's place, so per-example losses can be reported.

Our own code: the bin packing is a few lines, and the shift-before-pack is the detail others get wrong.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from posttrain.data.chat import IGNORE


@dataclass
class Segment:
    """Where example ``index`` sits in a batch: row ``row``, tokens ``start:end``."""

    index: int
    row: int
    start: int
    end: int


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, T]
    target_ids: torch.Tensor  # [rows, T], labels shifted within each example; IGNORE elsewhere
    position_ids: torch.Tensor  # [rows, T], restarting at 0 for each example
    attention_mask: torch.Tensor | None  # None when packed; [rows, T] when padded
    segments: list[Segment]

    @property
    def real_tokens(self) -> int:
        return sum(s.end - s.start for s in self.segments)

    @property
    def trained_tokens(self) -> int:
        return int((self.target_ids != IGNORE).sum())

    def model_inputs(self) -> dict[str, torch.Tensor | bool | None]:
        """Keyword arguments for a transformers causal LM (no labels: the loss is computed outside)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.attention_mask, "use_cache": False}

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.target_ids.to(device),
            self.position_ids.to(device),
            None if self.attention_mask is None else self.attention_mask.to(device),
            self.segments,
        )


def shift_labels(labels: Sequence[int]) -> list[int]:
    """Targets for next-token prediction inside one example: ``labels[1:] + [IGNORE]``."""
    return [*labels[1:], IGNORE]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length ≤ ``capacity``, longest first, each into the fullest bin it fits."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than max_tokens={capacity} (first: #{too_long[0]}, {lengths[too_long[0]]} tokens); set max_length to truncate or drop them")
    bins: list[list[int]] = []
    space: list[tuple[int, int]] = []  # (remaining capacity, bin id), kept sorted
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        at = bisect.bisect_left(space, (n, -1))
        if at < len(space):
            remaining, b = space.pop(at)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - n > 0:
            bisect.insort(space, (remaining - n, b))
    return bins


def collate_packed(
    examples: Sequence[dict], rows: Sequence[Sequence[int]], pad_id: int, indices: Sequence[int] | None = None, width: int | None = None
) -> Batch:
    """One batch from rows of example positions (into ``examples``); rows are right-padded to the longest, or to ``width`` if wider.

    A fixed ``width`` gives every batch the same shape (what a compiled model wants: no recompilation).
    """
    width = max(max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows), width or 0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ex = examples[i]
            n = len(ex["input_ids"])
            ids[r, at : at + n] = torch.tensor(ex["input_ids"])
            targets[r, at : at + n] = torch.tensor(shift_labels(ex["labels"]))
            positions[r, at : at + n] = torch.arange(n)
            segments.append(Segment(indices[i] if indices is not None else i, r, at, at + n))
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding is one more "example", never a target
    return Batch(ids, targets, positions, None, segments)


def collate_padded(examples: Sequence[dict], pad_id: int, indices: Sequence[int] | None = None) -> Batch:
    """One row per example, right-padded to the longest, with an attention mask."""
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    segments = []
    for r, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[r, :n] = torch.tensor(ex["input_ids"])
        targets[r, :n] = torch.tensor(shift_labels(ex["labels"]))
        mask[r, :n] = 1
        segments.append(Segment(indices[r] if indices is not None else r, r, 0, n))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, targets, positions, mask, segments)


def packed_batches(
    examples: Sequence[dict], *, max_tokens: int, rows_per_batch: int, pad_id: int, seed: int | None = 0
) -> list[Batch]:
    """Pack all examples into rows of ≤ ``max_tokens`` and group rows into batches (row order shuffled by ``seed``)."""
    rows = best_fit_decreasing([len(ex["input_ids"]) for ex in examples], max_tokens)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return [collate_packed(examples, rows[k : k + rows_per_batch], pad_id) for k in range(0, len(rows), rows_per_batch)]


def padded_batches(
    examples: Sequence[dict], *, batch_size: int, pad_id: int, group_by_length: bool = True, seed: int | None = 0
) -> Iterator[Batch]:
    """Batches of ``batch_size`` examples; with ``group_by_length``, similar lengths share a batch (less padding)."""
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    if group_by_length:
        # Sort inside windows of 50 batches: little padding, yet the batch order stays random.
        window = batch_size * 50
        order = [i for k in range(0, len(order), window) for i in sorted(order[k : k + window], key=lambda i: len(examples[i]["input_ids"]))]
    groups = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    if seed is not None and group_by_length:
        random.Random(seed + 1).shuffle(groups)
    for group in groups:
        yield collate_padded([examples[i] for i in group], pad_id, indices=group)


def per_example_loss(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, trained-token count) per example, in the order of ``batch.segments``."""
    token_loss = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), batch.target_ids.flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(batch.target_ids)
    trained = batch.target_ids != IGNORE
    sums = torch.stack([token_loss[s.row, s.start : s.end].sum() for s in batch.segments])
    counts = torch.stack([trained[s.row, s.start : s.end].sum() for s in batch.segments])
    return sums, counts
