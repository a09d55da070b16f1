"""What a pipeline YAML holds (:class:`PipelineConfig` and its sections) and the SFT/DPO settings the demo trains with.

Validated before any model loads, every problem listed at once; :mod:`posttrain.demo.pipeline` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from posttrain.config import DPOConfig, GRPOConfig, SFTConfig, Strict, resolve_bf16

# The evaluation splits, in the order the report shows them: (name, title). "test" is the frozen split (its own
# queries and phrasings, posttrain.synth.verifiable, never used to choose anything); "heldout" is the
# development split (never trained on, but the default preset was tuned on it); "ifeval" IFEval's own prompts.
EVAL_SPLITS: tuple[tuple[str, str], ...] = (
    ("test", "frozen test prompts (only scored)"),
    ("heldout", "development prompts (held out from training; presets tuned on them)"),
    ("invented", "invented instructions (synth.autoif's code verifiers) on development queries"),
    ("ifeval", "IFEval subset"),
    ("ifeval_unused", "IFEval prompts never used for a choice (--full-ifeval)"),
    ("ifeval_all", "all of IFEval (--full-ifeval)"),
)
#: The splits ``full_ifeval`` scores, in their own stages (eval-full-start, eval-full-dpo) with their own token budget.
FULL_IFEVAL_SPLITS = ("ifeval_unused", "ifeval_all")


def eval_stage(split: str, model_stage: str) -> str:
    """The stage directory holding ``split``'s scores for a model whose eval stage is ``model_stage`` (``eval-start`` ...)."""
    return model_stage.replace("eval-", "eval-full-", 1) if split in FULL_IFEVAL_SPLITS else model_stage


def round_stages(number: int) -> tuple[str, str]:
    """The label and DPO stage names of DPO round ``number`` (1-based): ``label``/``dpo``, then ``label-2``/``dpo-2`` ..."""
    return ("label", "dpo") if number == 1 else (f"label-{number}", f"dpo-{number}")


def round_label_seed(seed: int, number: int) -> int:
    """Round ``number``'s sampling seed: ``label.seed`` in round 1, then far from any other run's (``--seeds`` adds 0, 1, 2)."""
    return seed + 1000 * (number - 1)


class PromptsConfig(Strict):
    """Where the verifiable prompts come from: the built-in demo set, or your own IFEval-format files."""

    train: str | None = Field(None, description="IFEval-format JSONL of training prompts (default: the built-in demo prompts).")
    heldout: str | None = Field(None, description="IFEval-format JSONL of held-out prompts (default: the built-in demo prompts).")
    ifeval: str | None = Field(None, description="IFEval-format JSONL for the fixed benchmark subset (default: the bundled IFEval subset).")
    n_train: int = Field(96, gt=0, description="Training prompts (first N of the file, or built).")
    test: str | None = Field(None, description="IFEval-format JSONL of frozen test prompts (default: the built-in test split).")
    n_heldout: int = Field(64, gt=0, description="Development prompts: held out from training; choose presets on these.")
    n_test: int = Field(48, ge=0, description="Frozen test prompts, only scored (0: none).")
    n_ifeval: int = Field(60, ge=0, description="IFEval prompts evaluated (0: none).")
    max_instructions: int = Field(2, ge=1, le=3, description="Instructions per built prompt: 1 to this.")
    types: list[str] | None = Field(None, description="Instruction types of built prompts (default: all the demo's types).")
    seed: int = 0
    verifiers: list[str] = Field(
        default_factory=list,
        description="Verifier libraries (JSONL of code verifiers, as posttrain synth autoif writes) whose ids your prompt files use.",
    )


class GenerationConfig(Strict):
    """How the generating stages (eval, sample, label) generate: in this process, or on an OpenAI-compatible endpoint.

    With ``backend: openai`` every request goes to ``base_url`` (:class:`~posttrain.generate.client.OpenAIEngine`);
    the models this pipeline trains are loaded there by path (``posttrain serve --allow-loading`` on a
    machine that sees ``output_dir``), and finished requests are cached under ``OUTPUT_DIR/requests/``,
    so a killed stage re-sends only what had not come back. Training stays in this process.
    """

    max_new_tokens: int = Field(192, gt=0)
    batch_size: int = Field(32, gt=0, description="Sequences decoded together (the engine backend).")
    bf16: bool | Literal["auto"] | None = Field(
        None,
        description="bf16 forwards. Default (null or auto): on where the hardware has native bf16 (a GPU with bf16, a CPU with "
        "AVX512-BF16, AMX or Arm BF16), where it is the fast path; fp32 elsewhere, where bf16 is emulated and several times slower.",
    )
    backend: Literal["engine", "openai"] = Field(
        "engine", description="engine: generate in this process; openai: on the endpoint at base_url."
    )
    base_url: str | None = Field(
        None, validate_default=True, description="The endpoint's API root, e.g. http://127.0.0.1:8000/v1 (backend openai)."
    )
    model: str | None = Field(None, description="The endpoint's name for the starting model (default: the pipeline's model).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (unset or empty: none).")
    concurrency: int = Field(8, gt=0, description="Requests in flight (backend openai).")
    timeout_s: float = Field(600.0, gt=0, description="Per request (backend openai).")
    max_retries: int = Field(5, ge=0, description="Tries again per request on 429, 5xx, connection errors and timeouts (backend openai).")
    cache_dir: str | None = Field(None, description="The request cache (backend openai; default: OUTPUT_DIR/requests).")

    @field_validator("base_url")
    @classmethod
    def _endpoint_given(cls, value: str | None, info: Any) -> str | None:
        # A field validator (run on the default too), not a model one, so it is listed with every other problem.
        if info.data.get("backend") == "openai" and not value:
            raise ValueError("backend openai needs the endpoint's URL (e.g. http://127.0.0.1:8000/v1)")
        return value

    def stage_key(self) -> dict[str, Any]:
        """What of this section can change a generating stage's output: not where requests are cached,
        the key's variable, concurrency, timeouts or retries; the endpoint settings only with backend openai
        (so the engine backend's keys are what they were before there was another backend)."""
        operational = {"api_key_env", "concurrency", "timeout_s", "max_retries", "cache_dir"}
        if self.backend == "engine":
            operational |= {"backend", "base_url", "model"}
        return self.model_dump(exclude=operational)


class SampleConfig(Strict):
    """Rejection sampling from the starting model."""

    k: int = Field(4, gt=0, description="Samples per training prompt.")
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    min_pass_rate: float = Field(1.0, gt=0, le=1, description="Share of a prompt's instructions a kept sample follows (strict).")
    keep_per_prompt: int = Field(1, gt=0, description="Most samples kept per prompt (distinct texts, best first).")


class LabelStageConfig(Strict):
    """Preference pairs from the SFT model's samples (AutoIF's online DPO labelling)."""

    k: int = Field(4, ge=2)
    temperature: float = Field(0.8, gt=0)
    min_pass_rate: float = Field(0.5, gt=0, le=1, description="The chosen response follows at least this share of instructions (strict).")
    max_rejected_pass_rate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="The rejected response follows at most this share of instructions (loose), and fewer than the chosen one. "
        "0 (AutoIF): it follows none; 0.5 also pairs 'both of two' against 'one of two'.",
    )
    seed: int = 1


class SteerConfig(Strict):
    """Steering and InstABoost in the eval stages (eval-start, eval-sft, eval-dpo): see ``posttrain steer``."""

    file: str | None = Field(
        None,
        description="A steering file (`posttrain steer fit`, fitted on the starting model): each prompt is steered toward its instruction types the file has.",
    )
    mode: Literal["adjust", "add"] = "adjust"
    weight: float | None = Field(None, description="Steering weight (default: 1 for adjust, the file's for add).")
    instaboost: float = Field(
        1.0,
        ge=1,
        description="InstABoost's m on each built prompt's instruction (1: off). The IFEval subset keeps no instruction apart: it is not boosted.",
    )

    @property
    def active(self) -> bool:
        return self.file is not None or self.instaboost != 1


class SynthConfig(Strict):
    """Invented instructions in the loop (:mod:`posttrain.demo.invented`): code verifiers ``posttrain synth autoif`` made."""

    autoif: str | None = Field(
        None,
        description="A `posttrain synth autoif` output directory (or its verifiers.jsonl): its instructions join the training "
        "prompts, and an 'invented' split scores them on development queries.",
    )
    n_train: int = Field(24, ge=0, description="Training prompts with an invented instruction, added to prompts.n_train.")
    n_heldout: int = Field(16, ge=0, description="Development prompts with an invented instruction (the 'invented' split).")


class FullIFEvalConfig(Strict):
    """All of IFEval, scored on the start and final models in stages of their own (``posttrain demo --full-ifeval``)."""

    enabled: bool = Field(
        False, description="Score all 541 IFEval prompts (and the 421 never used for a choice) on the start and DPO models."
    )
    max_new_tokens: int = Field(1280, gt=0, description="lm-eval's budget for IFEval: long enough for its 300+-word instructions.")


class PipelineConfig(Strict):
    model: str = Field("smollm2-135m-instruct", description="Starting model: a fetched name, zoo name, local directory or hub id.")
    template: str | None = Field(None, description="Chat template override (default: the tokenizer's own).")
    output_dir: str = "runs/demo"
    seed: int = 0
    device: str | None = None
    prompts: PromptsConfig = PromptsConfig()
    generation: GenerationConfig = GenerationConfig()
    sample: SampleConfig = SampleConfig()
    sft: dict[str, Any] = Field(default_factory=dict, description="Overrides of an SFT config (adapter, train, data.max_length ...).")
    label: LabelStageConfig = LabelStageConfig()
    dpo: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of a DPO config (adapter, train, dpo ...), and rounds: N label + DPO rounds (online DPO; default 1).",
    )
    final_stage: Literal["dpo", "grpo"] = Field(
        "dpo",
        description="What follows SFT: dpo (label pairs, DPO; dpo.rounds times) or grpo (GRPO on the training prompts, the verifiers' "
        "loose pass rate as the reward).",
    )
    grpo: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of a GRPO config (adapter, train, grpo ...), with final_stage grpo."
    )
    examples: int = Field(6, ge=0, description="Held-out responses shown before and after in the report.")
    steer: SteerConfig = SteerConfig()
    full_ifeval: FullIFEvalConfig = FullIFEvalConfig()
    synth: SynthConfig = SynthConfig()

    @field_validator("sft", "dpo", "grpo")
    @classmethod
    def _stage_config_valid(cls, raw: dict[str, Any], info: Any) -> dict[str, Any]:
        # Checked now, as a full SFT or DPO config, so a typo fails before any model loads.
        name = info.field_name
        problems = [f"{name}.{key}: set by the pipeline, not here" for key in ("model", "output_dir") if key in raw]
        data = dict(raw.get("data") or {})
        if "path" in data:
            problems.append(f"{name}.data.path: set by the pipeline (the previous stage's output), not here")
        target = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}[name]
        own = dict(raw)
        if name == "dpo" and "rounds" in own:  # the pipeline's, not DPOConfig's: how many label + DPO rounds
            rounds = own.pop("rounds")
            if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
                problems.append(f"dpo.rounds: a whole number of rounds, 1 or more, got {rounds!r}")
        try:
            target.model_validate({**own, "model": {"name": "x"}, "data": {**data, "path": "x"}, "output_dir": "x"})
        except ValidationError as err:
            problems += [
                f"{name}.{'.'.join(map(str, e['loc']))}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in err.errors()
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return raw

    @property
    def final_label(self) -> str:
        """The final model's name in reports and summaries: ``DPO`` or ``GRPO``."""
        return self.final_stage.upper()

    @property
    def dpo_rounds(self) -> int:
        """``dpo.rounds``: label + DPO rounds, each sampling fresh pairs from the previous round's model (AutoIF's online DPO)."""
        return int(self.dpo.get("rounds", 1))

    @property
    def dpo_overrides(self) -> dict[str, Any]:
        """The ``dpo`` section as DPO config overrides (without ``rounds``, which is the pipeline's)."""
        return {k: v for k, v in self.dpo.items() if k != "rounds"}

    @model_validator(mode="after")
    def _final_stage_consistent(self) -> PipelineConfig:
        if self.final_stage == "grpo" and self.dpo_rounds > 1:
            raise ValueError("dpo.rounds: DPO rounds run only with final_stage dpo (this pipeline ends with grpo); remove dpo.rounds")
        if self.final_stage == "dpo" and self.grpo:
            raise ValueError("grpo: settings for a GRPO stage, but final_stage is dpo (set final_stage: grpo to run it)")
        return self

    @property
    def verifier_libraries(self) -> list[str]:
        """Every code-verifier library the pipeline's prompts may name: ``prompts.verifiers`` and ``synth.autoif``'s."""
        from posttrain.demo.invented import library_path

        return [*self.prompts.verifiers, *([str(library_path(self.synth.autoif))] if self.synth.autoif else [])]

    @model_validator(mode="after")
    def _autoif_found(self) -> PipelineConfig:
        if self.synth.autoif:
            from posttrain.demo.invented import library_path

            try:
                library_path(self.synth.autoif)
            except FileNotFoundError as err:  # a ValueError, so it is listed with the config's other problems
                raise ValueError(str(err)) from None
        return self

    @model_validator(mode="after")
    def _steer_in_process(self) -> PipelineConfig:
        if self.steer.active and self.generation.backend != "engine":
            raise ValueError("steer: steering and InstABoost run in this process; they need generation.backend engine")
        if self.steer.file and not Path(self.steer.file).is_file():
            raise ValueError(f"steer.file: {self.steer.file}: no such file (make one with `posttrain steer fit`)")
        return self

    @model_validator(mode="after")
    def _resolve_bf16(self) -> PipelineConfig:
        # Resolved once, here, so that stage keys and the saved config say which precision generated.
        self.generation.bf16 = resolve_bf16(self.generation.bf16, self.device)
        return self


#: What the demo trains with, unless a pipeline's ``sft:`` / ``dpo:`` sections say otherwise.
SFT_DEFAULTS: dict[str, Any] = {
    "adapter": {"kind": "lora", "r": 16, "alpha": 32},
    "data": {"max_length": 512},
    "train": {"lr": 4e-4, "epochs": 3, "micro_batch_size": 4, "warmup_steps": 2, "schedule": "cosine"},
}
DPO_DEFAULTS: dict[str, Any] = {
    "adapter": {"kind": "lora", "r": 16, "alpha": 32},
    "data": {"max_length": 512},
    "train": {"lr": 2e-4, "epochs": 2, "micro_batch_size": 4, "warmup_steps": 2, "schedule": "cosine"},
    "dpo": {"beta": 0.1},
}
#: With ``final_stage: grpo``. Not tuned yet on the development prompts: a first setting (one epoch of the training
#: prompts, 8 a step, 4 samples each; LoRA, so the learning rate is LoRA's scale, not full fine-tuning's 1e-6).
GRPO_DEFAULTS: dict[str, Any] = {
    "adapter": {"kind": "lora", "r": 16, "alpha": 32},
    "train": {"lr": 5e-5, "epochs": 1, "micro_batch_size": 8, "schedule": "constant"},
    "grpo": {"group_size": 4, "prompts_per_step": 8, "beta": 0.04, "temperature": 1.0, "reward": "verifiers:loose"},
}
