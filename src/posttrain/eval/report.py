"""One HTML report for every evaluation in the shared results format (:mod:`posttrain.eval.results`).

``report.html`` holds the headline table (each model's metrics, each with its 95% interval and count),
a plot (the ``plot_metric`` per group — MT-Bench category, FollowBench level — as grouped bars with
error bars, one colour per model; without groups, the first headline metric per model with its
interval), one table per model's groups, the notes (what the numbers mean, what was left out and why)
and the first items as asked, answered and judged. The plot is a matplotlib PNG saved beside the page
(``plot.png``) and embedded as a data URI; the page is plain HTML and CSS, no scripts, so it opens
anywhere, offline. Our own page: it renders this package's results shape.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from posttrain.eval.results import Metric, Results

COLORS = ("#4c78a8", "#e45756", "#54a24b", "#f58518", "#b279a2", "#9d755d", "#72b7b2", "#9aa5b1")
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1050px; margin: 2em auto; color: #1f2933; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 14px; }
th, td { border-bottom: 1px solid #e4e7eb; padding: .3em .7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.muted { color: #616e7c; font-size: 13px; } img { max-width: 100%; }
.item { border: 1px solid #e4e7eb; border-radius: 6px; padding: .6em; margin: .6em 0; font-size: 13px; }
.text { white-space: pre-wrap; background: #f8fafc; padding: .4em; border-radius: 4px; max-height: 14em; overflow: auto; }
"""
ITEMS_SHOWN = 6


def _metric_cell(metric: Metric | None) -> str:
    if metric is None:
        return "<td></td>"
    n = f" <span class=muted>n={metric.n}</span>" if metric.n and not metric.count else ""
    return f"<td>{html.escape(str(metric))}{n}</td>"


def _table(rows: dict[str, dict[str, Metric]], first: str) -> str:
    columns = list(dict.fromkeys(k for metrics in rows.values() for k in metrics))
    head = f"<tr><th>{html.escape(first)}</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(_metric_cell(metrics.get(c)) for c in columns) + "</tr>" for name, metrics in rows.items())
    return f"<table>{head}{body}</table>"


def _finite(x: float | None) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def plot(results: Results, path: Path) -> Path | None:
    """Grouped bars with 95% error bars: ``plot_metric`` per group per model, else the first headline metric per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results.models)
    metric = results.plot_metric
    groups = list(dict.fromkeys(g for m in models for g in results.groups.get(m, {}))) if metric else []
    if groups:
        cells = {m: [results.groups.get(m, {}).get(g, {}).get(metric) for g in groups] for m in models}
        labels, ylabel = groups, metric
    else:
        metric = next((k for m in models for k in results.models[m]), "")
        cells = {m: [results.models[m].get(metric)] for m in models}
        labels, ylabel = [metric], metric
    if not metric or not any(_finite(c.value) for cs in cells.values() for c in cs if c is not None):
        return None
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) * max(1, len(models)) ** 0.5 + 2), 3.8), dpi=110)
    for k, m in enumerate(models):
        xs, ys, lower, upper = [], [], [], []
        for j, c in enumerate(cells[m]):
            if c is None or not _finite(c.value):
                continue
            xs.append(j + (k - (len(models) - 1) / 2) * width)
            ys.append(c.value)
            lower.append(c.value - c.low if c.low is not None else 0.0)
            upper.append(c.high - c.value if c.high is not None else 0.0)
        ax.bar(xs, ys, width=width, color=COLORS[k % len(COLORS)], label=m, yerr=[lower, upper], capsize=3, ecolor="#323f4b")
    ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 5 else 0, fontsize=9)
    ax.set_ylabel(f"{ylabel} (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    if len(models) > 1:
        ax.legend(fontsize=8)
    ax.set_title(f"{results.benchmark}: {ylabel}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _item(item: dict[str, Any]) -> str:
    parts = []
    for key, value in item.items():
        if isinstance(value, (dict, list)):
            continue
        text = html.escape(str(value))
        block = isinstance(value, str) and (len(value) > 80 or "\n" in value)
        parts.append(f"<div><b>{html.escape(key)}</b>: " + (f"<div class=text>{text}</div>" if block else text) + "</div>")
    return f"<div class=item>{''.join(parts)}</div>"


def render(results: Results, figure: Path | None) -> str:
    settings = ", ".join(f"{k}: {v}" for k, v in results.settings.items() if not isinstance(v, (dict, list)))
    image = ""
    if figure is not None and figure.exists():
        data = base64.b64encode(figure.read_bytes()).decode()
        image = f'<img alt="{html.escape(results.benchmark)} plot" src="data:image/png;base64,{data}">'
    groups = "".join(
        f"<h2>{html.escape(model)} by group</h2>{_table(gs, 'group')}" for model, gs in results.groups.items() if gs
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in results.notes)
    items = "".join(_item(i) for i in results.items[:ITEMS_SHOWN])
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>posttrain {html.escape(results.benchmark)} report</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(results.benchmark)}</h1>
<p class=muted>{html.escape(settings)}</p>
<h2>Headline (95% bootstrap intervals in brackets)</h2>{_table(results.models, "model")}
{image}
{groups}
<h2>What the numbers mean</h2><ul>{notes}</ul>
<h2>First items ({min(ITEMS_SHOWN, len(results.items))} of {len(results.items)}; all in items.jsonl)</h2>{items}
</body></html>
"""


def write_report(results: Results, directory: str | Path) -> Path:
    """``report.html`` (and ``plot.png``) under ``directory``; returns the page's path."""
    root = Path(directory)
    figure = plot(results, root / "plot.png")
    page = root / "report.html"
    page.write_text(render(results, figure), encoding="utf-8")
    return page
