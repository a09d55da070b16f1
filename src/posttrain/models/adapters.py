"""Adapters: full fine-tuning, LoRA / DoRA (on a 4-bit NF4 base: QLoRA) through peft, or WeGeFT (our own,
:mod:`posttrain.models.wegeft`); saving and merging.

peft does the adapter work (``LoraConfig``, ``get_peft_model``, ``prepare_model_for_kbit_training``,
``merge_and_unload``) and bitsandbytes the 4-bit base; this module only maps our config onto them and
keeps the run directory's ``final/`` loadable by plain transformers or peft.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from posttrain.config import AdapterConfig, ModelConfig


def apply_adapter(model: torch.nn.Module, cfg: AdapterConfig) -> torch.nn.Module:
    """``model`` itself for full fine-tuning; a peft model with only the adapter trainable otherwise."""
    if cfg.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.kind == "wegeft":
        from posttrain.models.wegeft import WeGeFTModel

        for p in model.parameters():
            p.requires_grad_(False)
        return WeGeFTModel(model, r=cfg.r, alpha=cfg.alpha, targets=cfg.target_modules)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantize:
        # QLoRA: the NF4 base stays frozen; peft casts the layers left in 16 bits (norms, embeddings) to
        # fp32 for stable training. Gradient checkpointing is switched on apart, when configured.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.kind == "dora",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def adds_nothing(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a peft LoRA model whose adapter adds exactly zero: every ``lora_B`` weight is 0
    (peft's initialisation, before any update), with no DoRA magnitude or other variant, which would
    re-normalise the base weights and round differently with the adapter off."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return False
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or any(getattr(m, "lora_variant", None) or len(getattr(m, "lora_magnitude_vector", ())) for m in layers):
        return False
    for m in layers:
        for b in m.lora_B.values():
            local = b.weight.to_local() if hasattr(b.weight, "to_local") else b.weight  # a DTensor's own shard under FSDP
            if bool(local.detach().any()):
                return False
    return True


@contextmanager
def base_when_exact(model: torch.nn.Module) -> Iterator[bool]:
    """Inside: ``model``'s adapter switched off where :func:`adds_nothing` (yields whether it is).

    The initial model's forward, bit for bit, without the adapter's work: LoRA's two products, its
    scaling and sum, and peft's casts of each layer's input took a fifth of a reference forward
    of SmolLM2-135M in bf16 on a CPU (DPO's reference pass, ad-hoc).
    """
    off = adds_nothing(model)
    with model.disable_adapter() if off else nullcontext():
        yield off


def enable_gradient_checkpointing(model: torch.nn.Module, adapter_kind: str) -> None:
    """Recompute activations in the backward pass; with a frozen base (LoRA/DoRA) the inputs must carry grads."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter_kind != "full":
        model.enable_input_require_grads()


def save_final(model: torch.nn.Module, tokenizer: Any, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``final/``: a model directory (full) or an adapter directory (LoRA/DoRA), with the tokenizer.

    ``state_dict``: the weights to write when the model's own are shards (FSDP: gathered on this process
    by :meth:`~posttrain.train.runtime.Runtime.gathered_state`).
    """
    out.mkdir(parents=True, exist_ok=True)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    config.use_cache = True  # off while training (packing needs it off); generation wants it on
    extra = {}
    if state_dict is not None:
        # A gathered state has a copy under every name of a tied weight (lm_head = embeddings); keep the
        # first name, as the model's own state would, so the file holds the weight once.
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        extra["state_dict"] = {k: v for k, v in state_dict.items() if k not in tied}
    model.save_pretrained(out, **extra)
    tokenizer.save_pretrained(out)


def merged_with(base: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """``base`` with the adapter saved in ``adapter_dir`` (peft's LoRA/DoRA, or WeGeFT) merged into its weights."""
    from posttrain.models.wegeft import is_wegeft_dir, load_wegeft

    if is_wegeft_dir(adapter_dir):
        return load_wegeft(base, adapter_dir).merge_and_unload()
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def merge_adapter(model_cfg: ModelConfig, adapter_dir: Path, out: Path) -> Path:
    """Base model + adapter merged into one plain transformers model directory (fp32 unless configured)."""
    from transformers import AutoTokenizer

    from posttrain.models.load import load_model

    merged = merged_with(load_model(model_cfg, torch.device("cpu")), adapter_dir)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out)
    return out
