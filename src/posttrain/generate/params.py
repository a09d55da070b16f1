"""What a generation call asks for and what it gives back: :class:`SamplingParams` and :class:`Completion`.

Shared by every backend (the in-process :class:`~posttrain.generate.engine.Engine`, vLLM, an
OpenAI-compatible endpoint) and by the server, so a request means the same thing wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "eos"]
MAX_TOP_LOGPROBS = 20  # OpenAI's own limit for top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. Validated on construction, every problem listed at once.

    ``temperature`` 0 is greedy. ``top_k`` 0 and ``top_p`` 1 switch those filters off. ``n`` samples per
    prompt. ``stop``: strings that end a completion (cut from its text); ``stop_token_ids``: token ids
    that do. ``bf16``: run the forwards in bf16 (the fast path on CPUs with bf16 matmul); float32 weights
    are cast for the call and restored exactly afterwards. ``logprobs``: also return each generated
    token's log-probability under the model itself (:attr:`Completion.logprobs`); ``top_logprobs``: also
    the ``top_logprobs`` most likely tokens at each position with theirs (:attr:`Completion.top_logprobs`).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    bf16: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        # accept lists (and a lone string) from callers and configs, store tuples so params stay hashable
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 is greedy), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 is off), not {self.top_k}")
        if self.n < 1:
            problems.append(f"n must be at least 1, not {self.n}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            problems.append(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], not {self.top_logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop must be non-empty strings, not {list(self.stop)!r}")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def scores(self) -> bool:
        """Whether log-probabilities are wanted (``logprobs`` or ``top_logprobs``)."""
        return self.logprobs or self.top_logprobs > 0


@dataclass
class Completion:
    """One generated continuation of one prompt.

    ``text``: the decoded new tokens, special tokens skipped, cut before a stop string, without the end or
    stop token. ``token_ids``: every generated token (the final end/stop token included).
    ``num_tokens == len(token_ids)``. ``prompt_token_ids``: the prompt as the model saw it.
    ``logprobs`` (when asked for): the log-probability of each of ``token_ids`` under the model's own
    distribution, as a forward pass over prompt and completion scores it (temperature 1, no top-k or
    top-p: what a DPO reference model measures), whatever temperature the tokens were drawn at.
    ``top_logprobs`` (when asked for): at each position, the most likely ``(token id, log-prob)`` pairs
    on the same scale, most likely first.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    num_tokens: int
    prompt_token_ids: list[int] = field(repr=False)
    logprobs: list[float] | None = field(default=None, repr=False)
    top_logprobs: list[list[tuple[int, float]]] | None = field(default=None, repr=False)
