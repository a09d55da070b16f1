"""The DPO family's sequences: a micro-batch's chosen and rejected (and KTO's mismatched) sequences, and
the batch :class:`posttrain.train.forward.Forward` scores them in (summed response log-probs).

Our own code: the token-level splice of KTO's mismatched sequences is a few lines.
"""

from __future__ import annotations

import numpy as np

from posttrain.data.cache import TokenizedData
from posttrain.data.chat import IGNORE
from posttrain.data.packing import Batch
from posttrain.train.forward import pack


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
