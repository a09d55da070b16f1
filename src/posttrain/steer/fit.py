"""Fitting steering for instruction types: a direction per type and layer, then each type's layer and InstABoost's factor.

The prompts are verifiable prompts whose query and instruction are stored apart (:class:`Example`; the
built-in ones come from :func:`posttrain.synth.verifiable.build_prompts` with ``parts=True``). Two
disjoint sets of queries are used, and neither is ever an evaluation query:

1. **fit** prompts give the directions (:func:`fit_directions`): each prompt through the chat template
   with its instruction and without it (the query alone), the residual stream at the last input token
   after every layer, per layer the normalised mean difference, its norm and c̄ (Stolfo et al.).
2. **validation** prompts choose (:func:`choose`), in one batched generation:

   * each type's **layer**: the query alone, steered with ``adjust`` (the projection on the direction
     set to c̄) at each candidate layer; the layer with the highest strict pass rate among those whose
     text stays fluent (:mod:`posttrain.steer.fluency`, relative to the unsteered model's answers to the
     instructed prompts); ties go to the lower perplexity. A type with no fluent layer gets the most
     fluent one, and the report says so;
   * **InstABoost's factor** ``m`` over 1, 3, ..., 19, on the instructed prompts: the highest pooled
     pass rate among the fluent factors, the smallest on ties (so 1, no boost, unless a boost helps).

Everything measured is kept in the file's report (``SteeringSet.report``) and shown by the command.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.generate import Engine, SamplingParams
from posttrain.generate.intervene import Intervention
from posttrain.records import PromptRecord
from posttrain.steer.fluency import DEFAULT_BOUNDS, Bounds, Fluency, completion_nll
from posttrain.steer.vectors import Direction, SteeringSet, direction, last_token_residuals
from posttrain.verify.scoring import score_response

BOOST_FACTORS: tuple[float, ...] = tuple(float(m) for m in range(1, 20, 2))  # 1, 3, ..., 19 (Guardieiro et al.'s search)
LAYER_SHARES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # candidate layers, as shares of the depth


@dataclass(frozen=True)
class Example:
    """A verifiable prompt with one instruction type, its query and instruction apart."""

    key: str
    type: str
    query: str
    instruction: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def prompt(self) -> str:
        return f"{self.query} {self.instruction}"

    def record(self) -> PromptRecord:
        """What the verifier scores a response against (the instruction's check, whether or not the prompt had it)."""
        return PromptRecord(key=self.key, prompt=self.prompt, instruction_id_list=[self.type], kwargs=[self.kwargs])


def examples_from_records(records: Iterable[dict[str, Any]], where: str) -> list[Example]:
    """Examples from prompt records (JSON lines) with ``query``, ``instruction`` and one instruction id; errors name the line."""
    examples, problems = [], []
    for line, r in enumerate(records, 1):
        missing = [k for k in ("query", "instruction", "instruction_id_list") if not r.get(k)]
        if missing:
            problems.append(f"{where}:{line}: no {', '.join(missing)} (steering needs the query and the instruction stored apart)")
            continue
        ids = r["instruction_id_list"]
        if len(ids) != 1:
            problems.append(f"{where}:{line}: instruction_id_list has {len(ids)} types; steering's prompts have one")
            continue
        kwargs = (r.get("kwargs") or [{}])[0] or {}
        examples.append(Example(str(r.get("key", line)), ids[0], r["query"], r["instruction"], kwargs))
    if problems:
        raise ValueError("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return examples


def by_type(examples: Iterable[Example]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        out[ex.type].append(ex)
    return dict(out)


@dataclass(frozen=True)
class Outcome:
    """One generation: its text, whether it followed the instruction (strict), its fluency figures."""

    text: str
    passed: bool
    nll: float  # mean per-token negative log-likelihood under the unsteered model, after the instructed prompt


def generate_outcomes(
    engine: Engine,
    items: Sequence[tuple[Example, bool, Intervention | None]],
    params: SamplingParams,
    *,
    progress: bool = True,
) -> list[Outcome]:
    """Generate each (example, with its instruction?, intervention) in one batched call, score and measure it."""
    prompts = [ex.prompt if instructed else ex.query for ex, instructed, _ in items]
    interventions = [iv for _, _, iv in items]
    boosted = any(iv is not None and iv.boost != 1 for iv in interventions)
    instructions = [ex.instruction if instructed else None for ex, instructed, _ in items] if boosted else None
    completions = engine.generate(prompts, params, progress=progress, intervention=interventions, instructions=instructions)
    texts = [c[0].text for c in completions]
    with torch.inference_mode():
        nlls = completion_nll(
            engine.model,
            engine.encode([ex.prompt for ex, _, _ in items]),
            [c[0].token_ids for c in completions],
            batch_size=max(1, engine.batch_size // 2),
            pad_id=engine.pad_token_id,
        )
    return [Outcome(t, score_response(ex.record(), t).strict, nll) for (ex, _, _), t, nll in zip(items, texts, nlls)]


def fit_directions(engine: Engine, examples: Sequence[Example], *, batch_size: int = 16) -> dict[str, Direction]:
    """Each type's direction at every layer, from its examples with and without their instruction."""
    out = {}
    model = engine.model
    was_training = model.training
    model.eval()
    try:
        for name, exs in by_type(examples).items():
            with_ids = engine.encode([ex.prompt for ex in exs])
            without_ids = engine.encode([ex.query for ex in exs])
            w = last_token_residuals(model, with_ids, batch_size=batch_size, pad_id=engine.pad_token_id)
            wo = last_token_residuals(model, without_ids, batch_size=batch_size, pad_id=engine.pad_token_id)
            out[name] = direction(w, wo)
    finally:
        model.train(was_training)
    return out


def candidate_layers(layers: int) -> list[int]:
    """The layers tried by default: a fifth to seven tenths of the way up (Stolfo et al. found their best in the middle)."""
    return sorted({min(layers - 1, max(0, round(share * layers))) for share in LAYER_SHARES})


def _summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    fluency = Fluency.of([o.nll for o in outcomes], [o.text for o in outcomes])
    return {
        "pass": sum(o.passed for o in outcomes) / len(outcomes) if outcomes else math.nan,
        "n": len(outcomes),
        "perplexity": fluency.perplexity,
        "repetition": fluency.repetition,
    }


def _fluency(summary: dict[str, Any]) -> Fluency:
    return Fluency(summary["perplexity"], summary["repetition"], summary["n"])


def choose(
    engine: Engine,
    steering: SteeringSet,
    validation: Sequence[Example],
    params: SamplingParams,
    *,
    layers: Sequence[int],
    factors: Sequence[float] = BOOST_FACTORS,
    boost_per_type: int = 6,
    bounds: Bounds = DEFAULT_BOUNDS,
    progress: bool = True,
) -> dict[str, Any]:
    """Choose each type's layer and the InstABoost factor on ``validation``; sets them on ``steering`` and returns what was measured."""
    groups = by_type(validation)
    items: list[tuple[Example, bool, Intervention | None]] = []
    tags: list[tuple[str, str, Any]] = []  # (type, what, value) per item
    for name, exs in groups.items():
        for ex in exs:
            items.append((ex, True, None))
            tags.append((name, "instructed", None))
            items.append((ex, False, None))
            tags.append((name, "absent", None))
            for layer in layers:
                items.append((ex, False, Intervention((steering.steering(name, mode="adjust", layer=layer),))))
                tags.append((name, "layer", layer))
        for ex in exs[:boost_per_type]:
            for m in factors:
                if m != 1:
                    items.append((ex, True, Intervention(boost=m)))
                    tags.append((name, "boost", m))
    outcomes = generate_outcomes(engine, items, params, progress=progress)
    cells: dict[tuple[str, str, Any], list[Outcome]] = defaultdict(list)
    for tag, outcome in zip(tags, outcomes):
        cells[tag].append(outcome)

    report: dict[str, Any] = {"bounds": {"perplexity_factor": bounds.perplexity, "repetition_added": bounds.repetition}, "types": {}}
    for name, exs in groups.items():
        baseline = _summary(cells[(name, "instructed", None)])
        tried = {}
        for layer in layers:
            s = _summary(cells[(name, "layer", layer)])
            s["fluent"] = bounds.within(_fluency(s), _fluency(baseline))
            tried[layer] = s
        fluent = [layer for layer in layers if tried[layer]["fluent"]]
        if fluent:  # the best pass rate among fluent layers, the lower perplexity on ties
            chosen = min(fluent, key=lambda layer, t=tried: (-t[layer]["pass"], t[layer]["perplexity"]))
        else:  # none fluent: the most fluent, flagged in the report
            chosen = min(layers, key=lambda layer, t=tried: t[layer]["perplexity"])
        steering.directions[name].layer = chosen
        report["types"][name] = {
            "instructed": baseline,
            "absent": _summary(cells[(name, "absent", None)]),
            "layers": {str(layer): s for layer, s in tried.items()},
            "layer": chosen,
            "fluent_layer_found": bool(fluent),
            "validation_prompts": len(exs),
        }
    # InstABoost: pooled over types, on the first boost_per_type instructed prompts of each
    boost_rows: dict[float, list[Outcome]] = {1.0: [o for name, exs in groups.items() for o in cells[(name, "instructed", None)][:boost_per_type]]}
    for m in factors:
        if m != 1:
            boost_rows[m] = [o for name in groups for o in cells[(name, "boost", m)]]
    baseline = _summary(boost_rows[1.0])
    tried_boost = {}
    for m, rows in boost_rows.items():
        s = _summary(rows)
        s["fluent"] = bounds.within(_fluency(s), _fluency(baseline))
        tried_boost[m] = s
    best = min((m for m in tried_boost if tried_boost[m]["fluent"]), key=lambda m: (-tried_boost[m]["pass"], m))
    steering.boost = best
    report["boost"] = {"factors": {f"{m:g}": s for m, s in sorted(tried_boost.items())}, "chosen": best}
    return report


def fit_steering(
    engine: Engine,
    model_name: str,
    fit: Sequence[Example],
    validation: Sequence[Example],
    params: SamplingParams,
    *,
    layers: Sequence[int] | None = None,
    factors: Sequence[float] = BOOST_FACTORS,
    boost_per_type: int = 6,
    bounds: Bounds = DEFAULT_BOUNDS,
    progress: bool = True,
) -> SteeringSet:
    """Directions from ``fit``, layers and the boost chosen on ``validation`` (their queries must differ)."""
    overlap = {ex.query for ex in fit} & {ex.query for ex in validation}
    if overlap:
        raise ValueError(f"{len(overlap)} queries are in both the fit and the validation prompts, e.g. {min(overlap)[:80]!r}")
    missing = sorted(set(by_type(validation)) - set(by_type(fit)))
    if missing:
        raise ValueError(f"validation prompts of types with no fit prompts: {missing}")
    steering = SteeringSet(model_name, fit_directions(engine, fit, batch_size=max(1, engine.batch_size // 2)))
    n_layers = engine.model.config.num_hidden_layers
    layers = list(layers) if layers else candidate_layers(n_layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's {n_layers} layers")
    report = choose(engine, steering, validation, params, layers=layers, factors=factors, boost_per_type=boost_per_type, bounds=bounds, progress=progress)
    report |= {"fit_prompts": len(fit), "validation_prompts": len(validation), "max_new_tokens": params.max_new_tokens}
    steering.report = report
    return steering
