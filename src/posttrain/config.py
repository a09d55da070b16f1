"""Typed configs, validated at the edge: every problem reported at once, before any model loads.

A config is YAML (or a dict from Python) plus ``--set key.path=value`` overrides. Pydantic checks
shapes, types and ranges; :func:`check_resources` then checks what only the machine can say (the data
file exists, the model resolves to a config). Both kinds of problem are listed together in one
:class:`ConfigError`. The resolved config is saved in every run directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain import hub


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = Field(description="Zoo name (tiny-llama), fetched name (smollm2-135m-instruct), local directory or hub id (Qwen/Qwen2.5-7B-Instruct).")
    revision: str | None = Field(None, description="Hub branch, tag or commit of a hub id (default: main).")
    trust_remote_code: bool = Field(False, description="Let transformers run the model repository's own Python code (needed by some hub models).")
    gguf_file: str | None = Field(None, description="GGUF file inside `name` to load through transformers' GGUF support.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Weights' dtype. float32 master weights + bf16 autocast is the fast, safe path; bfloat16 weights halve the memory of weights, "
        "gradients and AdamW's state (full fine-tuning of large models), at bf16's precision for the updates.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False


class AdapterConfig(Strict):
    kind: Literal["full", "lora", "dora", "wegeft"] = Field(
        "full", description="full, lora, dora, or wegeft (WeGeFT: ΔW = (α/r)·W·φᵀψ, one φ, ψ pair per module type shared by every layer)."
    )
    r: int = Field(None, gt=0, validate_default=False, description="Rank (default: 16; WeGeFT 64).")  # type: ignore[assignment]
    alpha: float = Field(None, gt=0, validate_default=False, description="Scale numerator, scale = alpha / r (default: 32; WeGeFT 128).")  # type: ignore[assignment]
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    quantize: Literal["4bit"] | None = Field(
        None, description="4bit: QLoRA, the frozen base in bitsandbytes NF4 (double quantization, bf16 compute); needs CUDA and adapter kind lora or dora."
    )

    @model_validator(mode="after")
    def _quantize_needs_an_adapter(self) -> AdapterConfig:
        if self.r is None:  # WeGeFT's pair is shared by every layer: its authors' default rank is 64
            self.r = 64 if self.kind == "wegeft" else 16
        if self.alpha is None:
            self.alpha = 128.0 if self.kind == "wegeft" else 32.0
        if self.quantize and self.kind in ("full", "wegeft"):
            raise ValueError(f"adapter.quantize 4bit freezes the base model in 4 bits: it needs adapter.kind lora or dora, not {self.kind}")
        return self


class DataConfig(Strict):
    path: str = Field(description="Training data: a file, a dataset directory or a hub dataset id (HuggingFaceH4/ultrachat_200k).")
    format: Literal["alpaca", "sharegpt", "messages", "prompt_completion"] | None = None
    split: str | None = Field(None, description="The split to read (default: train; a dataset without one must name it).")
    subset: str | None = Field(None, description="A hub dataset's subset (its configuration name), where it has several.")
    revision: str | None = Field(None, description="Hub branch, tag or commit of a hub dataset (default: main).")
    template: str | None = Field(None, description="Chat template: the tokenizer's own (default), chatml, alpaca, or a .jinja path.")
    train_on: Literal["all_assistant", "last_assistant", "all"] = "all_assistant"
    max_length: int = Field(1024, ge=8, description="Longest example in tokens (longer ones are truncated or dropped, see overlong).")
    pack_length: int | None = Field(None, ge=8, description="Width of a packed row in tokens (default: max_length); at least max_length.")
    overlong: Literal["truncate", "drop"] = "truncate"
    on_error: Literal["stop", "skip"] = "stop"
    eval_path: str | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Held-out share of the training data for eval loss, when no eval_path.")
    packing: bool = Field(True, description="Padding-free packing (rows of pack_length). False: padded batches grouped by length.")
    decontaminate_against: list[str] = Field(
        default_factory=list,
        description="Eval files (IFEval, MT-Bench, AlpacaEval or any format posttrain reads): training records sharing a word n-gram "
        "or a whole normalised prompt with one of their items are removed when the data is prepared, and counted in data_stats.json.",
    )
    decontaminate_n: int = Field(8, ge=1, description="n of decontaminate_against's word n-grams (13 as GPT-3 and lm-evaluation-harness).")

    @model_validator(mode="after")
    def _rows_hold_an_example(self) -> DataConfig:
        if self.pack_length is not None and self.pack_length < self.max_length:
            raise ValueError(f"data.pack_length ({self.pack_length}) must be at least data.max_length ({self.max_length}): a packed row holds whole examples")
        return self

    @property
    def row_width(self) -> int:
        """Tokens in a packed row: ``pack_length``, or ``max_length`` when it is not set."""
        return self.pack_length or self.max_length


def native_bf16(device: Any = None) -> bool:
    """Whether ``device`` (default: cuda when available, else cpu) does bf16 matmuls natively, i.e. fast.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: the instruction-set flags for bf16 dot products
    (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``) from /proc/cpuinfo, and oneDNN's bf16 support.
    oneDNN's own check alone is not enough: it also says yes on AVX-512 CPUs without bf16 instructions,
    where bf16 is emulated and slower than fp32. Anything else (mps, other systems): no.
    """
    import torch

    kind = str(device).split(":")[0] if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    return _cpu_has_bf16_instructions() and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_bf16(value: Any, device: Any = None) -> Any:
    """A ``bf16`` setting as given, or, when it is null or "auto", :func:`native_bf16` for ``device``."""
    return native_bf16(device) if value in (None, "auto") else value


def _cpu_has_bf16_instructions() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


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
    bf16: bool | None = Field(
        None,
        description="bf16 autocast for matmuls; weights and optimizer stay fp32. Default (null or auto): on where the hardware "
        "has native bf16 (CUDA with bf16 support; a CPU with AVX512-BF16, AMX or Arm BF16), fp32 otherwise; resolved when the "
        "config is validated, so the saved config says which was used.",
    )
    compile: bool = Field(False, description="torch.compile each decoder layer (SFT): on a CPU with native bf16, 1.13x faster steps and 0.68x peak memory on a ~40M model (docs/PERFORMANCE.md), after ~13 s of compilation; needs a C++ compiler on CPU.")
    neftune_alpha: float | None = Field(None, gt=0)
    seed: int = 0
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... (default: cuda when available; under torchrun, cuda:LOCAL_RANK).")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp keeps a whole copy of the model on every process; fsdp (FSDP2) shards weights, gradients and "
        "optimizer state over the processes (each decoder layer gathered for its forward and backward, then freed).",
    )
    dist_timeout_s: float = Field(1800, gt=0, description="How long a process waits for the others at a collective before the run fails.")

    @model_validator(mode="after")
    def _compile_alone(self) -> TrainConfig:
        if self.compile and self.distributed == "fsdp":
            raise ValueError("train.compile is not supported with train.distributed fsdp yet; leave one of them off")
        return self

    @model_validator(mode="before")
    @classmethod
    def _resolve_bf16(cls, data: Any) -> Any:
        """``bf16`` null or "auto" becomes true or false here, once, for ``device`` (see :func:`native_bf16`)."""
        if isinstance(data, dict):
            data = {**data, "bf16": resolve_bf16(data.get("bf16"), data.get("device"))}
        return data


def _sharding_problems(adapter: AdapterConfig, train: TrainConfig) -> list[str]:
    if adapter.quantize and train.distributed == "fsdp":
        return ["adapter.quantize 4bit with train.distributed fsdp: bitsandbytes' 4-bit weights cannot be sharded by FSDP2 here; use ddp (each GPU holds the whole 4-bit base)"]
    return []


class SFTConfig(Strict):
    model: ModelConfig
    data: DataConfig
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig()
    output_dir: str = "runs/sft"
    resume: bool | Literal["auto"] = False

    @model_validator(mode="after")
    def _consistent(self) -> SFTConfig:
        problems = _sharding_problems(self.adapter, self.train)
        if self.train.eval_every and not (self.data.eval_path or self.data.eval_fraction > 0):
            problems.append("train.eval_every needs data.eval_path or data.eval_fraction > 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PreferenceDataConfig(DataConfig):
    """Preference pairs: each side is rendered after the shared prompt; only the response is scored."""

    format: Literal["preference"] | None = None
    packing: bool = Field(False, description="Pairs are batched with padding (chosen and rejected in one forward pass).")


class DPOSettings(Strict):
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "simpo", "orpo", "kto"] = "sigmoid"
    beta: float | None = Field(None, gt=0, description="Default 0.1 (2.5 for simpo, as in the SimPO paper).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust (cDPO): the assumed share of flipped labels.")
    simpo_gamma: float = Field(1.375, ge=0)
    orpo_lambda: float = Field(0.1, gt=0)
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO's λ_D (chosen responses are its desirable examples).")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO's λ_U (rejected responses are its undesirable ones).")
    reference: Literal["precompute", "adapter", "model"] = Field(
        "precompute",
        description="precompute: the initial model's log-probs, once, cached by content hash. adapter: the LoRA/DoRA model with its adapter disabled. model: a frozen copy.",
    )
    sampler_reference: bool = Field(
        True,
        description="With reference precompute: take the log-probs that `posttrain label --reference-logps` recorded in the pairs' meta while sampling them, where they were measured by this very model, in this precision, on exactly the tokens trained on; the rest are computed.",
    )

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else (2.5 if self.loss_type == "simpo" else 0.1)


class DPOConfig(Strict):
    model: ModelConfig
    data: PreferenceDataConfig
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig(lr=5e-7, micro_batch_size=4)
    dpo: DPOSettings = DPOSettings()
    output_dir: str = "runs/dpo"
    resume: bool | Literal["auto"] = False

    @model_validator(mode="after")
    def _consistent(self) -> DPOConfig:
        problems = _sharding_problems(self.adapter, self.train)
        if self.dpo.reference == "model" and self.train.distributed == "fsdp":
            problems.append("dpo.reference model keeps a whole frozen copy on every process; with train.distributed fsdp use precompute (the default) or adapter")
        if self.dpo.loss_type == "robust" and self.dpo.label_smoothing == 0:
            problems.append("dpo.loss_type robust needs dpo.label_smoothing > 0")
        if self.dpo.reference == "adapter" and self.adapter.kind == "full":
            problems.append("dpo.reference adapter needs adapter.kind lora or dora")
        if self.train.eval_every and not (self.data.eval_path or self.data.eval_fraction > 0):
            problems.append("train.eval_every needs data.eval_path or data.eval_fraction > 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RewardConfig(Strict):
    """`posttrain rm train`: the LM's decoder plus a scalar head, Bradley–Terry loss on preference pairs.

    ``train.micro_batch_size`` and the step size count *pairs* (each pair is two sequences).
    """

    model: ModelConfig
    data: PreferenceDataConfig
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig(lr=1e-5, micro_batch_size=4)
    output_dir: str = "runs/rm"
    resume: bool | Literal["auto"] = False

    @model_validator(mode="after")
    def _consistent(self) -> RewardConfig:
        problems = _sharding_problems(self.adapter, self.train)
        if self.data.packing:
            problems.append("data.packing: a reward model scores each sequence at its last token, so pairs are padded, not packed (set it false)")
        if self.train.neftune_alpha:
            problems.append("train.neftune_alpha: NEFTune is for SFT; a reward model trains without it")
        if self.train.eval_every and not (self.data.eval_path or self.data.eval_fraction > 0):
            problems.append("train.eval_every needs data.eval_path or data.eval_fraction > 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PromptDataConfig(Strict):
    """Prompts to sample from: any record with a prompt (prompt/completion, preference, IFEval); other fields are ignored."""

    path: str = Field(description="Prompts: a file, a dataset directory or a hub dataset id.")
    format: Literal["alpaca", "sharegpt", "messages", "prompt_completion", "preference", "ifeval"] | None = None
    split: str | None = Field(None, description="The split to read (default: train; a dataset without one must name it).")
    subset: str | None = Field(None, description="A hub dataset's subset (its configuration name), where it has several.")
    revision: str | None = Field(None, description="Hub branch, tag or commit of a hub dataset (default: main).")
    template: str | None = Field(None, description="Chat template: the tokenizer's own (default), chatml, alpaca, or a .jinja path.")
    max_prompt_length: int = Field(512, ge=1, description="Prompts longer than this many tokens are dropped (and counted).")
    on_error: Literal["stop", "skip"] = "stop"


class PPOSettings(Strict):
    prompts_per_step: int = Field(16, gt=0, description="Prompts sampled per PPO step.")
    samples_per_prompt: int = Field(1, gt=0)
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    epochs: int = Field(4, gt=0, description="PPO epochs over each step's rollouts.")
    kl_coef: float = Field(0.05, ge=0, description="β of the per-token KL penalty to the reference policy.")
    clip: float = Field(0.2, gt=0, description="Policy ratio clip ε.")
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss (the value head shares the policy's trunk).")
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from the score of a response cut off by max_new_tokens.")
    generation_batch_size: int = Field(64, gt=0)


class PPOConfig(Strict):
    """`posttrain ppo`: RLHF as in InstructGPT. ``train.max_steps`` counts PPO steps (rollouts, then updates);
    an optimizer step takes ``micro_batch_size × grad_accum`` sequences of the step's rollouts."""

    model: ModelConfig
    data: PromptDataConfig
    reward: str = Field(description="An `rm` run directory (or its final/), or a Python reward package.module:function(prompt, completion[, record]) -> float.")
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig(lr=3e-6, micro_batch_size=8, schedule="linear", warmup_ratio=0.0)
    ppo: PPOSettings = PPOSettings()
    output_dir: str = "runs/ppo"
    resume: bool | Literal["auto"] = False

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        problems = []
        if self.train.distributed == "fsdp":
            problems.append("train.distributed fsdp: PPO samples its rollouts from the whole policy on every process; use ddp")
        if not Path(self.reward).exists() and not re.fullmatch(REWARD_FUNCTION_PATTERN, self.reward):
            problems.append(f"reward: expected an rm run directory or package.module:function, found {self.reward!r} (no such directory)")
        rollouts = self.ppo.prompts_per_step * self.ppo.samples_per_prompt
        batch = self.train.micro_batch_size * self.train.grad_accum
        if rollouts % batch:
            problems.append(
                f"ppo.prompts_per_step × ppo.samples_per_prompt ({rollouts}) must be a multiple of train.micro_batch_size × train.grad_accum ({batch})"
            )
        if self.train.neftune_alpha:
            problems.append("train.neftune_alpha: NEFTune is for SFT; PPO trains without it")
        if self.train.eval_every:
            problems.append("train.eval_every: PPO has no eval split; evaluate the final policy with posttrain eval")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# A Python reward: package.module:function, optionally written python:package.module:function.
REWARD_FUNCTION_PATTERN = r"(python:)?[A-Za-z_][\w.]*:[A-Za-z_]\w*"


class ConfigError(ValueError):
    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n" + "\n".join(f"  - {p}" for p in problems))


class GRPODataConfig(PromptDataConfig):
    """PPO's prompt data, plus the ``prompts`` format (lines of ``{prompt: text or messages, ...}``) for reward functions."""

    format: Literal["ifeval", "prompts", "alpaca", "sharegpt", "messages", "prompt_completion", "preference"] | None = Field(
        None, description="None: detected. prompts: lines of {prompt: text or messages, ...}. Other formats give their prompt (their responses are unused)."
    )


class GRPOSettings(Strict):
    group_size: int = Field(8, ge=2, description="G: samples per prompt; advantages are relative within each prompt's group.")
    prompts_per_step: int = Field(8, gt=0, description="Prompts per step (each sampled G times), over all processes.")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.04, ge=0, description="KL coefficient (k3 estimator) against the initial model; 0 keeps no reference at all.")
    clip: float = Field(0.2, gt=0, lt=1, description="ε of the clipped probability ratio.")
    updates_per_batch: int = Field(1, ge=1, description="μ: optimizer updates on each step's samples.")
    reward: str = Field(
        "verifiers:loose",
        pattern=r"^(verifiers:(loose|strict)|(python:)?[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
        description="verifiers:loose | verifiers:strict (share of the prompt's IFEval instructions followed), or package.module:function(prompt, completion[, record]) -> float.",
    )
    generation_batch_size: int = Field(64, ge=1, description="Sequences decoded together.")
    verifiers: list[str] = Field(
        default_factory=list, description="Verifier libraries (JSONL of code verifiers, as posttrain synth autoif writes) whose ids the prompts use."
    )


class GRPOConfig(Strict):
    model: ModelConfig
    data: GRPODataConfig
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig(lr=1e-6, schedule="constant", warmup_ratio=0.0)
    grpo: GRPOSettings = GRPOSettings()
    output_dir: str = "runs/grpo"
    resume: bool | Literal["auto"] = False

    @model_validator(mode="after")
    def _consistent(self) -> GRPOConfig:
        problems = []
        if self.train.distributed == "fsdp":
            problems.append("train.distributed fsdp: GRPO samples from the whole policy on every process; use ddp")
        if self.grpo.reward.startswith("verifiers:") and self.data.format not in (None, "ifeval"):
            problems.append(f"grpo.reward {self.grpo.reward} needs IFEval-format prompts (data.format ifeval), not {self.data.format}")
        if self.train.grad_accum != 1:
            problems.append("train.grad_accum: a GRPO step is all of its samples (prompts_per_step × group_size) in micro-batches of train.micro_batch_size; leave grad_accum at 1")
        if self.train.eval_every:
            problems.append("train.eval_every: GRPO has no held-out loss; evaluate the final model instead")
        if self.train.neftune_alpha:
            problems.append("train.neftune_alpha: NEFTune is for supervised fine-tuning, not GRPO")
        if problems:
            raise ValueError("; ".join(problems))
        return self


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
        # A whole-config check (no location) would otherwise print the entire config as what was found.
        found = "" if e["type"] in ("missing", "extra_forbidden") or not e["loc"] else f" (found {e.get('input')!r})"
        out.append(f"{where}: {msg}{found}")
    return out


def check_resources(raw: dict[str, Any]) -> list[str]:
    """Problems only the machine can tell: missing data files, models that do not resolve, hub repos out of reach.

    A name is a local path or a hub id by :func:`posttrain.hub.is_hub_id`. A hub dataset is checked only
    offline (is it in the local hub cache?); online, the hub is asked when the data is read.
    """
    problems = []
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    against = data.get("decontaminate_against")
    named = [("path", data.get("path")), ("eval_path", data.get("eval_path"))]
    named += [(f"decontaminate_against[{i}]", v) for i, v in enumerate(against)] if isinstance(against, list) else []
    for key, value in named:
        if not isinstance(value, str) or Path(value).exists():
            continue
        if not hub.is_hub_id(value):
            problems.append(f"data.{key}: no such file or directory: {value}")
        elif hub.offline():
            problem = hub.unavailable(value, repo_type="dataset", revision=None if key.startswith("decontaminate") else data.get("revision"))
            if problem:
                problems.append(f"data.{key}: {problem}")
    grpo = raw.get("grpo") if isinstance(raw.get("grpo"), dict) else {}
    for index, library in enumerate(grpo.get("verifiers") or []):
        if isinstance(library, str) and not Path(library).is_file():
            problems.append(f"grpo.verifiers[{index}]: no such verifier library: {library}")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    if isinstance(model.get("name"), str):
        problem = model_problem(model)
        if problem:
            problems.append(f"model.name: {problem}")
    adapter = raw.get("adapter") if isinstance(raw.get("adapter"), dict) else {}
    if adapter.get("quantize"):
        from posttrain.models.load import quantize_problem

        train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
        problem = quantize_problem(adapter["quantize"], train.get("device"))
        if problem:
            problems.append(f"adapter.quantize: {problem}")
    return problems


def model_problem(model: str | dict[str, Any]) -> str | None:
    """Why a model cannot be loaded, or None. Reads only the model's config, never its weights.

    ``model`` is a name, or a model section (``name``, and ``revision``, ``trust_remote_code``,
    ``gguf_file`` where set), whose revision and remote-code setting reach ``AutoConfig`` as they will
    reach the loaders. A hub id that is neither in the local hub cache nor reachable says so, by name.
    """
    from posttrain.models.load import resolve

    section = {"name": model} if isinstance(model, str) else model
    name, revision, gguf_file = section["name"], section.get("revision"), section.get("gguf_file")
    try:
        path = resolve(name)
    except (KeyError, FileNotFoundError) as e:
        return str(e).strip("'\"")
    local = Path(path)
    if local.is_dir():
        if gguf_file:
            return None if (local / gguf_file).exists() else f"no GGUF file {gguf_file} in {path}"
        return None if (local / "config.json").exists() else f"{path} has no config.json (not a Hugging Face model directory)"
    if not hub.is_hub_id(name):
        return f"no such model directory: {name}"
    if hub.offline():
        problem = hub.unavailable(name, revision=revision)
        if problem:
            return problem
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if section.get("trust_remote_code"):
        kwargs["trust_remote_code"] = True
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure here means the model cannot be used
        return hub.unavailable(name, revision=revision, error=e) or f"cannot load the config of hub model {name!r}{f' at {revision}' if revision else ''} ({hub.describe(e)})"
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
