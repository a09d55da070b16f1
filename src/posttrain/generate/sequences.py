"""The sequences the decode loop works on, and where it takes them from.

A :class:`DecodeSequence` is one (prompt, sample) being generated, with everything that may differ
between the rows of one batch: its sampling parameters, stops, adapter and random stream. A
:class:`Feed` gives the loop its sequences: a fixed list for :meth:`Engine.generate
<posttrain.generate.engine.Engine.generate>`, the server's queue for :mod:`posttrain.generate.scheduler`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from posttrain.generate.params import FinishReason, SamplingParams
from posttrain.generate.prompts import sample_seed


class Stops(NamedTuple):
    """What ends a sequence besides the end tokens: stop strings matched in the text, and stop token ids."""

    texts: tuple[str, ...] = ()
    ids: frozenset[int] = frozenset()


@dataclass(eq=False)
class DecodeSequence:
    """One sequence being generated: a (prompt, sample) with its own parameters, stops, adapter and random stream.

    ``listener`` (the server's streaming) is called after each token is appended; ``cancelled`` (set from
    another thread when a client goes away) ends the sequence at the next step, as if it had reached its
    length limit, and frees its row.
    """

    prompt: int  # index into the caller's prompts (or the server's request id)
    sample: int
    prompt_ids: list[int]
    seed: int
    params: SamplingParams
    stops: Stops = Stops()
    adapter: int = 0  # 0: the base model; i: the engine's adapters[i - 1]
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: FinishReason | None = None
    cut: int | None = None  # where a stop string starts in the decoded text
    listener: Callable[[DecodeSequence], None] | None = None
    cancelled: bool = False

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.tokens)


class Feed(Protocol):
    """Where the decode loop takes its sequences from: a fixed list (:meth:`Engine.generate`) or the server's queue."""

    def waiting(self) -> bool:
        """Whether :meth:`take` would return something now."""
        ...

    def take(self, k: int) -> list[DecodeSequence]:
        """Up to ``k`` waiting sequences, all of one adapter."""
        ...


class ListFeed:
    """The sequences of one call, in order (longest prompt first, as :func:`plan` sorts them)."""

    def __init__(self, seqs: list[DecodeSequence]):
        self.seqs, self.next = seqs, 0

    def waiting(self) -> bool:
        return self.next < len(self.seqs)

    def take(self, k: int) -> list[DecodeSequence]:
        batch = self.seqs[self.next : self.next + k]
        self.next += len(batch)
        return batch


def plan(prompt_ids: list[list[int]], params: SamplingParams, stops: Stops, adapter: int = 0) -> list[DecodeSequence]:
    """Every (prompt, sample) as a sequence, longest prompt first (stable: a prompt's samples stay together)."""
    copies: dict[tuple[int, ...], int] = {}
    seqs = []
    for i, ids in enumerate(prompt_ids):
        key = tuple(ids)
        copy = copies.get(key, 0)
        copies[key] = copy + 1
        seqs += [DecodeSequence(i, j, ids, sample_seed(params.seed, ids, copy, j), params, stops, adapter) for j in range(params.n)]
    return sorted(seqs, key=lambda s: -len(s.prompt_ids))
