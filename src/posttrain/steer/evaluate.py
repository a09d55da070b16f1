"""``posttrain steer eval``: does steering (or InstABoost) make the model follow instructions, and at what cost in fluency?

Per instruction type, five conditions on the same held-out prompts, generated in one batched call:

======================  =================================================================
``absent``              the query alone
``absent+steer``        the query alone, steered toward the type
``present``             the query and its instruction
``present+steer``       the query and its instruction, steered
``present+boost``       the query and its instruction, InstABoost on the instruction
======================  =================================================================

Each is scored by the instruction's verifier (strict, as IFEval's strict accuracy), with a 95% bootstrap
interval, and measured for fluency (:mod:`posttrain.steer.fluency`: perplexity under the unsteered model
after the instructed prompt, and repetition), with the bounds each steered condition is held to
(relative to ``present``, the unsteered model's own answers). The averages over types are of the
per-prompt outcomes pooled. Written out: ``results.json``, ``outputs.jsonl`` (every generation),
``report.html`` (the table) and ``plot.png``.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.generate import Engine, SamplingParams
from posttrain.generate.intervene import Intervention, Mode
from posttrain.steer.fit import Example, Outcome, by_type, generate_outcomes
from posttrain.steer.fluency import DEFAULT_BOUNDS, Bounds, Fluency
from posttrain.steer.vectors import SteeringSet
from posttrain.verify.stats import bootstrap_interval

CONDITIONS: tuple[str, ...] = ("absent", "absent+steer", "present", "present+steer", "present+boost")
LABELS = {
    "absent": "no instruction",
    "absent+steer": "no instruction + steering",
    "present": "instruction",
    "present+steer": "instruction + steering",
    "present+boost": "instruction + InstABoost",
}


def _cell(outcomes: Sequence[Outcome], seed: int) -> dict[str, Any]:
    passes = [o.passed for o in outcomes]
    fluency = Fluency.of([o.nll for o in outcomes], [o.text for o in outcomes])
    lo, hi = bootstrap_interval(passes, seed=seed)
    return {
        "pass": sum(passes) / len(passes) if passes else float("nan"),
        "ci": [lo, hi],
        "n": len(passes),
        "perplexity": fluency.perplexity,
        "repetition": fluency.repetition,
    }


def evaluate(
    engine: Engine,
    steering: SteeringSet,
    examples: Sequence[Example],
    params: SamplingParams,
    *,
    mode: Mode = "adjust",
    weight: float | None = None,
    boost: float | None = None,
    bounds: Bounds = DEFAULT_BOUNDS,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The table (per type and condition) and every generation. ``boost``: InstABoost's m (default: the file's)."""
    groups = by_type(examples)
    unknown = sorted(set(groups) - set(steering.directions))
    if unknown:
        raise ValueError(f"the steering file has no direction for {unknown}; it has {sorted(steering.directions)}")
    m = steering.boost if boost is None else boost
    items: list[tuple[Example, bool, Intervention | None]] = []
    tags: list[tuple[str, str]] = []
    for name, exs in groups.items():
        steer = Intervention((steering.steering(name, mode=mode, weight=weight),))
        boosted = Intervention(boost=m)
        for ex in exs:
            for condition, instructed, iv in (
                ("absent", False, None),
                ("absent+steer", False, steer),
                ("present", True, None),
                ("present+steer", True, steer),
                ("present+boost", True, boosted),
            ):
                items.append((ex, instructed, iv))
                tags.append((name, condition))
    outcomes = generate_outcomes(engine, items, params, progress=progress)
    cells: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for tag, outcome in zip(tags, outcomes):
        cells[tag].append(outcome)

    table: dict[str, Any] = {}
    for i, name in enumerate(groups):
        row = {c: _cell(cells[(name, c)], seed=i) for c in CONDITIONS}
        _mark_fluency(row, bounds)
        d = steering.directions[name]
        table[name] = {"conditions": row, "layer": d.layer}
    pooled = {c: _cell([o for name in groups for o in cells[(name, c)]], seed=len(groups)) for c in CONDITIONS}
    _mark_fluency(pooled, bounds)
    passes = {c: [o.passed for name in groups for o in cells[(name, c)]] for c in CONDITIONS}
    gains = paired_gains(passes)
    results = {
        "model": steering.model,
        "types": table,
        "average": pooled,
        "gains": gains,
        "settings": {"mode": mode, "weight": weight, "instaboost": m, "max_new_tokens": params.max_new_tokens, "prompts_per_type": {k: len(v) for k, v in groups.items()}},
        "bounds": {"perplexity_factor": bounds.perplexity, "repetition_added": bounds.repetition, "relative_to": "present"},
    }
    outputs = [
        {"key": ex.key, "type": tag[0], "condition": tag[1], "text": o.text, "passed": o.passed, "nll": o.nll}
        for (ex, _, _), tag, o in zip(items, tags, outcomes)
    ]
    return results, outputs


GAINS = {
    "steer_without_instruction": ("absent", "absent+steer"),
    "steer_with_instruction": ("present", "present+steer"),
    "boost_with_instruction": ("present", "present+boost"),
}


def paired_gains(passes: dict[str, list[bool]], *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each gain in pass rate (points of 1) with a 95% bootstrap interval over prompts: the conditions ran on the
    same prompts, in the same order, so the interval is of the per-prompt differences."""
    out = {}
    for name, (base, treated) in GAINS.items():
        diffs = [int(b) - int(a) for a, b in zip(passes[base], passes[treated])]
        lo, hi = bootstrap_interval(diffs, seed=seed)
        out[name] = {"gain": sum(diffs) / len(diffs) if diffs else float("nan"), "ci": [lo, hi]}
    return out


def _mark_fluency(row: dict[str, dict[str, Any]], bounds: Bounds) -> None:
    """Each steered condition's fluency limits (from ``present``) and whether it is within them."""
    base = row["present"]
    baseline = Fluency(base["perplexity"], base["repetition"], base["n"])
    ppl, rep = bounds.limits(baseline)
    for c in ("absent+steer", "present+steer", "present+boost"):
        cell = row[c]
        cell["limits"] = {"perplexity": ppl, "repetition": rep}
        cell["fluent"] = bounds.within(Fluency(cell["perplexity"], cell["repetition"], cell["n"]), baseline)


def write_report(results: dict[str, Any], outputs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``results.json``, ``outputs.jsonl``, ``report.html`` and ``plot.png`` in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "outputs.jsonl", out_dir / "report.html", out_dir / "plot.png"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n")
    with paths[1].open("w") as f:
        for row in outputs:
            f.write(json.dumps(row) + "\n")
    paths[2].write_text(_html(results))
    _plot(results, paths[3])
    return paths


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell_html(cell: dict[str, Any]) -> str:
    lo, hi = cell["ci"]
    flag = "" if cell.get("fluent", True) else ' class="over"'
    return (
        f"<td{flag}><b>{_pct(cell['pass'])}</b> <small>[{_pct(lo)}, {_pct(hi)}]</small><br>"
        f"<small>ppl {cell['perplexity']:.2f} · rep {cell['repetition']:.3f}</small></td>"
    )


def _html(results: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(LABELS[c])}</th>" for c in CONDITIONS)
    rows = []
    for name, t in results["types"].items():
        cells = "".join(_cell_html(t["conditions"][c]) for c in CONDITIONS)
        rows.append(f"<tr><th>{html.escape(name)}<br><small>layer {t['layer']}</small></th>{cells}</tr>")
    cells = "".join(_cell_html(results["average"][c]) for c in CONDITIONS)
    rows.append(f"<tr class='avg'><th>all types (pooled)</th>{cells}</tr>")
    b, s = results["bounds"], results["settings"]
    gains = " · ".join(
        f"{k.replace('_', ' ')}: {100 * v['gain']:+.1f} points [{100 * v['ci'][0]:+.1f}, {100 * v['ci'][1]:+.1f}]" for k, v in results["gains"].items()
    )
    return f"""<!doctype html><meta charset="utf-8"><title>posttrain steer eval: {html.escape(results['model'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.4em .6em;text-align:left;vertical-align:top}}
.over{{background:#fde2e2}}.avg{{background:#f3f3f3}}</style>
<h1>Steering and InstABoost: {html.escape(results['model'])}</h1>
<p>Strict pass rate (%) with 95% bootstrap interval; fluency: perplexity under the unsteered model after the instructed prompt, and the share of repeated word 4-grams.
Red: outside the fluency bounds (perplexity above {b['perplexity_factor']:g}× or repetition more than {b['repetition_added']:g} above the unsteered answers to the instructed prompts).</p>
<p>Settings: mode {html.escape(str(s['mode']))}, weight {s['weight'] if s['weight'] is not None else 'as chosen'}, InstABoost m = {s['instaboost']:g}, {s['max_new_tokens']} new tokens.</p>
<p>{html.escape(gains)}</p>
<table><tr><th>type</th>{head}</tr>{''.join(rows)}</table>
"""


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*results["types"], "all (pooled)"]
    rows = [results["types"][n]["conditions"] for n in results["types"]] + [results["average"]]
    width = 0.16
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(names)), 4.5))
    for k, c in enumerate(CONDITIONS):
        xs = [i + (k - 2) * width for i in range(len(names))]
        ys = [100 * r[c]["pass"] for r in rows]
        err = [[100 * (r[c]["pass"] - r[c]["ci"][0]) for r in rows], [100 * (r[c]["ci"][1] - r[c]["pass"]) for r in rows]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=LABELS[c])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.split(":")[-1] for n in names], rotation=20, ha="right")
    ax.set_ylabel("strict pass rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"steering and InstABoost, {results['model']}")
    ax.legend(fontsize=8, ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
