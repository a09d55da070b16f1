"""An engine for a model name: vLLM when asked (or installed, with CUDA), else the in-process transformers engine."""

from __future__ import annotations

from typing import Literal

import torch

from posttrain.generate.engine import Engine
from posttrain.generate.vllm import VLLMEngine, vllm_available

Backend = Literal["auto", "transformers", "vllm"]


def load_engine(
    name: str,
    *,
    backend: Backend = "auto",
    dtype: str = "float32",
    device: str | None = None,
    batch_size: int = 32,
    template: str | None = None,
) -> Engine | VLLMEngine:
    """An engine for model ``name``: vLLM when asked, or for ``auto`` when it is installed and CUDA is up; else transformers."""
    if backend == "vllm" or (backend == "auto" and vllm_available() and torch.cuda.is_available()):
        return VLLMEngine(name, template=template, dtype=dtype)
    return Engine.from_name(name, dtype=dtype, device=device, batch_size=batch_size, template=template)
