"""95% bootstrap intervals for the demo's accuracies and gains, paired by prompt.

Each evaluation stage writes one line per prompt (its instructions' strict and loose verdicts). An
interval resamples the prompts with replacement, ``RESAMPLES`` times with a fixed seed, recomputes the four
IFEval accuracies (prompt-level: the share of prompts whose every instruction is followed; instruction-
level: followed instructions over all instructions of the resampled prompts) and takes the 2.5th and
97.5th percentiles. A gain (DPO − start) is paired: both models' verdicts on the same resampled prompts,
so the interval reflects which prompts were drawn, not two independent draws. Our own few lines, like
:func:`posttrain.verify.stats.bootstrap_interval`, which does the same for a plain mean.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from posttrain.records import read_jsonl
from posttrain.verify.stats import percentile_interval

RESAMPLES = 1000
LEVEL = 0.95
KEYS = ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose")


def _items(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    return list(read_jsonl(path))


def accuracies(items: list[dict[str, Any]], index: list[int]) -> dict[str, float]:
    """The four accuracies (percent) of the prompts at ``index`` (repeats allowed)."""
    out = {}
    for kind in ("strict", "loose"):
        verdicts = [items[i][kind] for i in index]
        out[f"prompt_{kind}"] = 100 * sum(all(v) for v in verdicts) / len(verdicts)
        out[f"inst_{kind}"] = 100 * sum(sum(v) for v in verdicts) / max(1, sum(len(v) for v in verdicts))
    return out


def _percentiles(samples: list[float]) -> list[float]:
    return list(percentile_interval(samples, level=LEVEL))


def intervals(per_model: dict[str, Path], split: str, *, gain: tuple[str, str] = ("start", "DPO"), seed: int = 0) -> dict[str, Any]:
    """``{"scores": {model: {key: [low, high]}}, "gain": {key: [low, high]}}`` for ``split`` (``{split}.jsonl`` in each
    model's evaluation directory); a model without the file is left out, and the gain needs both of ``gain``."""
    items = {label: found for label, directory in per_model.items() if (found := _items(directory / f"{split}.jsonl"))}
    if not items:
        return {}
    n = len(next(iter(items.values())))
    if any(len(v) != n for v in items.values()):
        raise ValueError(f"{split}: the models were scored on different numbers of prompts ({ {k: len(v) for k, v in items.items()} })")
    rng = random.Random(seed)
    draws = [[rng.randrange(n) for _ in range(n)] for _ in range(RESAMPLES)]
    samples = {label: [accuracies(v, index) for index in draws] for label, v in items.items()}
    out: dict[str, Any] = {"scores": {label: {k: _percentiles([s[k] for s in ss]) for k in KEYS} for label, ss in samples.items()}}
    base, final = gain
    if base in samples and final in samples:
        out["gain"] = {k: _percentiles([b[k] - a[k] for a, b in zip(samples[base], samples[final])]) for k in KEYS}
    return out


def seed_gain_intervals(runs: list[Path], split: str, *, base: str = "eval-start", final: str = "eval-dpo", seed: int = 0) -> dict[str, list[float]]:
    """The 95% interval of the gain averaged over several runs of the pipeline (one per seed) on the same prompts:
    each resample draws prompts once and takes, for every run, its final model's accuracy minus its starting
    model's on them, then the mean over runs. ``{}`` when a run lacks the files."""
    pairs = [(_items(run / base / f"{split}.jsonl"), _items(run / final / f"{split}.jsonl")) for run in runs]
    if not pairs or any(a is None or b is None for a, b in pairs):
        return {}
    n = len(pairs[0][0])
    if any(len(a) != n or len(b) != n for a, b in pairs):
        raise ValueError(f"{split}: the runs were scored on different prompts")
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {k: [] for k in KEYS}
    for _ in range(RESAMPLES):
        index = [rng.randrange(n) for _ in range(n)]
        gains = [(accuracies(a, index), accuracies(b, index)) for a, b in pairs]  # type: ignore[arg-type]
        for k in KEYS:
            samples[k].append(sum(after[k] - before[k] for before, after in gains) / len(gains))
    return {k: _percentiles(v) for k, v in samples.items()}
