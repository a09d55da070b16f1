"""The pipeline's report: ``summary.json``, a printed table, and a self-contained ``report.html``.

The page has the headline tables (start, SFT and DPO models on the frozen test prompts, the development
prompts and the IFEval subset, each named as such), what each stage made and how long it took, plots (pass
rate per instruction type, the headline accuracies, SFT and DPO training curves; matplotlib PNGs embedded as
data URIs, also saved beside the page) and development-prompt responses before and after for the same
prompts. Plain HTML and CSS, no scripts, so it opens anywhere and renders the same in a headless browser (:func:`screenshot`).
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from posttrain.demo.config import EVAL_SPLITS, FULL_IFEVAL_SPLITS, eval_stage, round_stages
from posttrain.demo.intervals import intervals
from posttrain.records import read_jsonl

MODELS = (("start", "eval-start"), ("SFT", "eval-sft"), ("DPO", "eval-dpo"))  # with final_stage grpo: ("GRPO", "eval-grpo")


def models_of(summary: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(label, eval stage) of the start, SFT and final models of the run ``summary`` describes."""
    final = summary.get("final") or {"label": "DPO", "stage": "eval-dpo"}
    return (*MODELS[:2], (final["label"], final["stage"]))


SHORT = {
    "test": "Test",
    "heldout": "Development",
    "invented": "Invented",
    "ifeval": "IFEval",
    "ifeval_unused": "Unused IFEval",
    "ifeval_all": "All-IFEval",
}  # in the lead
TICK = {
    "test": "test",
    "heldout": "dev",
    "invented": "invented",
    "ifeval": "IFEval",
    "ifeval_unused": "IFEval\nunused",
    "ifeval_all": "IFEval\nall",
}  # under the bars
HEADLINE = (
    ("prompt_strict", "prompt strict"),
    ("inst_strict", "inst strict"),
    ("prompt_loose", "prompt loose"),
    ("inst_loose", "inst loose"),
)
COLORS = ("#9aa5b1", "#4c78a8", "#e45756")


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def collect(root: Path, cfg: Any, timings: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Everything the report shows, as JSON-able data (also ``summary.json``)."""
    final = {"label": getattr(cfg, "final_label", "DPO"), "stage": f"eval-{getattr(cfg, 'final_stage', 'dpo')}"}
    models = models_of({"final": final})
    scores = {
        label: _json(root / stage / "scores.json") | _json(root / eval_stage("ifeval_all", stage) / "scores.json")
        for label, stage in models
    }
    gain = {}
    for split, _ in EVAL_SPLITS:
        if scores["start"].get(split) and scores[final["label"]].get(split):
            gain[split] = {k: scores[final["label"]][split][k] - scores["start"][split][k] for k, _ in HEADLINE}
    return {
        "model": cfg.model,
        "final": final,
        "output_dir": str(root),
        "seconds": seconds,
        "stage_seconds": sum(t["seconds"] for t in timings.values()),
        "scores": scores,
        "gain_start_to_final": gain,
        # 95% bootstrap intervals, paired by prompt: {split: {"scores": {model: {key: [low, high]}}, "gain": {key: [low, high]}}}
        "intervals": {
            split: found
            for split, _ in EVAL_SPLITS
            if (
                found := intervals(
                    {label: root / eval_stage(split, stage) for label, stage in models}, split, gain=("start", final["label"])
                )
            )
        },
        "prompts": _json(root / "prompts" / "stage.json"),
        "sample": {k: v for k, v in _json(root / "sample" / "stage.json").items() if k not in ("inputs",)},
        "label": _json(root / "label" / "summary.json"),
        "sft": {k: v for k, v in _json(root / "sft" / "stage.json").items() if k in ("steps", "final_loss")},
        "dpo": {k: v for k, v in _json(root / "dpo" / "stage.json").items() if k in ("steps", "final_loss")},
        "grpo": {
            k: v for k, v in _json(root / "grpo" / "stage.json").items() if k in ("steps", "final_loss", "first_reward", "last_reward")
        },
        # every DPO round (dpo.rounds): its pairs and its training; round 1 is "label" and "dpo" above too
        "rounds": [
            {
                "label": _json(root / label_name / "summary.json"),
                "dpo": {k: v for k, v in _json(root / dpo_name / "stage.json").items() if k in ("steps", "final_loss")},
            }
            for label_name, dpo_name in _round_dirs(cfg)
        ],
        "stages": timings,
        "invented": _invented_rows(cfg, scores),
    }


def _invented_rows(cfg: Any, scores: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """With ``synth.autoif``: one row per invented verifier (where it came from, each model's pass rate)."""
    synth = getattr(cfg, "synth", None)
    if synth is None or not synth.autoif:
        return []
    from posttrain.demo.invented import load_checks, verifier_rows

    return verifier_rows(load_checks(synth.autoif), scores)


def _round_dirs(cfg: Any) -> list[tuple[str, str]]:
    """The (label, DPO) stage names of each DPO round the pipeline ran (``dpo.rounds``; 1 when the config has none)."""
    return [round_stages(n) for n in range(1, getattr(cfg, "dpo_rounds", 1) + 1)]


def write(root: Path, cfg: Any, timings: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Write ``summary.json``, ``report/*.png`` and ``report.html`` under ``root``; returns the summary."""
    summary = collect(root, cfg, timings, seconds)
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    plots = root / "report"
    plots.mkdir(exist_ok=True)
    figures = {
        "per_type": plot_per_type(summary, plots / "per_type.png"),
        "headline": plot_headline(summary, plots / "headline.png"),
        "training": plot_training(root, plots / "training.png", cfg),
    }
    (root / "report.html").write_text(render_html(root, cfg, summary, figures), encoding="utf-8")
    return summary


def print_summary(summary: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for split, title in EVAL_SPLITS:
        table = Table(title=f"{title}, %", title_justify="left")
        table.add_column("model")
        for _, name in HEADLINE:
            table.add_column(name, justify="right")
        for label, _ in models_of(summary):
            s = summary["scores"][label].get(split)
            if s:
                table.add_row(label, *(f"{s[k]:.1f}" for k, _ in HEADLINE))
        if split in summary["gain_start_to_final"]:
            ci = summary.get("intervals", {}).get(split, {}).get("gain", {})
            table.add_row(
                f"{summary['final']['label']} − start",
                *(f"{summary['gain_start_to_final'][split][k]:+.1f}" + _ci(ci.get(k), signed=True) for k, _ in HEADLINE),
                style="bold",
            )
        if table.row_count:
            console.print(table)
    console.print(
        f"report: {Path(summary['output_dir']) / 'report.html'}   (this run {summary['seconds'] / 60:.1f} min; all stages {summary['stage_seconds'] / 60:.1f} min)"
    )


# -- plots ---------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_type(summary: dict[str, Any], path: Path) -> Path | None:
    """Held-out instruction-level loose pass rate per instruction type, one bar per model."""
    from posttrain.synth.verifiable import type_label

    models = models_of(summary)
    per = {label: summary["scores"][label].get("heldout", {}).get("per_type", {}) for label, _ in models}
    types = sorted(per["start"] or per[models[-1][0]], key=lambda t: per["start"].get(t, {}).get("loose", 0))
    if not types:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(types) + 1.4), dpi=110)
    for i, ((label, _), color) in enumerate(zip(models, COLORS)):
        ys = [j + (1 - i) * 0.27 for j in range(len(types))]
        ax.barh(ys, [per[label].get(t, {}).get("loose", 0) for t in types], height=0.27, color=color, label=label)
    ax.set_yticks(range(len(types)), [f"{type_label(t)} ({per['start'].get(t, {}).get('count', 0)})" for t in types], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("instructions followed, development prompts, loose (%)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _ci(interval: list[float] | None, *, signed: bool = False) -> str:
    """`` [low, high]`` of a 95% interval, or nothing."""
    if not interval:
        return ""
    return f" [{interval[0]:+.1f}, {interval[1]:+.1f}]" if signed else f" [{interval[0]:.1f}, {interval[1]:.1f}]"


def plot_headline(summary: dict[str, Any], path: Path) -> Path | None:
    groups = [
        (split, key, f"{TICK[split]}\n{name}")
        for split, _ in EVAL_SPLITS
        for key, name in HEADLINE
        if summary["scores"]["start"].get(split)
    ]
    if not groups:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(9, 0.85 * len(groups)), 3.6), dpi=110)
    for i, ((label, _), color) in enumerate(zip(models_of(summary), COLORS)):
        scored = [summary["scores"][label].get(split, {}).get(key) for split, key, _ in groups]  # None: not scored (SFT on all of IFEval)
        values = [v or 0 for v in scored]
        cis = [summary.get("intervals", {}).get(split, {}).get("scores", {}).get(label, {}).get(key) for split, key, _ in groups]
        errors = [[v - c[0] if c else 0 for v, c in zip(values, cis)], [c[1] - v if c else 0 for v, c in zip(values, cis)]]
        bars = ax.bar(
            [j + (i - 1) * 0.27 for j in range(len(groups))],
            values,
            width=0.27,
            color=color,
            label=label,
            yerr=errors,
            capsize=2,
            ecolor="#323f4b",
        )
        ax.bar_label(bars, labels=["" if v is None else f"{v:.0f}" for v in scored], fontsize=6)
    ax.set_xticks(range(len(groups)), [g[2] for g in groups], fontsize=7)
    ax.set_ylabel("% (95% bootstrap intervals)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncols=3, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _sft_panel(ax: Any, sft: list[dict[str, Any]]) -> None:
    ax.plot([r["step"] for r in sft], [r["loss"] for r in sft], color=COLORS[1], lw=1.5)
    ax.set_title("SFT on verified samples", fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.grid(alpha=0.3)


def plot_training(root: Path, path: Path, cfg: Any = None) -> Path | None:
    """SFT loss; DPO loss and reward accuracy; per optimizer step (DPO rounds in turn, a dotted line between them)."""
    from posttrain.train.loop import read_metrics

    if getattr(cfg, "final_stage", "dpo") == "grpo":
        return _plot_sft_and_grpo(read_metrics(root / "sft" / "run"), read_metrics(root / "grpo" / "run"), path)
    sft, dpo, bounds = read_metrics(root / "sft" / "run"), [], []
    for _, dpo_name in _round_dirs(cfg):  # rounds one after another on one step axis
        offset = dpo[-1]["step"] if dpo else 0
        dpo += [{**r, "step": r["step"] + offset} for r in read_metrics(root / dpo_name / "run")]
        bounds.append(dpo[-1]["step"] if dpo else 0)
    if not sft and not dpo:
        return None
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=110)
    _sft_panel(a, sft)
    if dpo:
        b.plot([r["step"] for r in dpo], [r["loss"] for r in dpo], color=COLORS[2], lw=1.5, label="DPO loss")
        b.set_ylabel("DPO loss")
        if any("accuracy" in r for r in dpo):
            b2 = b.twinx()
            b2.plot(
                [r["step"] for r in dpo if "accuracy" in r],
                [r["accuracy"] for r in dpo if "accuracy" in r],
                color="#54a24b",
                lw=1,
                ls="--",
                label="reward accuracy",
            )
            b2.set_ylim(0, 1.05)
            b2.set_ylabel("reward accuracy", fontsize=8)
    for step in bounds[:-1]:
        b.axvline(step, color="#9aa5b1", lw=0.8, ls=":")
    b.set_title("DPO on verifier-labelled pairs" + (f" ({len(bounds)} rounds)" if len(bounds) > 1 else ""), fontsize=9)
    b.set_xlabel("optimizer step")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_sft_and_grpo(sft: list[dict[str, Any]], grpo: list[dict[str, Any]], path: Path) -> Path | None:
    """SFT loss, and GRPO's mean verifier reward per step (the curve it climbs)."""
    rewards = [r for r in grpo if "reward_mean" in r]
    if not sft and not rewards:
        return None
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=110)
    _sft_panel(a, sft)
    b.plot([r["step"] for r in rewards], [r["reward_mean"] for r in rewards], color=COLORS[2], lw=1.5)
    b.set_title("GRPO: mean verifier reward of each step's samples", fontsize=9)
    b.set_xlabel("step")
    b.set_ylabel("reward (share of instructions followed, loose)")
    b.set_ylim(0, 1.05)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- the page ------------------------------------------------------------------------------------


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto; max-width: 1100px; color: #1f2933; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #d9e2ec; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; } th, td { padding: .25em .7em; border-bottom: 1px solid #e4e7eb; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f5f7fa; }
tr.gain td { font-weight: 600; } .up { color: #137333; } .down { color: #b3261e; }
img { max-width: 100%; border: 1px solid #e4e7eb; margin: .4em 0; }
.muted { color: #616e7c; } code { background: #f5f7fa; padding: 0 .25em; }
.example { border: 1px solid #d9e2ec; border-radius: 6px; margin: 1em 0; padding: .6em .9em; }
.example .prompt { font-weight: 600; white-space: pre-wrap; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: .8em; margin-top: .5em; }
.resp { white-space: pre-wrap; background: #f8fafc; padding: .5em; border-radius: 4px; font-size: 13px; max-height: 22em; overflow: auto; }
.badge { display: inline-block; font-size: 11px; padding: 0 .5em; border-radius: 9px; margin-left: .4em; }
.pass { background: #d3f3dc; color: #0b5a25; } .fail { background: #fbd5d2; color: #8a1c13; }
"""


def _figure(path: Path | None, alt: str) -> str:
    if path is None or not path.exists():
        return f"<p class=muted>({html.escape(alt)}: no data)</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _scores_table(summary: dict[str, Any], split: str) -> str:
    rows = []
    cis = summary.get("intervals", {}).get(split, {})
    for label, _ in models_of(summary):
        s = summary["scores"][label].get(split)
        if s:
            own = cis.get("scores", {}).get(label, {})
            rows.append(
                f"<tr><td>{label}</td>"
                + "".join(f"<td>{s[k]:.1f}<span class=muted>{_ci(own.get(k))}</span></td>" for k, _ in HEADLINE)
                + "</tr>"
            )
    gain = summary["gain_start_to_final"].get(split)
    if gain:
        ci = cis.get("gain", {})
        rows.append(
            f"<tr class=gain><td>{summary['final']['label']} − start</td>"
            + "".join(
                f"<td class={'up' if gain[k] > 0 else 'down' if gain[k] < 0 else ''}>{gain[k]:+.1f}<span class=muted>{_ci(ci.get(k), signed=True)}</span></td>"
                for k, _ in HEADLINE
            )
            + "</tr>"
        )
    if not rows:
        return ""
    head = "<tr><th>model</th>" + "".join(f"<th>{n}</th>" for _, n in HEADLINE) + "</tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _invented_table(summary: dict[str, Any]) -> str:
    """The invented instructions (synth.autoif): each code verifier, who wrote it, and how each model does on it."""
    rows = summary.get("invented") or []
    if not rows:
        return ""
    labels = [label for label, _ in models_of(summary)]
    head = "<tr><th>verifier</th><th style='text-align:left'>instruction</th><th style='text-align:left'>written by</th><th>prompts</th>"
    head += "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr>"
    body = "".join(
        f"<tr><td><code>{html.escape(r['id'])}</code></td><td style='text-align:left'>{html.escape(r['instruction'])}</td>"
        f"<td style='text-align:left'>{html.escape(r['source'])}</td><td>{r['prompts']}</td>"
        + "".join(f"<td>{'' if r['loose'].get(label) is None else format(r['loose'][label], '.0f')}</td>" for label in labels)
        + "</tr>"
        for r in rows
    )
    return (
        "<h2>Invented instructions: who wrote each verifier, and each model's pass rate (loose %, development queries)</h2>"
        f"<table>{head}{body}</table>"
    )


def _stage_table(summary: dict[str, Any]) -> str:
    sample, label = summary.get("sample", {}), summary.get("label", {})
    made = {
        "prompts": f"{summary['prompts'].get('train', 0)} train · {summary['prompts'].get('heldout', 0)} development · {summary['prompts'].get('test', 0)} test "
        f"(sha256 {str(summary['prompts'].get('test_sha256', ''))[:12]}) · {summary['prompts'].get('ifeval', 0)} IFEval"
        + (
            f" · invented instructions: {summary['prompts']['invented_in_train']} of the train prompts, {summary['prompts']['invented']} development"
            if summary["prompts"].get("invented")
            else ""
        ),
        "sample": f"{sample.get('samples', 0)} samples, {sample.get('sample_pass_rate', 0):.0f}% follow every instruction; kept {sample.get('kept', 0)} from {sample.get('prompts_with_kept', 0)} prompts",
        "sft": f"{summary['sft'].get('steps', '?')} steps, final loss {summary['sft'].get('final_loss') or float('nan'):.3f}",
        "label": f"{label.get('pairs', 0)} pairs from {label.get('prompts', 0)} prompts; skipped {label.get('skipped', {})}",
        "dpo": f"{summary['dpo'].get('steps', '?')} steps, final loss {summary['dpo'].get('final_loss') or float('nan'):.3f}",
    }
    grpo = summary.get("grpo") or {}
    if grpo:
        made["grpo"] = (
            f"{grpo.get('steps', '?')} steps, mean reward {grpo.get('first_reward') or float('nan'):.3f} → {grpo.get('last_reward') or float('nan'):.3f}"
        )
    for number, made_in in enumerate(summary.get("rounds", [])[1:], start=2):
        pairs, dpo = made_in["label"], made_in["dpo"]
        made[f"label-{number}"] = (
            f"round {number}: {pairs.get('pairs', 0)} pairs from {pairs.get('prompts', 0)} prompts, sampled from the last round's model"
        )
        made[f"dpo-{number}"] = f"round {number}: {dpo.get('steps', '?')} steps, final loss {dpo.get('final_loss') or float('nan'):.3f}"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{t['seconds']:.0f}{' (reused)' if t.get('reused') else ''}</td><td style='text-align:left'>{html.escape(made.get(name, ''))}</td></tr>"
        for name, t in summary["stages"].items()
    )
    return f"<table><tr><th>stage</th><th>seconds</th><th style='text-align:left'>made</th></tr>{rows}</table>"


def _not_scored(split: str) -> str:
    return (
        "<p class=muted>not scored: run with <code>--full-ifeval</code></p>"
        if split in FULL_IFEVAL_SPLITS
        else "<p class=muted>not evaluated</p>"
    )


def what_it_means(cfg: Any, summary: dict[str, Any]) -> list[str]:
    """The report's plain-language notes on what its figures mean and what they do not (HTML, one paragraph each)."""
    from posttrain.models.fetch import FETCHABLE

    start = summary["scores"].get("start", {})
    sizes = [
        f"{SHORT[split].lower()} {start[split]['prompts']} ({100 / start[split]['prompts']:.1f} points)"
        for split, _ in EVAL_SPLITS
        if start.get(split, {}).get("prompts")
    ]
    notes = [
        (
            "<b>The four figures.</b> Prompt-level: the share of prompts whose response follows <i>every</i> instruction; "
            "instruction-level: the share of all instructions followed. Strict checks the response as written; loose, as IFEval "
            "does, also accepts it after dropping its first or last line or its markdown asterisks. A check says a rule was met "
            "(no commas, three bullets, a word present), not that the answer is good: read the responses below."
        ),
        "<b>Small sets.</b> One prompt is worth " + (", ".join(sizes) or "a large share") + ". The brackets are 95% bootstrap "
        "intervals over those prompts: a gain whose interval reaches below zero is not yet told apart from noise. They cover "
        "the choice of prompts, not of seed: another sampling and training seed can move the gain by several points "
        "(<code>posttrain demo --seeds 3</code> reports the mean of three and its interval).",
        (
            f"<b>Budget.</b> The fast splits generate at most {cfg.generation.max_new_tokens} new tokens; a longer response is "
            "scored cut where it stopped. The built prompts ask only for what fits, and the bundled IFEval subset keeps prompts a "
            "short answer can meet; IFEval's long-answer prompts are scored only with <code>--full-ifeval</code>, at "
            f"{cfg.full_ifeval.max_new_tokens} tokens."
        ),
    ]
    if cfg.model in FETCHABLE:
        notes.append(
            f"<b>The model.</b> <code>{html.escape(cfg.model)}</code> is a small model ({html.escape(FETCHABLE[cfg.model].license)}), "
            "dequantized to start from, so its accuracies may differ from the published full-precision model's; what the "
            "loop gains here says the loop works at this scale, not what a 7B model would gain (AutoIF: Qwen2-7B 43.6 → 46.6 "
            "IFEval prompt-loose with online DPO)."
        )
    return notes


def pick_examples(root: Path, n: int, final: str = "eval-dpo") -> list[dict[str, Any]]:
    """Held-out prompts with start and final (``final``: its eval stage) responses: the ones it turned from failing to passing first."""
    start, dpo = root / "eval-start" / "heldout.jsonl", root / final / "heldout.jsonl"
    if not (start.exists() and dpo.exists()) or n == 0:
        return []
    pairs = list(zip(read_jsonl(start), read_jsonl(dpo)))
    order = sorted(range(len(pairs)), key=lambda i: (not (not all(pairs[i][0]["loose"]) and all(pairs[i][1]["loose"])), i))
    return [{"before": pairs[i][0], "after": pairs[i][1]} for i in order[:n]]


def _response(item: dict[str, Any], title: str) -> str:
    from posttrain.synth.verifiable import type_label

    badges = "".join(
        f"<span class='badge {'pass' if ok else 'fail'}'>{html.escape(type_label(t))} {'✓' if ok else '✗'}</span>"
        for t, ok in zip(item["instruction_id_list"], item["loose"])
    )
    return f"<div><div>{title}{badges}</div><div class=resp>{html.escape(item['response']) or '<i>(empty)</i>'}</div></div>"


def render_html(root: Path, cfg: Any, summary: dict[str, Any], figures: dict[str, Path | None]) -> str:
    final = summary["final"]["label"]
    lead_split = next((s for s, _ in EVAL_SPLITS if s in summary["gain_start_to_final"]), "heldout")
    gain = summary["gain_start_to_final"].get(lead_split, {}).get("prompt_loose")
    lead = (
        f"{SHORT[lead_split]} prompt-level loose accuracy: <b>{gain:+.1f} points</b>"
        f"{_ci(summary.get('intervals', {}).get(lead_split, {}).get('gain', {}).get('prompt_loose'), signed=True)} from the starting model to the {final} model. "
        "Brackets: 95% bootstrap intervals over prompts (gains paired: both models on the same resampled prompts); these sets are small."
        if gain is not None
        else ""
    )
    examples = "".join(
        f"<div class=example><div class=prompt>{html.escape(e['before']['prompt'])}</div><div class=pair>{_response(e['before'], 'start')}{_response(e['after'], final)}</div></div>"
        for e in pick_examples(root, cfg.examples, summary["final"]["stage"])
    )
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>posttrain pipeline report: {html.escape(cfg.model)}</title><style>{CSS}</style></head>
<body>
<h1>Instruction following: {html.escape(cfg.model)}</h1>
<p class=muted>posttrain pipeline in <code>{html.escape(str(root))}</code>, {summary["seconds"] / 60:.1f} min. Start → rejection-sampling SFT → {"GRPO on verifier rewards" if final == "GRPO" else "verifier-labelled DPO"}.
Which split each figure comes from: <b>test</b> prompts have their own queries and instruction phrasings, written apart
and never used to choose a preset or a hyperparameter, only scored; <b>development</b> prompts use queries and phrasings never
seen in training, but the default preset was tuned on them, so their gains flatter; the IFEval subset is a fixed set of
IFEval's own prompts, scored while the preset was tuned (development too); <b>unused IFEval</b> is the other 421 of IFEval's
541 prompts, never scored for a choice, at lm-eval's 1280 new tokens (<code>--full-ifeval</code>); <b>invented</b>
instructions (with <code>synth.autoif</code>) are those a model wrote, with the code that checks them, on development queries.</p>
<p>{lead}</p>
{"".join(f"<h2>{html.escape(title[0].upper() + title[1:])} (%)</h2>" + (_scores_table(summary, split) or _not_scored(split)) for split, title in EVAL_SPLITS if split != "invented" or summary["scores"]["start"].get(split))}
{_figure(figures.get("headline"), "accuracy by model")}
{_invented_table(summary)}
<h2>Pass rate per instruction type (development prompts)</h2>{_figure(figures.get("per_type"), "pass rate per instruction type")}
<h2>Training</h2>{_figure(figures.get("training"), "training curves")}
<h2>Stages</h2>{_stage_table(summary)}
<h2>Responses before and after (development prompts)</h2>{examples or "<p class=muted>none</p>"}
<h2>What these numbers mean, and what they do not</h2>{"".join(f"<p>{note}</p>" for note in what_it_means(cfg, summary))}
</body></html>
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(page: Path, out: Path, *, width: int = 1200, height: int = 3000, timeout: float = 120) -> Path:
    """Render ``page`` in headless Chromium and save a PNG (raises if Chromium is missing or fails)."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        # No background networking: this machine's closed network would refuse its connections anyway.
        cmd = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", f"--screenshot={Path(out).resolve()}", Path(page).resolve().as_uri(),
        ]  # fmt: skip
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not Path(out).exists():
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return Path(out)
