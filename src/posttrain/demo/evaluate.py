"""The pipeline's eval stages: greedy responses to the test, development and IFEval prompts, scored; steered if asked.

:func:`evaluate_model` scores the built splits and the IFEval subset at ``generation.max_new_tokens``;
:func:`evaluate_full_ifeval` all 541 IFEval prompts at ``full_ifeval.max_new_tokens`` (lm-eval's 1280), once
as a whole and once on the 421 never used for a choice.

With a ``steer:`` section (:class:`~posttrain.demo.config.SteerConfig`), each prompt is steered toward
its instruction types the steering file has and, with ``instaboost``, its instruction (kept apart in the
built prompts) gets InstABoost; the IFEval subset, which keeps no instruction apart, is steered only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from posttrain.demo.config import PipelineConfig


def evaluate_model(engine: Any, model: str, prompts: Path, out: Path, cfg: PipelineConfig) -> dict[str, Any]:
    """Greedy responses of ``engine`` (``model``) to the test, development and IFEval prompts, scored strict and loose:
    ``scores.json`` and per-item files."""
    from posttrain.demo.config import EVAL_SPLITS, FULL_IFEVAL_SPLITS
    from posttrain.verify.scoring import read_prompt_records

    names = [
        n
        for n, _ in EVAL_SPLITS
        if n not in FULL_IFEVAL_SPLITS and (prompts / f"{n}.jsonl").exists() and (prompts / f"{n}.jsonl").stat().st_size
    ]
    sets = {name: read_prompt_records(prompts / f"{name}.jsonl") for name in names}
    return _generate_and_score(engine, model, sets, cfg.generation.max_new_tokens, prompts, out, cfg)


def evaluate_full_ifeval(engine: Any, model: str, out: Path, cfg: PipelineConfig) -> dict[str, Any]:
    """Greedy responses of ``engine`` to all 541 IFEval prompts at ``full_ifeval.max_new_tokens``, scored on all of
    them (``ifeval_all``) and on the 421 never used for a choice (``ifeval_unused``): one generation, two scores."""
    from posttrain.demo.ifeval_subset import ifeval_all, ifeval_unused
    from posttrain.eval import ifeval
    from posttrain.records import PromptRecord, read_jsonl

    everything = [PromptRecord.model_validate(r) for r in ifeval_all()]
    result = _generate_and_score(engine, model, {"ifeval_all": everything}, cfg.full_ifeval.max_new_tokens, None, out, cfg)
    unused = {r["key"] for r in ifeval_unused()}
    texts = {item["key"]: item["response"] for item in read_jsonl(out / "ifeval_all.jsonl") if item["key"] in unused}
    records = [r for r in everything if r.key in unused]
    scored = ifeval.score(records, [texts[r.key] for r in records])
    ifeval.write_per_item(out / "ifeval_unused.jsonl", scored)
    scores = json.loads((out / "scores.json").read_text()) | {"ifeval_unused": summary_dict(scored.summary)}
    (out / "scores.json").write_text(json.dumps(scores, indent=1))
    return result | {"ifeval_unused_prompt_loose": scores["ifeval_unused"]["prompt_loose"]}


def _generate_and_score(
    engine: Any, model: str, sets: dict[str, list[Any]], max_new_tokens: int, prompts: Path | None, out: Path, cfg: PipelineConfig
) -> dict[str, Any]:
    from posttrain.eval import ifeval
    from posttrain.generate.params import SamplingParams
    from posttrain.records import read_jsonl

    names = list(sets)
    records = [r for rs in sets.values() for r in rs]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, bf16=cfg.generation.bf16)
    kwargs: dict[str, Any] = {}
    if cfg.steer.active:
        from posttrain.steer.vectors import SteeringSet

        # IFEval's own prompts (the subset, or all of them with no prompts directory) keep no instruction apart
        files = [read_jsonl(prompts / f"{name}.jsonl") for name in names] if prompts else [[{}] * len(records)]
        instructions = [raw.get("instruction") for lines in files for raw in lines]
        steering = SteeringSet.load(cfg.steer.file) if cfg.steer.file else None
        s = cfg.steer
        interventions = ifeval.prompt_interventions(records, steering, s.mode, s.weight, s.instaboost, instructions)
        kwargs = {"intervention": interventions, "instructions": instructions if s.instaboost != 1 else None}
    outputs = engine.generate([r.prompt for r in records], params, **kwargs)
    texts = iter([c[0].text for c in outputs])
    scores: dict[str, Any] = {}
    for name, rs in sets.items():
        result = ifeval.score(rs, [next(texts) for _ in rs])
        ifeval.write_per_item(out / f"{name}.jsonl", result)
        scores[name] = summary_dict(result.summary)
    (out / "scores.json").write_text(json.dumps(scores, indent=1))
    return {"model": model, **{f"{n}_prompt_loose": s["prompt_loose"] for n, s in scores.items()}}


def summary_dict(s: Any) -> dict[str, Any]:
    """IFEval scores in percent, with per-type instruction-level accuracy."""
    return {
        "prompt_strict": 100 * s.prompt_strict,
        "inst_strict": 100 * s.inst_strict,
        "prompt_loose": 100 * s.prompt_loose,
        "inst_loose": 100 * s.inst_loose,
        "prompts": s.num_prompts,
        "instructions": s.num_instructions,
        "per_type": {t: {"count": v.count, "strict": 100 * v.strict, "loose": 100 * v.loose} for t, v in s.per_type.items()},
    }
