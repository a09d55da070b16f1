"""Resolving a model name to files, and loading tokenizers.

A name is a zoo model (``tiny-llama``), a fetched model (``smollm2-135m-instruct``, after
``posttrain models fetch``), a local directory, or a hub id (:func:`posttrain.hub.is_hub_id`); all but
the last never touch the network, and a hub id does not either when it is in the local hub cache and
``HF_HUB_OFFLINE=1``. ``revision`` and ``trust_remote_code`` reach transformers' loaders as configured.
Loading goes through transformers' Auto classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain import hub
from posttrain.models import fetch, zoo


def resolve(name: str) -> str:
    """A path or hub id that transformers can load, building zoo models on first use.

    A fetchable name that has not been fetched raises FileNotFoundError saying which command fetches it.
    """
    if name in zoo.TINY:
        return str(zoo.zoo_path(name))
    if name in fetch.FETCHABLE:
        # Never download implicitly: a fetch is ~100 MB and minutes of work, so it is an explicit step.
        if not fetch.is_fetched(name):
            raise FileNotFoundError(
                f"model {name!r} has not been fetched yet (looked in {fetch.fetched_path(name)}); "
                f"run `posttrain models fetch {name}` once to download and convert it"
            )
        return str(fetch.fetched_path(name))
    return name


def load_tokenizer(model: str | Any, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of ``model``: a name, or a ``ModelConfig`` (whose ``revision`` and ``trust_remote_code`` are used).

    A hub id that is neither in the local hub cache nor reachable raises FileNotFoundError saying so.
    """
    from transformers import AutoTokenizer

    if not isinstance(model, str):
        model, revision, trust_remote_code = model.name, model.revision, model.trust_remote_code
    path = resolve(model)
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as err:
        problem = hub.unavailable(path, revision=revision, error=err) if hub.is_hub_id(path) else None
        if problem:
            raise FileNotFoundError(f"cannot load a tokenizer: {problem}") from err
        where = "directory" if Path(path).exists() else "model (a local directory, a zoo name such as tiny-llama, or a hub id)"
        raise FileNotFoundError(f"cannot load a tokenizer from {model!r}: not a usable {where} ({err.__class__.__name__}: {str(err).splitlines()[0]})") from err


def load_model(cfg: Any, device: Any, quantize: str | None = None) -> Any:
    """A causal LM from a ``ModelConfig``: weights in ``cfg.dtype``, attention as configured, on ``device``.

    ``use_cache`` is turned off in the config: training never uses it, and with it on transformers
    ignores packed sequences' boundaries. ``quantize="4bit"`` loads the weights as bitsandbytes NF4
    (QLoRA's base: double quantization, bf16 compute) straight onto ``device``, which must be a GPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(cfg.name)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, cfg.dtype), "attn_implementation": cfg.attn_implementation}
    if getattr(cfg, "revision", None):
        kwargs["revision"] = cfg.revision
    if getattr(cfg, "trust_remote_code", False):
        kwargs["trust_remote_code"] = True
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    if quantize:
        kwargs.update(quantization_config=nf4_config(), device_map={"": torch.device(device)})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model if quantize else model.to(device)


def quantize_problem(quantize: str | None, device: Any = None) -> str | None:
    """Why ``adapter.quantize`` cannot run here (no CUDA, or no bitsandbytes), or None."""
    if not quantize:
        return None
    import importlib.util

    import torch

    if (device is not None and str(device).split(":")[0] != "cuda") or not torch.cuda.is_available():
        where = f"train.device is {device}" if device is not None and str(device).split(":")[0] != "cuda" else "this machine has no CUDA GPU"
        return (
            f"{quantize} (QLoRA) keeps the base in NF4, which runs on bitsandbytes' CUDA kernels, and {where}; "
            "leave adapter.quantize unset (plain LoRA) or run on a GPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"{quantize} (QLoRA) needs bitsandbytes: pip install 'posttrain[qlora]' (or pip install bitsandbytes)"
    return None


def nf4_config() -> Any:
    """QLoRA's quantization (Dettmers et al., 2023): 4-bit NormalFloat, double quantization, bf16 compute."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )


def cache_kwarg(module: Any) -> str:
    """The name a model's forward takes its key/value cache by: ``cache`` (transformers >= 5.24; ``past_key_values`` is deprecated there) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def plain_cache(config: Any) -> bool:
    """Whether a ``DynamicCache`` for ``config`` is plain growing attention layers, which may be cut, copied and joined.

    Sliding-window, linear-attention and other layers keep other state.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def weights_fingerprint(model: Any) -> str:
    """A content hash of every parameter and buffer of ``model`` (names, shapes, dtypes and bytes)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def decoder_layers(model: Any) -> Any:
    """The decoder layers (a ``ModuleList``) of a transformers causal LM, or of a peft model around one."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise RuntimeError(f"{type(decoder).__name__} has no `layers` list of decoder layers")
    return layers
