"""One results format for every evaluation (MT-Bench, win rates, FollowBench, arena): per item, per model, with intervals.

A run directory holds ``results.json`` (what was run, each model's headline metrics and per-group metrics,
each a value with its 95% interval and count), ``items.jsonl`` (one line per item and model: what was asked,
answered and judged) and ``report.html`` (:mod:`posttrain.eval.report`). Readers, plots and the report
only ever see this shape, whatever the benchmark.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.records import read_jsonl, write_jsonl
from posttrain.verify.stats import bootstrap_interval


@dataclass(frozen=True)
class Metric:
    """A figure with its 95% interval (``low``/``high`` None where none applies) over ``n`` items; ``count``: a count of the n."""

    value: float
    low: float | None = None
    high: float | None = None
    n: int = 0
    count: bool = False

    def __str__(self) -> str:
        if self.count:
            return f"{self.value:.0f} of {self.n}"
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return "n/a"
        text = f"{self.value:.2f}" if abs(self.value) < 100 else f"{self.value:.0f}"
        if self.low is not None and self.high is not None:
            text += f" [{self.low:.2f}, {self.high:.2f}]" if abs(self.value) < 100 else f" [{self.low:.0f}, {self.high:.0f}]"
        return text


def mean_metric(values: Sequence[float], *, scale: float = 1.0, seed: int = 0) -> Metric:
    """The mean of ``values`` (times ``scale``) with its seeded percentile-bootstrap 95% interval."""
    if not values:
        return Metric(float("nan"), None, None, 0)
    low, high = bootstrap_interval(values, seed=seed)
    return Metric(scale * sum(values) / len(values), scale * low, scale * high, len(values))


@dataclass
class Results:
    """``models[model][metric]``: headline figures; ``groups[model][group][metric]``: per category or level."""

    benchmark: str
    settings: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Metric]] = field(default_factory=dict)
    groups: dict[str, dict[str, dict[str, Metric]]] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Which metric the report's plot shows per group, and how it is named.
    plot_metric: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "settings": self.settings,
            "models": {m: {k: asdict(v) for k, v in metrics.items()} for m, metrics in self.models.items()},
            "groups": {m: {g: {k: asdict(v) for k, v in ms.items()} for g, ms in gs.items()} for m, gs in self.groups.items()},
            "notes": self.notes,
            "plot_metric": self.plot_metric,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], items: list[dict[str, Any]] | None = None) -> Results:
        def metrics(d: dict[str, Any]) -> dict[str, Metric]:
            return {k: Metric(**v) for k, v in d.items()}

        return cls(
            benchmark=data["benchmark"],
            settings=data.get("settings", {}),
            models={m: metrics(ms) for m, ms in data.get("models", {}).items()},
            groups={m: {g: metrics(ms) for g, ms in gs.items()} for m, gs in data.get("groups", {}).items()},
            items=items or [],
            notes=list(data.get("notes", [])),
            plot_metric=data.get("plot_metric", ""),
        )

    def write(self, directory: str | Path, *, report: bool = True) -> Path:
        """``results.json``, ``items.jsonl`` and (with ``report``) ``report.html`` plus its plot under ``directory``."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        (root / "results.json").write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_jsonl(root / "items.jsonl", self.items)
        if report:
            from posttrain.eval.report import write_report

            write_report(self, root)
        return root


def read_results(directory: str | Path) -> Results:
    root = Path(directory)
    data = json.loads((root / "results.json").read_text(encoding="utf-8"))
    items_path = root / "items.jsonl"
    items = list(read_jsonl(items_path)) if items_path.is_file() else []
    return Results.from_dict(data, items)


def merge(parts: Sequence[Results]) -> Results:
    """One :class:`Results` of several runs of the same benchmark, one model each (e.g. FollowBench per model)."""
    if not parts:
        raise ValueError("merge: no results")
    first = parts[0]
    settings = {k: v for k, v in first.settings.items() if k != "model"}
    merged = Results(first.benchmark, settings={**settings, "models": [m for p in parts for m in p.models]}, plot_metric=first.plot_metric)
    for part in parts:
        if part.benchmark != first.benchmark:
            raise ValueError(f"merge: {part.benchmark} results with {first.benchmark} ones")
        merged.models |= part.models
        merged.groups |= part.groups
        merged.items += part.items
        merged.notes += [n for n in part.notes if n not in merged.notes]
    return merged
