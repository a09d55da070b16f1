"""``posttrain demo --seeds N``: the pipeline under N seeds (sampling and training), and how much its gain moves.

Run ``s`` (s = 0 .. N-1) is the same pipeline with ``seed + s`` (rejection sampling, SFT and DPO) and
``label.seed + s`` (the pairs' samples), in ``OUTPUT_DIR/seed-s/`` with its own report; the prompts (built
from ``prompts.seed``) are the same in every run, so the runs' gains are paired by prompt.
``OUTPUT_DIR/seeds.json`` and the printed table give, per split and accuracy, each run's final − start gain (DPO or GRPO),
their mean and range, and the 95% bootstrap interval of the mean gain (prompts resampled once for all runs:
:func:`posttrain.demo.intervals.seed_gain_intervals`).

The stages no seed enters (the prompts, and the starting model's greedy evaluations: ``eval-start`` and, with
``--full-ifeval``, ``eval-full-start``, 20 s and 2.5 minutes on machine F) run once: each later run starts
with seed 0's copies, which its pipeline reuses where their keys match its own (:func:`share_seedless`), so
every run's gains are measured from the same starting scores.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from posttrain.demo.config import EVAL_SPLITS as SPLITS
from posttrain.demo.config import PipelineConfig, eval_stage
from posttrain.demo.intervals import KEYS, seed_gain_intervals


def seed_configs(cfg: PipelineConfig, n: int) -> list[PipelineConfig]:
    root = Path(cfg.output_dir)
    return [
        cfg.model_copy(
            update={
                "seed": cfg.seed + s,
                "output_dir": str(root / f"seed-{s}"),
                "label": cfg.label.model_copy(update={"seed": cfg.label.seed + s}),
            }
        )
        for s in range(n)
    ]


def summarize(runs: list[Path], seeds: list[int]) -> dict[str, Any]:
    per_run = [json.loads((run / "summary.json").read_text()) for run in runs]
    final = per_run[0]["final"]  # the same pipeline in every run: the same final stage
    out: dict[str, Any] = {
        "seeds": seeds,
        "final": final["label"],
        "runs": [str(r) for r in runs],
        "stage_seconds": [s["stage_seconds"] for s in per_run],
        "splits": {},
    }
    for split, _ in SPLITS:
        gains = [s["gain_start_to_final"].get(split) for s in per_run]
        if not all(gains):
            continue
        interval = seed_gain_intervals(runs, split, base=eval_stage(split, "eval-start"), final=eval_stage(split, final["stage"]))
        out["splits"][split] = {
            k: {
                "gains": [g[k] for g in gains],
                "mean": statistics.fmean(g[k] for g in gains),
                "min": min(g[k] for g in gains),
                "max": max(g[k] for g in gains),
                "interval": interval.get(k),
                "start": statistics.fmean(s["scores"]["start"][split][k] for s in per_run),
                "final": statistics.fmean(s["scores"][final["label"]][split][k] for s in per_run),
            }
            for k in KEYS
        }
    return out


SEEDLESS = ("prompts", "eval-start", "eval-full-start")  # stages whose keys hold no seed


def share_seedless(first: Path, other: Path) -> None:
    """Copy ``first``'s finished :data:`SEEDLESS` stages into ``other`` where it has no finished one of its own.
    The pipeline still checks each copy's key, so a copy made for other settings runs again."""
    for name in SEEDLESS:
        if (first / name / "stage.json").is_file() and not (other / name / "stage.json").is_file():
            shutil.rmtree(other / name, ignore_errors=True)
            shutil.copytree(first / name, other / name)


def run_seeds(cfg: PipelineConfig, n: int, *, console: Any) -> dict[str, Any]:
    """Run the pipeline once per seed, then write and print the seeds' summary."""
    from posttrain.demo.pipeline import run

    configs = seed_configs(cfg, n)
    for sub in configs:
        console.rule(f"seed {sub.seed} (label seed {sub.label.seed}) -> {sub.output_dir}")
        if sub is not configs[0]:
            share_seedless(Path(configs[0].output_dir), Path(sub.output_dir))
        run(sub, console=console)
    summary = summarize([Path(c.output_dir) for c in configs], [c.seed for c in configs])
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "seeds.json").write_text(json.dumps(summary, indent=1))
    print_seeds(summary, console)
    return summary


def print_seeds(summary: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for split, title in SPLITS:
        rows = summary["splits"].get(split)
        if not rows:
            continue
        final = summary.get("final", "DPO")
        table = Table(title=f"{title}: {final} − start over {len(summary['seeds'])} seeds, points", title_justify="left")
        for column in ("accuracy", "start", final, "each seed's gain", "mean gain", "95% interval"):
            table.add_column(column, justify="left" if column == "accuracy" else "right")
        for key, r in rows.items():
            ci = r["interval"]
            table.add_row(
                key.replace("_", " "), f"{r['start']:.1f}", f"{r['final']:.1f}", " / ".join(f"{g:+.1f}" for g in r["gains"]), f"{r['mean']:+.1f}",
                f"[{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "",
            )  # fmt: skip
        console.print(table)
    console.print(f"seeds summary: {Path(summary['runs'][0]).parent / 'seeds.json'}; each seed's report in its directory")
