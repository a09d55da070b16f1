"""Inference-time interventions on a generation: steering a layer's output, boosting attention to the instruction.

Two ways to make a model follow an instruction better without training it, applied per request:

* **Steering** (Stolfo et al., ICLR 2025): at one decoder layer's output, at every position (prompt and
  generated tokens), ``add`` adds ``amount·u``; ``adjust`` sets the projection on ``u`` to ``amount``
  (``h + (amount - h·u)·u``). Several steerings compose, each applied in the order given. The
  directions come from :mod:`posttrain.steer`.
* **InstABoost** (Guardieiro et al., 2025): every layer and head pays ``m`` times more attention to the
  instruction's tokens, renormalised: ``log m`` added to the attention logits of those keys, which is the
  same as multiplying the post-softmax weights by ``m`` and dividing by their new sum.

The engine applies both on each of its paths, with the same arithmetic: on the transformers model,
steering is a forward hook on the decoder layer (:func:`steered`; transformers 5 layers return a tensor,
older ones a tuple) and the boost is a 4-D additive attention mask (:func:`attention_bias`), which
transformers passes to the attention as it is; in :class:`~posttrain.generate.fast.FastDecoder` the
steering edits the rows' hidden state after the same layer and the boost sits in the decoder's additive
mask over the cache's columns. Our own code: a few lines each, and what matters is that the paths agree
(tests/test_intervene.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from posttrain.models.load import decoder_layers

Mode = Literal["add", "adjust"]
MODES: tuple[str, ...] = ("add", "adjust")


@dataclass(frozen=True)
class Steering:
    """One edit of one layer's output: ``add`` adds ``amount·u``; ``adjust`` sets the projection on ``u`` to ``amount``.

    ``key`` names the direction (``file:type``) so that two steerings built from the same direction compare
    equal (the engine batches requests with equal interventions together); ``u`` itself is not compared.
    """

    layer: int
    u: torch.Tensor = field(compare=False, repr=False)
    mode: Mode = "add"
    amount: float = 0.0
    key: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"steering mode must be one of {MODES}, got {self.mode!r}")
        if self.u.dim() != 1:
            raise ValueError(f"a steering direction is one vector, got shape {tuple(self.u.shape)}")
        if not self.key:
            object.__setattr__(self, "key", f"tensor-{id(self.u)}")

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        u = self.u.to(device=h.device, dtype=h.dtype)
        if self.mode == "add":
            return h + self.amount * u
        return h + (self.amount - h @ u).unsqueeze(-1) * u


@dataclass(frozen=True)
class Intervention:
    """What one request changes in the forward: ``steerings`` (applied in order) and InstABoost's factor ``boost`` (m).

    ``boost`` 1 and no steerings is the model as it is. The boost needs each prompt's instruction marked
    (:meth:`PromptEncoder.encode_marked <posttrain.generate.prompts.PromptEncoder.encode_marked>`).
    """

    steerings: tuple[Steering, ...] = ()
    boost: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "steerings", tuple(self.steerings))
        if not (self.boost > 0 and math.isfinite(self.boost)):
            raise ValueError(f"instaboost must be a positive number (1 is off), not {self.boost}")

    @property
    def active(self) -> bool:
        return bool(self.steerings) or self.boost != 1.0

    @property
    def log_boost(self) -> float:
        return math.log(self.boost)

    def at(self, layer: int) -> list[Steering]:
        return [s for s in self.steerings if s.layer == layer]


def effective(intervention: Intervention | None) -> Intervention | None:
    """``intervention``, or None when it changes nothing (so it batches with plain requests)."""
    return intervention if intervention is not None and intervention.active else None


def _edit_output(edit: Any) -> Any:
    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    return hook


@contextmanager
def steered(model: Any, steerings: Sequence[Steering]) -> Iterator[None]:
    """Apply ``steerings`` to ``model``'s forward within the block (hooks removed on exit, also on errors)."""
    layers = decoder_layers(model)
    handles = []
    try:
        for s in steerings:
            if not 0 <= s.layer < len(layers):
                raise ValueError(f"steering layer {s.layer} is outside the model's {len(layers)} layers")
            handles.append(layers[s.layer].register_forward_hook(_edit_output(s.apply)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def boost_columns(
    width: int, spans: Sequence[tuple[int, int] | None], lengths: Sequence[int], log_boost: float, device: Any = None
) -> torch.Tensor:
    """Per row of a left-padded batch ``width`` columns wide, ``log m`` at the columns of its prompt's instruction tokens.

    ``spans[r]``: the instruction's tokens ``[start, end)`` in row ``r``'s prompt of ``lengths[r]`` tokens,
    whose last token sits in the last column (None: no instruction)."""
    boost = torch.zeros((len(lengths), width), dtype=torch.float32, device=device)
    for r, (span, n) in enumerate(zip(spans, lengths)):
        if span is not None and log_boost:
            boost[r, width - n + span[0] : width - n + span[1]] = log_boost
    return boost


def attention_bias(mask: torch.Tensor, boost: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive (rows, 1, queries, columns) attention mask for a forward over the last ``queries`` columns.

    Causal and padding positions get the dtype's lowest value (not -inf, so a padding row's softmax stays
    finite), the rest ``boost`` (0, or ``log m`` at instruction keys)."""
    columns = mask.shape[1]
    q = torch.arange(columns - queries, columns, device=mask.device)[:, None]
    k = torch.arange(columns, device=mask.device)[None, :]
    allowed = (k <= q)[None] & (mask[:, None, :] != 0)  # (rows, queries, columns)
    low = torch.finfo(dtype).min
    return torch.where(allowed, boost[:, None, :], torch.full((), low)).to(dtype)[:, None]
