"""The pipeline's eval stages: greedy responses to the held-out prompts and the IFEval subset, scored; steered if asked.

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
    from posttrain.demo.config import EVAL_SPLITS
    from posttrain.eval import ifeval
    from posttrain.generate.params import SamplingParams
    from posttrain.records import read_jsonl
    from posttrain.verify.scoring import read_prompt_records

    names = [name for name, _ in EVAL_SPLITS if (prompts / f"{name}.jsonl").exists() and (prompts / f"{name}.jsonl").stat().st_size]
    sets = {name: read_prompt_records(prompts / f"{name}.jsonl") for name in names}
    records = [r for rs in sets.values() for r in rs]
    params = SamplingParams(max_new_tokens=cfg.generation.max_new_tokens, temperature=0.0, bf16=cfg.generation.bf16)
    kwargs: dict[str, Any] = {}
    if cfg.steer.active:
        from posttrain.steer.vectors import SteeringSet

        instructions = [raw.get("instruction") for name in names for raw in read_jsonl(prompts / f"{name}.jsonl")]
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
