"""Activation steering for instructions (Stolfo et al., ICLR 2025): fit a direction per instruction type and layer, apply it with hooks.

Fitting: each prompt is run twice through the chat template, with its instruction and without it (the
query alone). At the last input token, the residual stream after every decoder layer is captured; per
layer, the mean over prompts of (with - without) is the instruction's direction. Stored per type and
layer: the unit direction ``u``, the norm of the mean difference, and ``c̄``, the mean projection of the
with-instruction activations on ``u`` (what ``adjust`` sets the projection to).

Applying: :class:`~posttrain.generate.intervene.Steering` (``add``: ``h + w·u``; ``adjust``: the
projection on ``u`` set to ``w·c̄``, ``w = 1`` being Stolfo's), at every position, through the engine's
hooks or its fast decoder. Our own code: the fit is a mean over captured activations; the steering
libraries (repeng, steering-vectors) have neither ``adjust`` nor a chat-template-aware fit.

File format: one safetensors file; tensors ``{type}.u`` ([layers, d]), ``{type}.norm`` and ``{type}.c``
([layers]); metadata ``posttrain.steer`` holds JSON: the model, the chosen layer and weight per type, the
chosen InstABoost factor, and what the choices measured (``report``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.generate.intervene import Mode, Steering
from posttrain.models.load import decoder_layers


@dataclass
class Direction:
    """One instruction type's directions at every layer (rows are layers)."""

    u: torch.Tensor  # [layers, d], unit rows
    norm: torch.Tensor  # [layers], the norm of the mean difference
    c: torch.Tensor  # [layers], mean projection of the with-instruction activations on u
    layer: int | None = None  # the chosen layer (None until chosen)
    weight: float = 1.0  # the chosen weight for ``add`` (in units of the mean difference's norm)


@dataclass
class SteeringSet:
    """Directions per instruction type for one model."""

    model: str
    directions: dict[str, Direction] = field(default_factory=dict)
    boost: float = 1.0  # the InstABoost factor m chosen on validation prompts (1: none chosen)
    report: dict[str, Any] = field(default_factory=dict)  # what the fit measured (layers tried, fluency bounds)
    source: str = ""  # the file it was loaded from: names its steerings (two files' types never batch together)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors, meta = {}, {}
        for name, d in self.directions.items():
            # copies: two types may hold one tensor, which safetensors refuses to write twice
            tensors[f"{name}.u"] = d.u.detach().float().clone().contiguous()
            tensors[f"{name}.norm"] = d.norm.detach().float().clone().contiguous()
            tensors[f"{name}.c"] = d.c.detach().float().clone().contiguous()
            meta[name] = {"layer": d.layer, "weight": d.weight}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        meta_all = {"model": self.model, "types": meta, "boost": self.boost, "report": self.report}
        save_file(tensors, str(path), metadata={"posttrain.steer": json.dumps(meta_all)})

    @classmethod
    def load(cls, path: str | Path) -> SteeringSet:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such steering file (make one with `posttrain steer fit`)")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("posttrain.steer")
            if raw is None:
                raise ValueError(f"{path}: not a posttrain steering file (no 'posttrain.steer' metadata)")
            meta = json.loads(raw)
            directions = {
                name: Direction(f.get_tensor(f"{name}.u"), f.get_tensor(f"{name}.norm"), f.get_tensor(f"{name}.c"), m["layer"], m["weight"])
                for name, m in meta["types"].items()
            }
        return cls(meta["model"], directions, float(meta.get("boost", 1.0)), meta.get("report", {}), str(path.resolve()))

    def steering(self, name: str, *, mode: Mode = "add", weight: float | None = None, layer: int | None = None) -> Steering:
        """The steering of type ``name`` at its chosen layer (or ``layer``); ``add``'s weight defaults to the chosen one."""
        if name not in self.directions:
            raise KeyError(f"no direction for instruction type {name!r}; the file has {sorted(self.directions)}")
        d = self.directions[name]
        layer = d.layer if layer is None else layer
        if layer is None:
            raise ValueError(f"{name}: no layer chosen in the file; pass one")
        if mode == "add":
            w = d.weight if weight is None else weight
            return Steering(layer, d.u[layer], "add", float(w) * float(d.norm[layer]), self._key(name, layer))
        return Steering(layer, d.u[layer], "adjust", float(d.c[layer]) * (1.0 if weight is None else float(weight)), self._key(name, layer))

    def _key(self, name: str, layer: int) -> str:
        return f"{self.source or id(self)}:{name}:{layer}"


@torch.no_grad()
def last_token_residuals(model: Any, token_ids: Sequence[Sequence[int]], *, batch_size: int = 16, pad_id: int = 0) -> torch.Tensor:
    """The residual stream after every decoder layer at each prompt's last token: [prompts, layers, d], fp32.

    Prompts are left-padded so the last token is the last position of every row, with positions counted
    from each prompt's first token."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def capture(_module: Any, _inputs: Any, output: Any) -> None:
        h = output[0] if isinstance(output, tuple) else output
        captured.append(h[:, -1].float().cpu())

    out = []
    handles = [layer.register_forward_hook(capture) for layer in layers]
    try:
        for start in range(0, len(token_ids), batch_size):
            chunk = token_ids[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.tensor([[pad_id] * (width - len(x)) + list(x) for x in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # a padded prompt is embedded as it would be alone
            captured.clear()
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            out.append(torch.stack(captured, dim=1))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(out)


def direction(with_instruction: torch.Tensor, without: torch.Tensor) -> Direction:
    """The direction from paired residuals ([prompts, layers, d] each): mean difference, its norm, and c̄."""
    diff = (with_instruction - without).mean(dim=0)
    norm = diff.norm(dim=-1)
    u = diff / norm.clamp_min(1e-12).unsqueeze(-1)
    c = torch.einsum("pld,ld->pl", with_instruction, u).mean(dim=0)
    return Direction(u, norm, c)
