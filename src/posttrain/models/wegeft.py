"""WeGeFT (Savadikar et al., ICML 2025): weight-generative fine-tuning, one small pair of matrices per module type.

For a frozen linear layer ``W`` (d_out x d_in), WeGeFT learns ``ΔW = (α/r)·W·φᵀψ`` with ``φ, ψ ∈ R^{r×d_in}``:
the update is generated from the pretrained weight itself. One (φ, ψ) pair serves every layer's module
of a type (all ``q_proj`` share one pair, all ``v_proj`` another, ...), so the trainable parameters are
``Σ over module types of 2·r·d_in``, independent of depth: for SmolLM2-135M at r = 64 (7 types), 0.64M
against LoRA r16's 4.88M (13%). φ starts at zero and ψ Kaiming-uniform, so training starts from the base model.

The forward never builds a d_out x d_in matrix: ``y = Wx + (α/r)·(Wφᵀ)(ψx)``, where ``Wφᵀ`` (d_out x r)
is one matmul per layer and forward, not per token. Merging writes ``W + (α/r)·Wφᵀψ`` into each layer.

Our own code: WeGeFT is not in peft (its authors forked peft to add it, and peft's method registry takes
only its own method names). :class:`WeGeFTModel` offers the parts of a peft model that posttrain's
training, saving and merging use (``get_base_model``, ``disable_adapter``, ``save_pretrained``,
``merge_and_unload``); its directory is ``adapter_config.json`` (``"posttrain_adapter": "wegeft"``, the
base model, r, α, targets) and ``adapter_model.safetensors`` (one φ and ψ per module type).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

KIND = "wegeft"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class WeGeFTPair(nn.Module):
    """The shared pair of one module type: ``phi`` (zeros) and ``psi`` (Kaiming-uniform), both r x d_in."""

    def __init__(self, r: int, d_in: int, dtype: torch.dtype = torch.float32, device: Any = None):
        super().__init__()
        self.phi = nn.Parameter(torch.zeros(r, d_in, dtype=dtype, device=device))
        self.psi = nn.Parameter(torch.empty(r, d_in, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.psi, a=math.sqrt(5))  # as nn.Linear initialises its weight, and LoRA its A


class WeGeFTLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the update its module type's pair generates from its weight.

    The pair is shared: it is registered on :class:`WeGeFTModel`, not here (so it is one parameter, counted
    and saved once, and every layer's gradient adds into it)."""

    def __init__(self, base: nn.Linear, pair: WeGeFTPair, scale: float, switch: dict[str, bool]):
        super().__init__()
        self.base_layer = base
        self.scale = scale
        self.__dict__["pair"] = pair  # not a submodule: see the class docstring
        self.__dict__["switch"] = switch  # {"enabled": bool}, one dict for the whole model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.switch["enabled"]:
            return y
        w = self.base_layer.weight
        phi, psi = self.pair.phi.to(w.dtype), self.pair.psi.to(w.dtype)
        generated = w @ phi.T  # (d_out, r): once per forward, not per token
        return y + self.scale * nn.functional.linear(nn.functional.linear(x.to(w.dtype), psi), generated)

    def delta(self) -> torch.Tensor:
        """``ΔW = scale·Wφᵀψ`` (d_out x d_in), for merging."""
        w = self.base_layer.weight.float()
        return self.scale * (w @ self.pair.phi.float().T) @ self.pair.psi.float()


def target_names(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The module types to adapt: ``targets`` as given, or every linear layer's last name but the output head."""
    if targets != "all-linear":
        return list(targets)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    return sorted(names)


class WeGeFTModel(nn.Module):
    """A transformers causal LM with WeGeFT on its ``targets`` linear layers; only the pairs train."""

    def __init__(self, model: nn.Module, *, r: int = 64, alpha: float = 128.0, targets: list[str] | str = "all-linear"):
        super().__init__()
        self.base_model = model
        self.r, self.alpha = r, float(alpha)
        self.targets = target_names(model, targets)
        self.switch = {"enabled": True}
        self.pairs = nn.ModuleDict()
        if any(isinstance(m, WeGeFTLinear) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} already has WeGeFT layers")
        chosen = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in self.targets and isinstance(m, nn.Linear)]
        found: dict[str, int] = {}
        for name, _ in chosen:
            found[name.rsplit(".", 1)[-1]] = found.get(name.rsplit(".", 1)[-1], 0) + 1
        missing = [t for t in self.targets if t not in found]
        if missing:  # checked before any layer is replaced, so a refused model is left as it was
            raise ValueError(f"WeGeFT target modules {missing} are not linear layers of {type(model).__name__}")
        widths = {}
        for name, module in chosen:
            kind = name.rsplit(".", 1)[-1]
            if widths.setdefault(kind, module.in_features) != module.in_features:
                raise ValueError(f"WeGeFT shares one pair per module type, but {name} takes {module.in_features} inputs and another {kind} {widths[kind]}")
        for name, module in chosen:
            kind = name.rsplit(".", 1)[-1]
            if kind not in self.pairs:
                self.pairs[kind] = WeGeFTPair(r, module.in_features, module.weight.dtype, module.weight.device)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, kind, WeGeFTLinear(module, self.pairs[kind], self.alpha / r, self.switch))
        self.counts = found
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("pairs."))

    # -- what posttrain uses of a peft model ------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not set yet (inside __init__): no base to ask
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The base model's forward within the block (DPO's and GRPO's reference, without a second copy)."""
        was = self.switch["enabled"]
        self.switch["enabled"] = False
        try:
            yield
        finally:
            self.switch["enabled"] = was

    def adapter_config(self) -> dict[str, Any]:
        return {
            "posttrain_adapter": KIND,
            "base_model_name_or_path": getattr(self.base_model.config, "_name_or_path", None),
            "r": self.r,
            "alpha": self.alpha,
            "target_modules": self.targets,
        }

    def save_pretrained(self, out: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **_: Any) -> None:
        """``adapter_config.json`` and the pairs (``state_dict``: gathered weights, as :func:`save_final` passes under FSDP)."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        source = state_dict if state_dict is not None else dict(self.named_parameters())
        tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in source.items() if k.startswith("pairs.")}
        save_file(tensors, str(out / WEIGHTS_NAME))
        (out / CONFIG_NAME).write_text(json.dumps(self.adapter_config(), indent=1) + "\n")

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.pairs.parameters())

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """The base model with each update written into its weight and the plain linear layers back."""
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, WeGeFTLinear):
                base = module.base_layer
                base.weight.add_(module.delta().to(base.weight.dtype))
                parent = self.base_model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.base_model
                setattr(parent, name.rsplit(".", 1)[-1], base)
        return self.base_model


def is_wegeft_dir(path: str | Path) -> bool:
    config = Path(path) / CONFIG_NAME
    return config.is_file() and json.loads(config.read_text()).get("posttrain_adapter") == KIND


def load_wegeft(model: nn.Module, adapter_dir: str | Path) -> WeGeFTModel:
    """``model`` (the base) with the WeGeFT adapter saved in ``adapter_dir``."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    wrapped = WeGeFTModel(model, r=config["r"], alpha=config["alpha"], targets=config["target_modules"])
    weights = load_file(str(adapter_dir / WEIGHTS_NAME))
    missing = sorted({n for n, _ in wrapped.pairs.named_parameters(prefix="pairs")} - set(weights))
    if missing:
        raise ValueError(f"{adapter_dir / WEIGHTS_NAME}: no weights for {missing}")
    with torch.no_grad():
        for name, p in wrapped.pairs.named_parameters(prefix="pairs"):
            p.copy_(weights[name].to(p.dtype))
    return wrapped
