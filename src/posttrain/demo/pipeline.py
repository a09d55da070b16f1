"""``posttrain run PIPELINE.yaml`` and ``posttrain demo``: the AutoIF self-alignment loop as cached stages.

One pipeline, read top to bottom in :func:`run`::

    prompts     verifiable prompts: train, held-out (queries and phrasings never seen in training), IFEval subset
    eval-start  the starting model, greedy, on the held-out prompts and the IFEval subset
    sample      K samples per training prompt from the starting model; keep those every verifier passes
    sft         LoRA SFT on the kept samples (rejection-sampling fine-tuning), merged for the next stages
    eval-sft
    label       K samples per training prompt from the SFT model, paired by verifier pass rate (``posttrain label``)
    dpo         DPO on those pairs, from the SFT model, merged
    label-2, dpo-2, ...
                only with ``dpo.rounds`` > 1 (online DPO): fresh pairs from the last round's model, DPO from it
    grpo        instead of label and dpo with ``final_stage: grpo``: GRPO from the SFT model, verifier rewards
    eval-grpo   (then in place of eval-dpo)
    eval-dpo
    eval-full-start, eval-full-dpo
                only with ``full_ifeval.enabled`` (``--full-ifeval``): both models on all 541 IFEval prompts at 1280
                new tokens, scored on all and on the 421 never used for a choice
    report      report.html, summary.json and the summary table

The steps are posttrain's own pieces (the generation engine, the verifiers, :func:`posttrain.synth.label.label_prompts`,
the SFT and DPO loops, IFEval scoring); this module only wires them and caches their artifacts. Each stage
writes into ``OUTPUT_DIR/<stage>/`` and finishes by writing ``stage.json`` with a key: a hash of the
stage's own settings, the run ids of the stages it reads, (for the starting model) a fingerprint of the
model's files or a hub model's commit, and the versions of posttrain, torch, transformers and peft (an
upgrade may make any stage come out differently, so it runs them again). A re-run reuses every stage
whose key is unchanged and whose ``stage.json`` exists, so changing the DPO settings re-runs ``dpo``,
``eval-dpo`` and ``report`` only. A stage killed halfway has no ``stage.json`` and runs again from
scratch, and so does every stage after it that reads it.

Pipelines are YAML files validated by :class:`PipelineConfig` (every problem listed before any model
loads); ``posttrain demo`` is ``examples/demo_smollm2.yaml`` built in (:func:`demo_config`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from posttrain import hub
from posttrain.config import ConfigError, DPOConfig, SFTConfig, load_config
from posttrain.demo.config import (  # noqa: F401 — re-exported: callers know them as pipeline's
    DPO_DEFAULTS,
    GRPO_DEFAULTS,
    SFT_DEFAULTS,
    GenerationConfig,
    LabelStageConfig,
    PipelineConfig,
    PromptsConfig,
    SampleConfig,
    SteerConfig,
    SynthConfig,
    eval_stage,
    round_label_seed,
    round_stages,
)
from posttrain.demo.evaluate import evaluate_full_ifeval, evaluate_model
from posttrain.records import write_jsonl

STAGE_VERSION = 1
STAGES = ("prompts", "eval-start", "sample", "sft", "eval-sft", "label", "dpo", "eval-dpo", "report")


class PipelineError(RuntimeError):
    """A stage cannot go on (e.g. no sample passed its verifiers); the message says what to change."""


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_pipeline(path: str | Path | None, overrides: list[str] | None = None, *, base: dict[str, Any] | None = None) -> PipelineConfig:
    """A pipeline from YAML (or ``base``, for the demo) plus ``key.path=value`` overrides; every problem at once.

    An override that switches ``base``'s final stage (``final_stage=grpo`` on the demo's preset) also drops the
    preset's section for the stage it replaces, unless the overrides set something in that section too: the
    preset's ``dpo.rounds: 2`` is the preset's choice for DPO, not a setting the user gave to a GRPO pipeline."""
    overrides = overrides or []
    if path is None and base:
        base = _for_final_stage(base, overrides)
    return load_config(path if path is not None else (base or {}), overrides, cls=PipelineConfig)


def _for_final_stage(base: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``base`` without the section of the final stage the overrides switch away from (see :func:`load_pipeline`)."""
    pairs = [o.split("=", 1) for o in overrides if "=" in o]
    stage = next((value.strip() for key, value in reversed(pairs) if key.strip() == "final_stage"), None)
    if stage is None or stage == base.get("final_stage", "dpo"):
        return base
    replaced = {"grpo": "dpo", "dpo": "grpo"}.get(stage)
    if replaced is None or any(key.strip().split(".")[0] == replaced for key, _ in pairs):
        return base
    return {k: v for k, v in base.items() if k != replaced}


def demo_config(quick: bool = False) -> dict[str, Any]:
    """``posttrain demo``'s pipeline (``examples/demo_smollm2.yaml``), or ``--quick``'s tiny one."""
    import yaml

    name = "demo_quick.yaml" if quick else "demo_smollm2.yaml"
    return yaml.safe_load((Path(__file__).parent / "pipelines" / name).read_text())


# -- stages and their cache ----------------------------------------------------------------------


def key_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(name: str) -> str:
    """What the starting model is, for the stage keys: a changed model re-runs every stage.

    A local model (zoo, fetched, a directory): the sizes and modification times of its files (cheap; a
    rewritten checkpoint changes it). A hub id: ``name@commit``, the commit its main branch resolves to
    (the hub says, or offline the local hub cache's ``refs/main``), so a new commit on the hub is a new
    model. Only when that commit cannot be known (neither the hub nor the cache answers) is it the name
    alone, which cannot tell one commit from another.
    """
    from posttrain.models.load import resolve

    path = Path(resolve(name))
    if not path.is_dir():
        commit = hub.resolved_commit(name) if hub.is_hub_id(name) else None
        return f"{name}@{commit}" if commit else name
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return key_of([(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def code_versions() -> dict[str, str]:
    """The installed versions of the code a stage's output depends on: posttrain and the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("posttrain", "torch", "transformers", "peft"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


class Stages:
    """Runs stages in order, reusing a stage whose key matches its finished ``stage.json``."""

    def __init__(self, root: Path, console: Any):
        self.root = root
        self.console = console
        self.runs: dict[str, str] = {}
        self.timings: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, inputs: dict[str, Any], after: tuple[str, ...], work: Callable[[Path], dict[str, Any] | None]) -> Path:
        # A stage's key covers its inputs and the *runs* of the stages it reads: a stage that ran again
        # (even with the same inputs: sampling on another machine may differ) makes its readers run again.
        key = key_of(
            {"stage": name, "version": STAGE_VERSION, "code": code_versions(), "inputs": inputs, "after": [self.runs[a] for a in after]}
        )
        out = self.root / name
        marker = out / "stage.json"
        done = json.loads(marker.read_text()) if marker.exists() else {}
        if done.get("key") == key and done.get("run"):
            self.console.print(f"[bold]{name}[/]: reused (inputs unchanged since {done.get('finished', '?')})")
            self.runs[name] = done["run"]
            self.timings[name] = {"seconds": done.get("seconds", 0.0), "reused": True}
            return out
        changed = [f"{k} {done['code'].get(k)} → {v}" for k, v in code_versions().items() if done.get("code") and done["code"].get(k) != v]
        if changed:
            self.console.print(f"[bold]{name}[/]: runs again: the code changed since its last run ({', '.join(changed)})")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        self.console.rule(f"[bold]{name}")
        started = time.perf_counter()
        info = work(out) or {}
        seconds = time.perf_counter() - started
        self.runs[name] = f"{key}-{time.time_ns()}"
        record = {
            "key": key,
            "run": self.runs[name],
            "inputs": inputs,
            "seconds": seconds,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "code": code_versions(),
            **info,
        }
        marker.write_text(json.dumps(record, indent=1, default=str))
        self.timings[name] = {"seconds": seconds, "reused": False}
        self.console.print(f"[bold]{name}[/]: done in {seconds:.0f} s")
        return out


# -- the pipeline --------------------------------------------------------------------------------


def run(cfg: PipelineConfig, *, console: Any = None) -> dict[str, Any]:
    """Run (or reuse) every stage; returns the summary also written to ``OUTPUT_DIR/summary.json``."""
    from rich.console import Console

    console = console or Console()
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline.yaml").write_text(_yaml(cfg.model_dump(mode="json")))
    stage = Stages(root, console)
    gen = cfg.generation.stage_key()
    started = time.perf_counter()

    from posttrain.verify.code import load_libraries

    load_libraries(cfg.verifier_libraries)  # code verifiers the prompts name: every stage that scores uses them
    libraries = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in cfg.verifier_libraries]
    prompts_key = {"prompts": cfg.prompts.model_dump(exclude={"verifiers"})} | ({"verifier_libraries": libraries} if libraries else {})
    if cfg.synth.autoif:  # only then in the key: pipelines without invented instructions keep theirs
        prompts_key["synth"] = cfg.synth.model_dump(exclude={"autoif"})
    parts = cfg.steer.instaboost != 1  # InstABoost needs each prompt's instruction apart
    prompts = stage(
        "prompts",
        prompts_key | ({"parts": True} if parts else {}),
        (),
        lambda out: build_prompt_files(cfg.prompts, out, parts=parts, synth=cfg.synth),
    )
    start_model = {"model": cfg.model, "fingerprint": model_fingerprint(cfg.model), "template": cfg.template}
    # only a pipeline that steers has it in its eval stages' keys: the others keep the keys they had
    steer = {"steer": cfg.steer.model_dump() | {"file_sha256": _sha256(cfg.steer.file)}} if cfg.steer.active else {}

    def evaluate(model: str) -> Callable[[Path], dict[str, Any]]:
        return lambda out: evaluate_model(_engine(model, cfg), model, prompts, out, cfg)

    def full_ifeval(model: str) -> Callable[[Path], dict[str, Any]]:
        return lambda out: evaluate_full_ifeval(_engine(model, cfg), model, out, cfg)

    stage("eval-start", {**start_model, "generation": gen, **steer}, ("prompts",), evaluate(cfg.model))
    sample = stage(
        "sample",
        {**start_model, "generation": gen, "sample": cfg.sample.model_dump(), "seed": cfg.seed},
        ("prompts",),
        lambda out: rejection_sample(cfg, prompts / "train.jsonl", out),
    )
    sft = stage(
        "sft",
        {**start_model, "sft": deep_merge(SFT_DEFAULTS, cfg.sft), "seed": cfg.seed},
        ("sample",),
        lambda out: train_stage("sft", cfg, cfg.model, sample / "kept.jsonl", out),
    )
    sft_model = str(sft / "merged")
    stage("eval-sft", {"generation": gen, **steer}, ("prompts", "sft"), evaluate(sft_model))
    # label + DPO, dpo.rounds times: each round samples fresh pairs from the model the last one made (AutoIF's online
    # DPO), which is also that round's DPO start and reference. Round 1 is "label"/"dpo" (the keys it always had).
    # Or, with final_stage grpo, GRPO from the SFT model on the training prompts, rewarded by the verifiers.
    policy, before = sft_model, "sft"
    if cfg.final_stage == "grpo":
        grpo = stage(
            "grpo",
            {"grpo": grpo_settings(cfg), "seed": cfg.seed},
            ("prompts", "sft"),
            lambda out: train_stage("grpo", cfg, sft_model, prompts / "train.jsonl", out),
        )
        policy, before = str(grpo / "merged"), "grpo"
    for number in range(1, cfg.dpo_rounds + 1 if cfg.final_stage == "dpo" else 1):
        label_name, dpo_name = round_stages(number)
        label_cfg = cfg.label.model_copy(update={"seed": round_label_seed(cfg.label.seed, number)})
        label = stage(
            label_name,
            # max_rejected_pass_rate in the key only when set: labels made by AutoIF's rule keep their keys
            {
                "generation": gen,
                "label": label_cfg.model_dump(exclude={"max_rejected_pass_rate"} if not label_cfg.max_rejected_pass_rate else set()),
                "reference_logps": cfg.generation.backend == "engine",
            },
            ("prompts", before),
            lambda out, model=policy, lc=label_cfg: label_stage(cfg, model, prompts / "train.jsonl", out, lc),
        )
        dpo = stage(
            dpo_name,
            {"dpo": deep_merge(DPO_DEFAULTS, cfg.dpo_overrides), "seed": cfg.seed},
            (label_name, before),
            lambda out, model=policy, pairs=label / "pairs.jsonl": train_stage("dpo", cfg, model, pairs, out),
        )
        policy, before = str(dpo / "merged"), dpo_name
    final = f"eval-{cfg.final_stage}"
    stage(final, {"generation": gen, **steer}, ("prompts", before), evaluate(policy))
    if cfg.full_ifeval.enabled:  # all of IFEval at lm-eval's budget: stages of their own, so the others keep their keys
        # its own token budget: the preset's max_new_tokens is not in its key, so tuning it keeps this (long) stage
        full = {"full_ifeval": cfg.full_ifeval.model_dump(), "generation": {k: v for k, v in gen.items() if k != "max_new_tokens"}, **steer}
        stage("eval-full-start", {**start_model, **full}, (), full_ifeval(cfg.model))
        stage(eval_stage("ifeval_all", final), full, (before,), full_ifeval(policy))

    from posttrain.demo import report

    summary = report.write(root, cfg, stage.timings, time.perf_counter() - started)
    report.print_summary(summary, console)
    return summary


def _sha256(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


def build_prompt_files(p: PromptsConfig, out: Path, *, parts: bool = False, synth: SynthConfig | None = None) -> dict[str, Any]:
    """``train.jsonl``, ``heldout.jsonl``, ``test.jsonl`` and ``ifeval.jsonl`` (IFEval format) in ``out``; ``parts``: built
    prompts keep their query and instruction apart too. With ``synth.autoif``: invented instructions join the
    training prompts, and ``invented.jsonl`` holds them on development queries (:mod:`posttrain.demo.invented`)."""
    from posttrain.demo.ifeval_subset import ifeval_subset
    from posttrain.synth.verifiable import build_prompts
    from posttrain.verify.scoring import read_prompt_records

    def given(path: str, n: int) -> list[dict[str, Any]]:
        return [r.model_dump(mode="json") for r in read_prompt_records(path)[:n]]

    train = given(p.train, p.n_train) if p.train else build_prompts("train", p.n_train, p.seed, p.max_instructions, p.types, parts=parts)
    heldout = (
        given(p.heldout, p.n_heldout)
        if p.heldout
        else build_prompts("heldout", p.n_heldout, p.seed, p.max_instructions, p.types, parts=parts)
    )
    ifeval = (given(p.ifeval, p.n_ifeval) if p.ifeval else ifeval_subset(p.n_ifeval)) if p.n_ifeval else []
    test = (
        (given(p.test, p.n_test) if p.test else build_prompts("test", p.n_test, p.seed, p.max_instructions, p.types, parts=parts))
        if p.n_test
        else []
    )
    invented: list[dict[str, Any]] = []
    if synth is not None and synth.autoif:
        from posttrain.demo.invented import invented_prompts, load_checks

        checks = load_checks(synth.autoif)
        train = train + invented_prompts(checks, "train", synth.n_train, p.seed)
        invented = invented_prompts(checks, "heldout", synth.n_heldout, p.seed)
    overlap = {r["prompt"] for r in train} & {r["prompt"] for r in heldout + ifeval + test + invented}
    if overlap:
        raise PipelineError(
            f"{len(overlap)} development, test or IFEval prompt(s) are also training prompts (first: {next(iter(overlap))[:80]!r})"
        )
    shared = {r["prompt"] for r in test} & {r["prompt"] for r in heldout}
    if shared:
        raise PipelineError(f"{len(shared)} test prompt(s) are also development prompts (first: {next(iter(shared))[:80]!r})")
    for name, records in (("train", train), ("heldout", heldout), ("ifeval", ifeval), ("test", test)):
        write_jsonl(out / f"{name}.jsonl", records)
    if invented:
        write_jsonl(out / "invented.jsonl", invented)
    # the test split's content hash: a report's test figures are comparable only between runs with the same one
    test_sha256 = hashlib.sha256((out / "test.jsonl").read_bytes()).hexdigest()
    counts = {"train": len(train), "heldout": len(heldout), "ifeval": len(ifeval), "test": len(test), "test_sha256": test_sha256}
    return counts | ({"invented": len(invented), "invented_in_train": synth.n_train} if invented and synth else {})


class _LoggedEngine:
    """An engine whose ``generate`` also prints one line (prompts, tokens, seconds, tok/s): logs and pipes show no live bar."""

    def __init__(self, engine: Any, console: Any):
        self.engine, self.console = engine, console

    def __getattr__(self, name: str) -> Any:  # the rest (model, tokenizer, ...) is the engine's
        return getattr(self.engine, name)

    def generate(self, prompts: Any, params: Any, **kwargs: Any) -> Any:
        from posttrain.generate.client import EndpointError

        started = time.perf_counter()
        try:
            outputs = self.engine.generate(prompts, params, **kwargs)
        except EndpointError as err:
            raise PipelineError(str(err)) from err
        seconds = time.perf_counter() - started
        tokens = sum(c.num_tokens for cs in outputs for c in cs)
        self.console.print(
            f"generated {sum(map(len, outputs))} responses to {len(outputs)} prompts: {tokens:,} tokens in {seconds:.0f} s ({tokens / max(seconds, 1e-9):,.0f} tok/s)"
        )
        return outputs


def _engine(model: str, cfg: PipelineConfig) -> Any:
    """The engine that generates from ``model`` (the starting model, or a directory a stage trained)."""
    from rich.console import Console

    console = Console(stderr=True)
    if cfg.generation.backend == "openai":
        return _LoggedEngine(_client_engine(model, cfg, console), console)
    from posttrain.generate.engine import Engine

    engine = Engine.from_name(model, device=cfg.device, batch_size=cfg.generation.batch_size, template=cfg.template)
    return _LoggedEngine(engine, console)


def _client_engine(model: str, cfg: PipelineConfig, console: Any) -> Any:
    """An :class:`~posttrain.generate.client.OpenAIEngine` on ``generation.base_url`` for ``model``.

    The starting model is the endpoint's ``generation.model`` (default: the pipeline's ``model``). A
    trained model (``sft/merged``, ``dpo/merged``) is loaded by the server from its absolute path, under a
    name made of its stage and a hash of its path and files (:func:`model_fingerprint`): a stage that
    trains again gets a new name, so neither the server nor the request cache mistakes the old weights
    for the new.
    """
    from posttrain.generate.client import EndpointError, OpenAIEngine

    g = cfg.generation
    assert g.base_url is not None  # validated
    cache = Path(g.cache_dir) if g.cache_dir else Path(cfg.output_dir) / "requests"
    start = model == cfg.model
    engine = OpenAIEngine(
        g.base_url,
        (g.model or cfg.model) if start else _served_name(model),
        api_key_env=g.api_key_env,
        concurrency=g.concurrency,
        timeout_s=g.timeout_s,
        max_retries=g.max_retries,
        cache_dir=cache,
        console=console,
    )
    if not start:
        try:
            engine.ensure_model(engine.model_name, str(Path(model).resolve()))
        except EndpointError as err:
            raise PipelineError(str(err)) from err
    return engine


def _served_name(model_dir: str) -> str:
    """The endpoint's name for a model this pipeline trained: ``<stage>-<hash of its absolute path and files>``."""
    path = Path(model_dir).resolve()
    stage = path.parent.name if path.name == "merged" else path.name
    return f"{stage}-{key_of([str(path), model_fingerprint(str(path))])[:12]}"


def rejection_sample(cfg: PipelineConfig, train_prompts: Path, out: Path) -> dict[str, Any]:
    """K samples per prompt from the starting model; the ones that follow every instruction become SFT data.

    ``kept.jsonl``: messages records (user prompt, assistant response), at most ``keep_per_prompt`` per
    prompt, distinct texts, highest strict pass rate first. ``samples.jsonl``: every sample with its
    verdicts, so what was kept and why can be read back.
    """
    from posttrain.generate.params import SamplingParams
    from posttrain.verify.scoring import prefetch, read_prompt_records, score_response

    s = cfg.sample
    records = read_prompt_records(train_prompts)
    params = SamplingParams(
        n=s.k,
        temperature=s.temperature,
        top_p=s.top_p,
        max_new_tokens=cfg.generation.max_new_tokens,
        seed=cfg.seed,
        bf16=cfg.generation.bf16,
    )
    outputs = _engine(cfg.model, cfg).generate([r.prompt for r in records], params)
    prefetch((record, c.text) for record, completions in zip(records, outputs) for c in completions)
    kept, samples, truncated = [], [], 0
    for record, completions in zip(records, outputs):
        scored = []
        for c in completions:
            verdict = score_response(record, c.text)
            rate = sum(i.strict for i in verdict.instructions) / len(verdict.instructions)
            # A response cut by max_new_tokens is not one the model would give: never train on it.
            ok = rate >= s.min_pass_rate and c.finish_reason != "length" and bool(c.text.strip())
            truncated += c.finish_reason == "length"
            samples.append(
                {
                    "key": record.key,
                    "prompt": record.prompt,
                    "response": c.text,
                    "pass_rate": rate,
                    "finish_reason": c.finish_reason,
                    "kept": False,
                }
            )
            scored.append((rate, ok, c.text, len(samples) - 1))
        seen: set[str] = set()
        for rate, ok, text, index in sorted(scored, key=lambda t: -t[0]):
            if ok and text not in seen and len(seen) < s.keep_per_prompt:
                seen.add(text)
                samples[index]["kept"] = True
                kept.append(
                    {
                        "messages": [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": text}],
                        "meta": {"key": record.key, "pass_rate": rate},
                    }
                )
    write_jsonl(out / "samples.jsonl", samples)
    write_jsonl(out / "kept.jsonl", kept)
    info = {
        "prompts": len(records),
        "samples": len(samples),
        "sample_pass_rate": 100 * sum(x["pass_rate"] == 1.0 for x in samples) / max(1, len(samples)),
        "truncated": truncated,
        "kept": len(kept),
        "prompts_with_kept": len({k["meta"]["key"] for k in kept}),
    }
    if not kept:
        raise PipelineError(
            f"rejection sampling kept nothing: none of {len(samples)} samples followed its instructions "
            f"(sample.min_pass_rate {s.min_pass_rate}); raise sample.k or generation.max_new_tokens, or lower sample.min_pass_rate"
        )
    return info


def label_stage(cfg: PipelineConfig, model: str, train_prompts: Path, out: Path, label: LabelStageConfig | None = None) -> dict[str, Any]:
    """``posttrain label --reference-logps`` on the training prompts with the SFT model: ``pairs.jsonl`` and ``summary.json``.

    The SFT model is also DPO's starting point and reference: the log-probs it measured while sampling the
    pairs spare DPO most of its reference forward pass (:func:`posttrain.train.dpo.sampler_reference`).
    With ``generation.backend: openai`` the samples come from the endpoint and no log-probs are recorded
    (they must be measured on the very weights and tokens DPO uses): DPO's reference pass, in this
    process, computes them all.
    """
    from posttrain.data.prompts import read_prompts
    from posttrain.synth.label import label_prompts
    from posttrain.verify.scoring import verifiers_of

    label = label or cfg.label
    prompts = read_prompts(train_prompts, validate=verifiers_of)
    records, summary = label_prompts(
        _engine(model, cfg),
        prompts,
        k=label.k,
        temperature=label.temperature,
        max_new_tokens=cfg.generation.max_new_tokens,
        seed=label.seed,
        bf16=cfg.generation.bf16,
        min_pass_rate=label.min_pass_rate,
        max_rejected_pass_rate=label.max_rejected_pass_rate,
        reference_logps=cfg.generation.backend == "engine",
    )
    write_jsonl(out / "pairs.jsonl", records)
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1))
    if not records:
        raise PipelineError(
            f"labelling made no preference pairs from {summary.prompts} prompts (skipped: {summary.skipped}); raise label.k"
        )
    return {"pairs": summary.pairs, "skipped": summary.skipped}


def grpo_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """The GRPO stage's config sections: the demo's defaults, the pipeline's generation budget and verifiers, then its ``grpo``."""
    own = {"grpo": {"max_new_tokens": cfg.generation.max_new_tokens, "generation_batch_size": cfg.generation.batch_size}}
    if cfg.verifier_libraries:
        own["grpo"]["verifiers"] = cfg.verifier_libraries
    return deep_merge(deep_merge(GRPO_DEFAULTS, own), cfg.grpo)


def train_stage(kind: Literal["sft", "dpo", "grpo"], cfg: PipelineConfig, model: str, data: Path, out: Path) -> dict[str, Any]:
    """SFT, DPO or GRPO from ``model`` on ``data`` into ``out/run``, merged into ``out/merged`` for the next stage."""
    from posttrain.config import GRPOConfig
    from posttrain.train import dpo, grpo, sft

    raw, cls, trainer = {
        "sft": (deep_merge(SFT_DEFAULTS, cfg.sft), SFTConfig, sft.train),
        "dpo": (deep_merge(DPO_DEFAULTS, cfg.dpo_overrides), DPOConfig, dpo.train),
        "grpo": (deep_merge(grpo_settings(cfg), {"data": {"format": "ifeval"}}), GRPOConfig, grpo.train),
    }[kind]
    raw = deep_merge(raw, {"model": {"name": model}, "data": {"path": str(data), "template": cfg.template}, "output_dir": str(out / "run")})
    raw.setdefault("train", {}).setdefault("seed", cfg.seed)
    if cfg.device:
        raw["train"].setdefault("device", cfg.device)
    try:
        config = cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError([f"{kind}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]) from err
    result = trainer(config)
    sft.export(result.run_dir, out / "merged")
    info = {"steps": result.steps, "final_loss": result.losses[-1] if result.losses else None}
    if kind == "grpo":  # the verifiers' mean reward of each step's samples: the curve GRPO climbs
        info |= {
            "first_reward": result.rewards[0] if result.rewards else None,
            "last_reward": result.rewards[-1] if result.rewards else None,
        }
    return info


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)
