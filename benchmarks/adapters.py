"""Full fine-tuning, LoRA r16, DoRA r16 and WeGeFT r64 on the same SFT task, the same data and steps, several seeds.

    python benchmarks/adapters.py [--seeds 0,1,2] [--methods full,lora,dora,wegeft] [--out runs/bench-adapters]

The task is the demo's rejection-sampled SFT (``posttrain demo``'s prompts and sample stages, made once
and reused): SmolLM2-135M-Instruct's own verified samples on training-split verifiable prompts. Every
run trains on the same rows for the same 3 epochs (so the same trained tokens) with the demo's SFT
settings; only the adapter, its learning rate and the seed change. Learning rates are not tuned here:
full 2e-5, LoRA and DoRA 4e-4 (the demo's), WeGeFT 1e-4 (its update scales with W, and on the tests'
tiny model it wanted a quarter of LoRA's rate). Per run: trainable parameters, training tokens/s
(median step), peak memory, eval loss on 64 Orca-DPO chosen answers (../shared/data, an instruction file
none of the methods trains on) and the strict pass rate on the demo's held-out verifiable prompts
(greedy), with a 95% bootstrap interval; per method, the mean over seeds and the pass rate pooled over
seeds with its interval. The untrained model is evaluated once for reference. Nothing else should run
on the machine meanwhile (tokens/s).

Writes ``OUT/results.json`` and prints a markdown table (docs/PERFORMANCE.md holds it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = {
    "full": ({"kind": "full"}, 2e-5),
    "lora": ({"kind": "lora", "r": 16, "alpha": 32}, 4e-4),
    "dora": ({"kind": "dora", "r": 16, "alpha": 32}, 4e-4),
    "wegeft": ({"kind": "wegeft", "r": 64, "alpha": 128}, 1e-4),
    # the largest rank under a tenth of LoRA r16's parameters on SmolLM2 (alpha / r kept at 2); run on its own:
    # python benchmarks/adapters.py --methods wegeft48
    "wegeft48": ({"kind": "wegeft", "r": 48, "alpha": 96}, 1e-4),
}


def orca_eval_file(out: Path, n: int = 64) -> Path:
    """The first ``n`` Orca-DPO validation rows as messages records (system, user, the chosen answer)."""
    path = out / "orca_eval.jsonl"
    rows = []
    for line in (SHARED / "orca_dpo_pairs_validation.jsonl").read_text().splitlines()[:n]:
        r = json.loads(line)
        rows.append({"messages": r["input"]["messages"] + r["preferred_output"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pass_rate(per_item: Path) -> list[bool]:
    """Prompt-level strict: every instruction of the prompt followed."""
    return [all(json.loads(line)["strict"]) for line in per_item.read_text().splitlines()]


def trainable_count(run_dir: Path) -> int:
    from safetensors import safe_open

    checkpoint = max((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    with safe_open(str(checkpoint / "trainable.safetensors"), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 — safe_open is not a dict


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="full,lora,dora,wegeft")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-adapters"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # METHOD-SEED: one run, in this process (the parent's subprocess)
    parser.add_argument("--quick", action="store_true", help="The demo's --quick pipeline (a tiny random model): checks the script, measures nothing.")
    args = parser.parse_args()
    from posttrain.demo.evaluate import evaluate_model
    from posttrain.demo.pipeline import PipelineConfig, _engine, build_prompt_files, demo_config, rejection_sample
    from posttrain.verify.stats import bootstrap_interval

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw = demo_config(quick=args.quick)
    raw["output_dir"] = str(out)
    raw["prompts"]["n_ifeval"] = 0
    cfg = PipelineConfig.model_validate(raw)
    prompts = out / "prompts"
    if args.one:
        one_run(args.one, cfg, out)
        return
    if not (prompts / "heldout.jsonl").is_file():
        build_prompt_files(cfg.prompts, prompts)
    kept = out / "sample" / "kept.jsonl"
    if not kept.is_file():
        (out / "sample").mkdir(parents=True, exist_ok=True)
        info = rejection_sample(cfg, prompts / "train.jsonl", out / "sample")
        (out / "sample" / "info.json").write_text(json.dumps(info))
    orca_eval_file(out)
    results: dict = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {"runs": {}}
    results["machine"] = _machine()
    results["sample"] = json.loads((out / "sample" / "info.json").read_text()) if (out / "sample" / "info.json").is_file() else {}

    if "start" not in results:
        (out / "start").mkdir(exist_ok=True)
        evaluate_model(_engine(cfg.model, cfg), cfg.model, prompts, out / "start", cfg)
        passes = pass_rate(out / "start" / "heldout.jsonl")
        results["start"] = {"pass": sum(passes) / len(passes), "ci": bootstrap_interval(passes), "n": len(passes)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for method in args.methods.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{method}-{seed}"
            if name in results["runs"]:
                continue
            # each run in its own process: a CPU's peak memory is the process's peak resident set, which
            # would otherwise carry the sampling's and the previous runs' peaks
            command = [sys.executable, __file__, "--one", name, "--out", str(out)] + (["--quick"] if args.quick else [])
            subprocess.run(command, check=True)
            results["runs"][name] = json.loads((out / name / "result.json").read_text())
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(f"{name}: pass {sum(results['runs'][name]['passes']) / len(results['runs'][name]['passes']):.3f}, "
                  f"eval loss {results['runs'][name]['eval_loss']:.4f}", file=sys.stderr)  # fmt: skip
    results["table"] = table(results, bootstrap_interval)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))


def one_run(name: str, cfg, out: Path) -> None:
    """Train ``name`` (METHOD-SEED) on the kept samples, merge, evaluate; ``OUT/NAME/result.json``."""
    from posttrain.demo.evaluate import evaluate_model
    from posttrain.demo.pipeline import _engine, train_stage
    from posttrain.train.loop import read_metrics

    method, seed = name.rsplit("-", 1)
    adapter, lr = METHODS[method]
    run = out / name
    sft = {"adapter": adapter, "train": {**cfg.sft.get("train", {}), "lr": lr, "seed": int(seed), "eval_every": 10_000, "save_every": 10_000}}
    sft["data"] = {"eval_path": str(out / "orca_eval.jsonl")}
    run_cfg = cfg.model_copy(update={"sft": {**cfg.sft, **sft}})
    started = time.perf_counter()
    train_stage("sft", run_cfg, cfg.model, out / "sample" / "kept.jsonl", run)
    seconds = time.perf_counter() - started
    rows = read_metrics(run / "run")
    (run / "eval").mkdir(exist_ok=True)
    evaluate_model(_engine(str(run / "merged"), cfg), str(run / "merged"), out / "prompts", run / "eval", cfg)
    result = {
        "method": method, "seed": int(seed), "lr": lr, "adapter": adapter,
        "trainable": trainable_count(run / "run"),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r),
        "trained_tokens": sum(r["trained_tokens"] for r in rows if "trained_tokens" in r),
        "peak_memory_gb": max(r.get("peak_memory_gb") or 0 for r in rows),
        "eval_loss": [r["eval_loss"] for r in rows if "eval_loss" in r][-1],
        "train_loss": [rows[0]["loss"], rows[-1]["loss"]],
        "seconds": seconds, "passes": pass_rate(run / "eval" / "heldout.jsonl"),
    }  # fmt: skip
    (run / "result.json").write_text(json.dumps(result, indent=1))


def table(results: dict, interval) -> dict:
    methods: dict = {}
    for r in results["runs"].values():
        methods.setdefault(r["method"], []).append(r)
    out = {}
    for method, runs in methods.items():
        pooled = [p for r in runs for p in r["passes"]]
        out[method] = {
            "seeds": len(runs),
            "trainable": runs[0]["trainable"],
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in runs),
            "eval_loss": statistics.mean(r["eval_loss"] for r in runs),
            "eval_loss_sd": statistics.stdev(r["eval_loss"] for r in runs) if len(runs) > 1 else 0.0,
            "pass": sum(pooled) / len(pooled),
            "pass_ci": interval(pooled),
            "pass_per_seed": [sum(r["passes"]) / len(r["passes"]) for r in runs],
            "trained_tokens": runs[0]["trained_tokens"],
        }
    return out


def markdown(results: dict) -> str:
    t = results["table"]
    lora = t.get("lora")
    lines = [
        "| method | trainable params | vs LoRA | tokens/s | vs LoRA | peak memory GB | Orca eval loss (mean ± sd) | held-out strict pass % [95% CI] | per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, m in t.items():
        lines.append(
            f"| {method} | {m['trainable']:,} | {m['trainable'] / lora['trainable']:.3f} | {m['tokens_per_s']:,.0f} | "
            f"{m['tokens_per_s'] / lora['tokens_per_s']:.2f} | {m['peak_memory_gb']:.2f} | {m['eval_loss']:.4f} ± {m['eval_loss_sd']:.4f} | "
            f"{100 * m['pass']:.1f} [{100 * m['pass_ci'][0]:.1f}, {100 * m['pass_ci'][1]:.1f}] | "
            f"{', '.join(f'{100 * p:.1f}' for p in m['pass_per_seed'])} |"
            if lora else f"| {method} | {m['trainable']:,} | | {m['tokens_per_s']:,.0f} | | {m['peak_memory_gb']:.2f} | {m['eval_loss']:.4f} | {100 * m['pass']:.1f} | |"
        )
    s = results["start"]
    lines.append(f"\nUntrained model: {100 * s['pass']:.1f} [{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}] on the same {s['n']} prompts.")
    return "\n".join(lines)


def _machine() -> str:
    import platform

    from posttrain.config import native_bf16

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return f"{cpu}, native bf16: {native_bf16()}"


if __name__ == "__main__":
    main()
