"""The sequences the decode loop works on, and where it takes them from.

A :class:`DecodeSequence` is one (prompt, sample) being generated, with everything that may differ
between the rows of one batch: its sampling parameters, stops, adapter and random stream. A
:class:`Feed` gives the loop its sequences: a fixed list for :meth:`Engine.generate
<posttrain.generate.engine.Engine.generate>`, the server's queue for :mod:`posttrain.generate.scheduler`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from posttrain.generate.intervene import Intervention
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
    intervention: Intervention | None = None  # steering and InstABoost (None: the model as it is)
    instruction: tuple[int, int] | None = None  # the instruction's tokens in prompt_ids, for InstABoost
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: FinishReason | None = None
    cut: int | None = None  # where a stop string starts in the decoded text
    listener: Callable[[DecodeSequence], None] | None = None
    cancelled: bool = False

    @property
    def group(self) -> tuple[int, Intervention | None]:
        """What a prefill batch must share: the adapter and the intervention (their forwards differ)."""
        return self.adapter, self.intervention

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.tokens)


class Feed(Protocol):
    """Where the decode loop takes its sequences from: a fixed list (:meth:`Engine.generate`) or the server's queue."""

    def waiting(self) -> bool:
        """Whether :meth:`take` would return something now."""
        ...

    def take(self, k: int) -> list[DecodeSequence]:
        """Up to ``k`` waiting sequences, all of one :attr:`DecodeSequence.group` (adapter and intervention)."""
        ...


class ListFeed:
    """The sequences of one call, in order (longest prompt first, as :func:`plan` sorts them).

    A take holds one group (adapter and intervention): the group of the first sequence waiting, and
    that group's next sequences in order."""

    def __init__(self, seqs: list[DecodeSequence]):
        self.queues: dict[tuple, deque[tuple[int, DecodeSequence]]] = {}
        for i, s in enumerate(seqs):
            self.queues.setdefault(s.group, deque()).append((i, s))

    def waiting(self) -> bool:
        return any(self.queues.values())

    def take(self, k: int) -> list[DecodeSequence]:
        waiting = [q for q in self.queues.values() if q]
        if not waiting:
            return []
        queue = min(waiting, key=lambda q: q[0][0])
        return [queue.popleft()[1] for _ in range(min(k, len(queue)))]


def plan(
    prompt_ids: list[list[int]],
    params: SamplingParams,
    stops: Stops,
    adapter: int = 0,
    interventions: list[Intervention | None] | None = None,
    spans: list[tuple[int, int] | None] | None = None,
) -> list[DecodeSequence]:
    """Every (prompt, sample) as a sequence, longest prompt first (stable: a prompt's samples stay together).

    ``interventions``: each prompt's (None: none at all); ``spans``: each prompt's instruction tokens (for
    InstABoost), or None."""
    copies: dict[tuple[int, ...], int] = {}
    seqs = []
    for i, ids in enumerate(prompt_ids):
        key = tuple(ids)
        copy = copies.get(key, 0)
        copies[key] = copy + 1
        span = spans[i] if spans else None
        intervention = interventions[i] if interventions else None
        seqs += [
            DecodeSequence(i, j, ids, sample_seed(params.seed, ids, copy, j), params, stops, adapter, intervention, span)
            for j in range(params.n)
        ]
    return sorted(seqs, key=lambda s: -len(s.prompt_ids))
