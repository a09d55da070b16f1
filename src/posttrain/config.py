"""Typed configs, validated at the edge: every problem reported at once, before any model loads.

A config is YAML (or a dict from Python) plus ``--set key.path=value`` overrides. Pydantic checks
shapes, types and ranges; :func:`check_resources` then checks what only the machine can say (the data
file exists, the model resolves to a config). Both kinds of problem are listed together in one
:class:`ConfigError`. The resolved config is saved in every run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = Field(description="Zoo name (tiny-llama), fetched name (smollm2-135m-instruct), local directory or hub id.")
    gguf_file: str | None = Field(None, description="GGUF file inside `name` to load through transformers' GGUF support.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights' dtype. float32 master weights + bf16 autocast is the fast, safe path.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False


class AdapterConfig(Strict):
    kind: Literal["full", "lora", "dora"] = "full"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class DataConfig(Strict):
    path: str = Field(description="Training data: a file, a dataset directory or a hub id.")
    format: Literal["alpaca", "sharegpt", "messages", "prompt_completion"] | None = None
    split: str | None = None
    template: str | None = Field(None, description="Chat template: the tokenizer's own (default), chatml, alpaca, or a .jinja path.")
    train_on: Literal["all_assistant", "last_assistant", "all"] = "all_assistant"
    max_length: int = Field(1024, ge=8, description="Longest example in tokens; also the packed row width.")
    overlong: Literal["truncate", "drop"] = "truncate"
    on_error: Literal["stop", "skip"] = "stop"
    eval_path: str | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Held-out share of the training data for eval loss, when no eval_path.")
    packing: bool = Field(True, description="Padding-free packing (rows of max_length). False: padded batches grouped by length.")


class TrainConfig(Strict):
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; default: epochs over the data.")
    epochs: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(8, gt=0, description="Rows per forward pass (packed rows, or examples when not packing).")
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    bf16: bool = Field(False, description="bf16 autocast for matmuls (CPU and CUDA); weights and optimizer stay fp32.")
    neftune_alpha: float | None = Field(None, gt=0)
    seed: int = 0
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... (default: cuda when available).")


class SFTConfig(Strict):
    model: ModelConfig
    data: DataConfig
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig()
    output_dir: str = "runs/sft"
    resume: bool | Literal["auto"] = False

    @model_validator(mode="after")
    def _eval_needs_data(self) -> SFTConfig:
        if self.train.eval_every and not (self.data.eval_path or self.data.eval_fraction > 0):
            raise ValueError("train.eval_every needs data.eval_path or data.eval_fraction > 0")
        return self


class ConfigError(ValueError):
    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n" + "\n".join(f"  - {p}" for p in problems))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "adapter.kind=lora"]`` applied to a nested dict; values parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"--set {item!r}: expected key.path=value"])
        key, value = item.split("=", 1)
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"--set {item!r}: {part} is not a section"])
        node[leaf] = yaml.safe_load(value)
    return raw


def _pydantic_problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        found = "" if e["type"] in ("missing", "extra_forbidden") else f" (found {e.get('input')!r})"
        out.append(f"{where}: {msg}{found}")
    return out


def check_resources(raw: dict[str, Any]) -> list[str]:
    """Problems only the machine can tell: missing data files, models that do not resolve."""
    problems = []
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for key in ("path", "eval_path"):
        value = data.get(key)
        if isinstance(value, str) and _looks_local(value) and not Path(value).exists():
            problems.append(f"data.{key}: no such file or directory: {value}")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    name = model.get("name")
    if isinstance(name, str):
        problem = model_problem(name, model.get("gguf_file"))
        if problem:
            problems.append(f"model.name: {problem}")
    return problems


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).suffix != "" or value.count("/") != 1


def model_problem(name: str, gguf_file: str | None = None) -> str | None:
    """Why ``name`` cannot be loaded, or None. Reads only the model's config, never its weights."""
    from posttrain.models.load import resolve

    try:
        path = resolve(name)
    except (KeyError, FileNotFoundError) as e:
        return str(e).strip("'\"")
    local = Path(path)
    if local.is_dir():
        if gguf_file:
            return None if (local / gguf_file).exists() else f"no GGUF file {gguf_file} in {path}"
        return None if (local / "config.json").exists() else f"{path} has no config.json (not a Hugging Face model directory)"
    if _looks_local(name):
        return f"no such model directory: {name}"
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any failure here means the model cannot be used
        return f"cannot find model {name!r} locally or on the hub ({e.__class__.__name__})"
    return None


def load_config(source: str | Path | dict[str, Any] | None, overrides: list[str] | None = None, cls: type[Strict] = SFTConfig) -> Any:
    """Parse, override and validate; raises ConfigError listing every problem."""
    label = str(source) if isinstance(source, (str, Path)) else "config"
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError([f"no such config file: {path}"], label)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], label) from e
        if not isinstance(raw, dict):
            raise ConfigError(["expected a mapping of sections (model, data, train, ...)"], label)
    raw = apply_overrides(raw, overrides or [])
    problems: list[str] = []
    config = None
    try:
        config = cls.model_validate(raw)
    except ValidationError as e:
        problems += _pydantic_problems(e)
    problems += check_resources(raw)
    if problems:
        raise ConfigError(problems, label)
    return config


def dump_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
