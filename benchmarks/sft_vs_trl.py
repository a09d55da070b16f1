"""posttrain SFT vs TRL's SFTTrainer: same model, data and hyperparameters, alternating runs, CPU; with MFU.

    python benchmarks/sft_vs_trl.py [--quick] [--model tiny|small] [--examples 4000] [--steps 60] [--repeats 3]
                                    [--variants posttrain,trl,...|all] [--lr 5e-4] [--threads N]
                                    [--workdir DIR] [--keep] [--profile]

Needs TRL (``pip install -e .[bench]``). Builds once, in a temporary directory, a Llama-style model with
fixed-seed random weights and a ChatML byte-level BPE tokenizer (8,000 tokens) trained on the data's
text; every run loads that same directory. ``--model tiny``: hidden 256, 4 layers, 4 heads, MLP 688,
untied embeddings, 7.3M parameters. ``--model small``: hidden 512, 10 layers, 8 heads, MLP 1,376,
untied, 39.8M parameters (31.6M without the input embedding and the LM head). The data are
../shared/data's 541 IFEval GPT-4 prompt/response pairs as conversational prompt/completion records
(user turn → assistant turn), repeated to ``--examples``, each copy's user turn opening with its record
number (posttrain's CPU forward runs a prompt that examples share once: copies of one prompt would make it
compute fewer tokens than it counts, and the MFU would say more than the hardware did); both tools read the
same JSONL file, truncate at 512 tokens and train on the completion only (the assistant turn; TRL's
completion mask also covers the newline after ``<|im_end|>``).

Variants (each run a fresh subprocess, run in rotation A B C A B C …, ``--repeats`` times each):

* ``posttrain``: posttrain's defaults: bf16 autocast where the CPU has native bf16 (else fp32), packed
  rows (8 rows of 512 tokens a step) with per-example causal attention, fused AdamW, no gradient
  checkpointing.
* ``posttrain-fp32``: the same with ``train.bf16: false``. ``posttrain-compile``: with ``train.compile``.
* ``trl``: TRL's default SFTConfig on CPU: bf16, gradient checkpointing, 8 padded sequences a step.
* ``trl-fp32``: bf16 and gradient checkpointing off (8 padded sequences a step).
* ``trl-bf16``: bf16, gradient checkpointing off, padded.
* ``trl-padfree``: bf16, no checkpointing, ``padding_free=True`` (the 8 sequences flattened into one row).
* ``trl-packed``: TRL's defaults plus ``packing=True`` (best-fit decreasing, padding-free: 8 rows of
  512 tokens a step, as posttrain). ``trl-packed-nogc``: the same without gradient checkpointing.
* ``trl-liger``: ``trl-bf16`` plus ``use_liger_kernel=True`` (Liger's Triton kernels: needs a GPU; on a
  CPU-only machine the run fails and its error is reported).
* ``trl-padfree-fp32``, ``trl-packed-fp32``: ``trl-padfree`` and ``trl-packed-nogc`` in fp32, for CPUs
  without native bf16 instructions (there bf16 autocast is several times slower than fp32).

All train the same number of optimizer steps at the same peak learning rate, linear decay, no warmup,
AdamW (0.9, 0.999), no weight decay, gradient clipping at 1.0, seed 0. Reported per variant (median
over its runs): real (non-padding) tokens/s and seconds/step over the training steps after the first
(model loading, tokenization, compilation and the warm-up step excluded), peak RSS of the whole run's
process, the loss at the same number of trained (loss-bearing) tokens, interpolated from the per-step
losses (a mean over the step's trained tokens, in both tools) and averaged over the runs, and the
model-FLOPs utilisation: real tokens/s × 6·N / this machine's matmul peak, N = all parameters
(embeddings and LM head included; the non-embedding figure is printed too). The peak is the better of
fp32 and bf16 (bf16 on CPUs with native bf16 instructions, fp32 on the others), measured in the same
invocation by benchmarks/matmul_peak.py's ``measure`` (before the first run and after the last; the
higher is used). Runs that fail (e.g. Liger without a GPU) are listed with their error. ``--profile``: one
more posttrain run under torch's profiler, steps after the first, printed before the table as the share of
the ops' self CPU time in matmuls, the packed attention, the optimizer, casts and copies, and the rest.

``--quick`` (about a minute on 2 idle cores with native bf16; about 5 minutes on a CPU without, where TRL's
default bf16 step takes ~35 s): 96 examples, posttrain and TRL's default only, 2 runs
each of 3 steps, the quick matmul peak. The last line is ``ratio=<posttrain real tokens/s / TRL
default real tokens/s>``. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Read before anything here imports posttrain, which sets a default for it (posttrain/__init__.py): see tool_env.
CALLER_ONEDNN_CACHE = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def tool_env(env: dict, tool: str) -> dict:
    """``env`` for one of ``tool``'s workers. Importing posttrain in this process set oneDNN's primitive cache
    capacity in ``os.environ``; a TRL worker gets the caller's own setting (or none), as TRL's users run it."""
    if tool == "posttrain" or CALLER_ONEDNN_CACHE is not None:
        return env
    return {k: v for k, v in env.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifeval_input_response_data_gpt4_20231107_145030.jsonl"
MAX_LENGTH = 512
BATCH = 8  # sequences per step for TRL (padded), rows of MAX_LENGTH per step for packed runs

NO_GC = {"gradient_checkpointing": False}
VARIANTS = {
    "posttrain": ("posttrain", {}, "defaults: bf16 auto, packed 8×512"),
    "posttrain-fp32": ("posttrain", {"bf16": False}, "fp32, packed 8×512"),
    "posttrain-compile": ("posttrain", {"compile": True}, "defaults + train.compile"),
    "trl": ("trl", {}, "TRL defaults: bf16, grad ckpt, padded 8 seqs"),
    "trl-fp32": ("trl", {"bf16": False, **NO_GC}, "fp32, no grad ckpt, padded 8 seqs"),
    "trl-bf16": ("trl", {**NO_GC}, "bf16, no grad ckpt, padded 8 seqs"),
    "trl-padfree": ("trl", {"padding_free": True, **NO_GC}, "bf16, no grad ckpt, padding-free 8 seqs"),
    "trl-packed": ("trl", {"packing": True}, "TRL defaults + packing (bfd, 8×512)"),
    "trl-packed-nogc": ("trl", {"packing": True, **NO_GC}, "bf16, no grad ckpt, packing (bfd, 8×512)"),
    "trl-liger": ("trl", {"use_liger_kernel": True, **NO_GC}, "bf16, no grad ckpt, padded, Liger kernels"),
    "trl-padfree-fp32": ("trl", {"padding_free": True, "bf16": False, **NO_GC}, "fp32, no grad ckpt, padding-free 8 seqs"),
    "trl-packed-fp32": ("trl", {"packing": True, "bf16": False, **NO_GC}, "fp32, no grad ckpt, packing (bfd, 8×512)"),
}


def default_variants() -> str:
    """posttrain's and TRL's defaults, and TRL's fastest padded and packed setups in this machine's faster precision."""
    from posttrain.config import native_bf16

    return "posttrain,trl," + ("trl-bf16,trl-packed-nogc" if native_bf16("cpu") else "trl-fp32,trl-packed-fp32")


MODELS = {  # hidden, layers, heads, MLP width
    "tiny": (256, 4, 4, 688),
    "small": (512, 10, 8, 1376),
}
TRAINS_ON = {
    "posttrain": "assistant turn (content + <|im_end|>)",
    "trl": "completion (content + <|im_end|> + newline)",
}


# -- setup (parent process) ------------------------------------------------------------------------


def write_data(path: Path, n: int) -> list[str]:
    """``n`` conversational prompt/completion records (the 541 pairs repeated, each user turn opening with its record
    number, so that no two share a prompt); returns the texts seen."""
    with DATA.open(encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            p = pairs[i % len(pairs)]
            record = {"prompt": [{"role": "user", "content": f"{i}. {p['prompt']}"}], "completion": [{"role": "assistant", "content": p["response"]}]}
            f.write(json.dumps(record) + "\n")
    return [t for p in pairs for t in (p["prompt"], p["response"])]


def build_model(path: Path, texts: list[str], size: str = "tiny", seed: int = 0) -> tuple[int, int]:
    """Save the benchmark model and tokenizer to ``path``; returns (all parameters, parameters without embeddings and LM head)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from posttrain.models.zoo import CHATML_SPECIALS, _chatml_template, train_tokenizer

    tokenizer = train_tokenizer(_chatml_template(), CHATML_SPECIALS, vocab_size=8000, corpus="\n".join(texts))
    hidden, layers, heads, mlp = MODELS[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel() - model.get_output_embeddings().weight.numel()


def run_worker(variant: str, spec: dict, workdir: Path, index: int, env: dict) -> dict:
    """One run in a fresh process; its result plus the process's peak RSS (from wait4)."""
    result_path = workdir / f"result-{index}-{variant}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--spec", json.dumps(spec), "--result", str(result_path)]
    log = (workdir / f"log-{index}-{variant}.txt").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=tool_env(env, VARIANTS[variant][0]), stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0 or not result_path.exists():
        tail = (workdir / f"log-{index}-{variant}.txt").read_text()[-4000:]
        raise SystemExit(f"{variant} run failed (rc {proc.returncode}):\n{tail}")
    result = json.loads(result_path.read_text())
    if "error" in result:
        return result
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["process_s"] = time.perf_counter() - t0
    return result


# -- workers (one run each, in a fresh process) -----------------------------------------------------


def summarize(step_seconds: list[float], real: list[int], trained: list[int], losses: list[float], computed: list[int]) -> dict:
    timed = slice(1, None) if len(step_seconds) > 1 else slice(None)  # the first step warms up
    seconds = sum(step_seconds[timed])
    return {
        "steps": len(step_seconds),
        "real_tokens_per_s": sum(real[timed]) / seconds,
        "seconds_per_step": seconds / len(step_seconds[timed]),
        "real_tokens": real,
        "computed_tokens": computed,  # positions the model ran on, padding included
        "trained_tokens": trained,
        "losses": losses,
        "step_seconds": step_seconds,
    }


def worker_posttrain(spec: dict, overrides: dict) -> dict:
    from posttrain.config import load_config
    from posttrain.train import sft

    cfg = load_config(
        {
            "model": {"name": spec["model"]},
            "data": {"path": spec["data"], "max_length": MAX_LENGTH, "packing": True},
            "adapter": {"kind": "full"},
            "train": {
                "lr": spec["lr"],
                "schedule": "linear",
                "warmup_steps": 0,
                "max_steps": spec["steps"],
                "micro_batch_size": BATCH,
                "grad_accum": 1,
                "max_grad_norm": 1.0,
                "seed": 0,
                "device": "cpu",
                "log_every": 1,
                **overrides,  # bf16 left out: posttrain's default (the hardware's choice)
            },
            "output_dir": spec["out"],
        }
    )
    shares = None
    if spec.get("profile"):
        result, shares = profiled(lambda: sft.train(cfg), spec["steps"])
    else:
        result = sft.train(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return (
        summarize(
            [r["seconds"] for r in rows],
            [round(r["tokens_per_s"] * r["seconds"]) for r in rows],
            [r["trained_tokens"] for r in rows],
            [r["loss"] for r in rows],
            [BATCH * MAX_LENGTH] * len(rows),  # packed rows are always MAX_LENGTH wide
        )
        | {"effective": {"bf16": cfg.train.bf16, "compile": cfg.train.compile}}
        | ({"profile": shares} if shares is not None else {})
    )


# torch profiler op -> where its self CPU time goes; anything else, the packed attention op's own Python time
# included (posttrain::..., under 1% of a step), is "elementwise, other"
PROFILE_GROUPS = {
    "matmuls (projections, LM head)": ("aten::mm", "aten::addmm", "aten::addmm_"),
    "attention (packed, per example)": ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data"),
    "optimizer, gradient norm": ("aten::_fused_adamw_", "aten::_foreach_norm", "aten::linalg_vector_norm", "aten::_foreach_mul_"),
    "casts, copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::fill_", "aten::zero_"),
}


def profiled(run, steps: int) -> tuple[object, dict[str, float]]:
    """``run()`` under torch's profiler, the first optimizer step skipped (it warms up); the shares of self CPU
    time in each of ``PROFILE_GROUPS``. Steps are counted by wrapping the loop's ``optimizer_step``."""
    from torch.profiler import profile, schedule

    from posttrain.train import loop

    original = loop.optimizer_step
    with profile(schedule=schedule(wait=1, warmup=0, active=max(steps - 1, 1))) as prof:

        def counted(*args, **kwargs):
            out = original(*args, **kwargs)
            prof.step()
            return out

        loop.optimizer_step = counted
        try:
            result = run()
        finally:
            loop.optimizer_step = original
    spent: dict[str, float] = {group: 0.0 for group in [*PROFILE_GROUPS, "elementwise, other"]}
    for event in prof.key_averages():
        group = next((g for g, ops in PROFILE_GROUPS.items() if event.key in ops), "elementwise, other")
        if event.key.startswith("aten::") or event.key.startswith("posttrain"):
            spent[group] += event.self_cpu_time_total
    total = sum(spent.values()) or 1.0
    return result, {group: value / total for group, value in spent.items()}


def worker_trl(spec: dict, overrides: dict) -> dict:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t, self.seconds, self.losses = 0.0, [], {}

        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.seconds.append(now - self.t)
            self.t = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    def config(**extra) -> SFTConfig:
        return SFTConfig(
            output_dir=spec["out"],
            max_steps=spec["steps"],
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            learning_rate=spec["lr"],
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
            **extra,
        )

    dataset = load_dataset("json", data_files=spec["data"], split="train")
    model = spec["model"]
    if overrides.get("padding_free") and not overrides.get("packing"):
        # TRL truncates to max_length only when packing, and asks for truncated input otherwise: its own
        # preparation (tokenize, truncate at 512) through a padded config makes it; the run then reads it.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["model"])
        padded = {k: v for k, v in overrides.items() if k != "padding_free"}
        dataset = SFTTrainer(model=model, args=config(max_length=MAX_LENGTH, **padded), train_dataset=dataset).train_dataset
        args = config(max_length=None, **overrides)
    else:
        args = config(max_length=MAX_LENGTH, **overrides)
    timer = Timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    # Count each batch's real and trained tokens as the collator makes it (in step order: no workers).
    counts: list[tuple[int, int, int]] = []
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        counts.append((real, int((batch["labels"][..., 1:] != -100).sum()), int(batch["input_ids"].numel())))
        return batch

    trainer.data_collator = counting
    trainer.train()
    steps = len(timer.seconds)
    result = summarize(
        timer.seconds,
        [c[0] for c in counts[:steps]],
        [c[1] for c in counts[:steps]],
        [timer.losses[s + 1] for s in range(steps)],
        [c[2] for c in counts[:steps]],
    )
    # What TRL actually ran with, defaults resolved.
    model = trainer.model
    result["effective"] = {
        "bf16": bool(trainer.args.bf16),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "padding_free": bool(trainer.padding_free),
        "attn": getattr(model.config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype),
    }
    return result


def worker(variant: str, spec: dict, result_path: Path) -> None:
    tool, overrides, _ = VARIANTS[variant]
    try:
        result = (worker_posttrain if tool == "posttrain" else worker_trl)(spec, overrides)
    except Exception as e:  # noqa: BLE001 - a variant that cannot run here (Liger without a GPU) is reported, not fatal
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"}
    result_path.write_text(json.dumps(result))


# -- report ----------------------------------------------------------------------------------------


def loss_at(result: dict, tokens: float) -> float:
    """The per-step loss, linearly interpolated at ``tokens`` cumulative trained tokens (step k at the end of its tokens)."""
    xs, total = [], 0
    for t in result["trained_tokens"]:
        total += t
        xs.append(total)
    ys = result["losses"]
    if tokens <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if tokens <= x1:
            return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
    return ys[-1]


def matmul_peak(threads: int, quick: bool) -> tuple[float, str]:
    """This machine's matmul peak in GFLOP/s and its dtype, the better of fp32 and bf16, from benchmarks/matmul_peak.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from matmul_peak import measure

    peaks = {
        name: measure(dtype, quick=quick, threads=threads)["peak_gflops"]
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print("matmul peaks: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peaks.items()), flush=True)
    best = max(peaks, key=peaks.get)
    return peaks[best], best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="about a minute: 96 examples, posttrain vs TRL default, 2 runs each of 3 steps")
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny", help="tiny: 7.3M parameters; small: 39.8M")
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (the same for every variant)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating")
    ap.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, or all, from {', '.join(VARIANTS)}; posttrain alone gives its MFU only (default: posttrain, trl and TRL's fastest padded and packed setups in this CPU's faster precision)",
    )
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of every run (and of the matmul peak)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed afterwards")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (model, data, runs, logs)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="then one more posttrain run under torch's profiler: where its steps' CPU time goes, by kind of op",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(args.spec), args.result)

    if args.quick:
        args.examples, args.steps, args.repeats, args.variants = 96, 3, 2, "posttrain,trl"
    args.variants = args.variants or default_variants()
    variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "posttrain" not in variants:
        raise SystemExit(f"--variants must include posttrain, from {', '.join(VARIANTS)}; unknown: {unknown}")
    if args.repeats < 1 or args.steps < 2:
        raise SystemExit("--repeats ≥ 1 and --steps ≥ 2 (the first step is not timed)")
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sft-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data = workdir / "ifeval_gpt4_prompt_completion.jsonl"
        texts = write_data(data, args.examples)
        model_dir = workdir / f"model-{args.model}"
        params = build_model(model_dir, texts, args.model)
        peaks = [matmul_peak(args.threads, args.quick)]
        print(f"matmul peak before the runs: {peaks[0][0]:,.0f} GFLOP/s, {peaks[0][1]} ({args.threads} threads)", flush=True)
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(args.threads),
            POSTTRAIN_CACHE=str(workdir / "cache"),
            HF_DATASETS_CACHE=str(workdir / "hf-datasets"),
            TORCHINDUCTOR_CACHE_DIR=str(workdir / "inductor"),  # a cold compile each time: no run reuses another's
        )
        env.update(TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
        results: dict[str, list[dict]] = {v: [] for v in variants}
        errors: dict[str, str] = {}
        index = 0
        for rep in range(args.repeats):
            for variant in variants:
                if variant in errors:
                    continue
                spec = {
                    "model": str(model_dir),
                    "data": str(data),
                    "lr": args.lr,
                    "steps": args.steps,
                    "out": str(workdir / "runs" / f"{index}-{variant}"),
                }
                shutil.rmtree(workdir / "inductor", ignore_errors=True)
                r = run_worker(variant, spec, workdir, index, env)
                index += 1
                if "error" in r:
                    errors[variant] = r["error"]
                    print(f"run {index} {variant:<18} failed: {r['error']}", flush=True)
                    continue
                results[variant].append(r)
                print(
                    f"run {index} {variant:<18}{r['real_tokens_per_s']:>9,.0f} real tok/s  {r['seconds_per_step']:.2f} s/step  loss {r['losses'][-1]:.3f}",
                    flush=True,
                )
        peaks.append(matmul_peak(args.threads, args.quick))
        print(f"matmul peak after the runs: {peaks[1][0]:,.0f} GFLOP/s, {peaks[1][1]}", flush=True)
        if "trl" in errors or "posttrain" in errors:
            raise SystemExit(f"a reference variant failed: {errors}")
        if args.profile:
            spec = {
                "model": str(model_dir),
                "data": str(data),
                "lr": args.lr,
                "steps": args.steps,
                "out": str(workdir / "runs" / "profile"),
                "profile": True,
            }
            shares = run_worker("posttrain", spec, workdir, index, env)["profile"]
            print(
                f"posttrain's steps 2-{args.steps} under torch's profiler, share of the ops' self CPU time: "
                + ", ".join(f"{g} {100 * v:.1f}%" for g, v in shares.items())
            )
        report(args, [v for v in variants if results[v]], results, errors, params, max(peaks), trl.__version__)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep or args.workdir:
            print(f"work directory: {workdir}")


def report(
    args: argparse.Namespace,
    variants: list[str],
    results: dict[str, list[dict]],
    errors: dict[str, str],
    params: tuple[int, int],
    peak: tuple[float, str],
    trl_version: str,
) -> None:
    import torch
    import transformers

    n_all, n_body = params
    peak, peak_dtype = peak
    # The same trained-token count for everyone: the least any run reached.
    target = min(sum(r["trained_tokens"]) for v in variants for r in results[v])
    rows = {}
    for v in variants:
        rs = results[v]
        tps = statistics.median(r["real_tokens_per_s"] for r in rs)
        rows[v] = {
            "tps": tps,
            "tps_lo": min(r["real_tokens_per_s"] for r in rs),
            "tps_hi": max(r["real_tokens_per_s"] for r in rs),
            "sps": statistics.median(r["seconds_per_step"] for r in rs),
            "rss": statistics.median(r["peak_rss_mib"] for r in rs),
            "loss": statistics.mean(loss_at(r, target) for r in rs),
            "last": statistics.mean(r["losses"][-1] for r in rs),
            "real_step": statistics.mean(sum(r["real_tokens"]) / r["steps"] for r in rs),
            "trained_step": statistics.mean(sum(r["trained_tokens"]) / r["steps"] for r in rs),
            "computed_step": statistics.mean(sum(r["computed_tokens"]) / r["steps"] for r in rs),
            "mfu": tps * 6 * n_all / (peak * 1e9),
            "mfu_body": tps * 6 * n_body / (peak * 1e9),
        }
    base = rows["posttrain"]["tps"]
    print(
        f"\nSFT of a {n_all / 1e6:.1f}M-parameter Llama-style model ({n_body / 1e6:.1f}M without embeddings and LM head) from config, "
        f"{args.examples} IFEval GPT-4 conversations, max length {MAX_LENGTH}"
    )
    print(
        f"{args.steps} optimizer steps per run, lr {args.lr:g} linear, {args.repeats} runs per variant, alternating; {args.threads} threads"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}; {date.today()}"
    )
    print(f"matmul peak (benchmarks/matmul_peak.py, best dtype and shape, higher of before/after): {peak:,.0f} GFLOP/s, {peak_dtype}")
    head = (
        f"{'variant':<18}{'setup':<44}{'real tok/s':>11}{'(min–max)':>16}{'s/step':>8}{'real tok/step':>14}{'computed/step':>14}{'trained tok/step':>17}"
        f"{'peak RSS MiB':>13}{f'loss@{target / 1e3:.0f}k':>11}{f'loss@step{args.steps}':>13}{'MFU':>7}{'MFU body':>9}{'posttrain/x':>12}"
    )
    print(head)
    for v in variants:
        r = rows[v]
        spread = f"{r['tps_lo']:,.0f}–{r['tps_hi']:,.0f}"
        print(
            f"{v:<18}{VARIANTS[v][2]:<44}{r['tps']:>11,.0f}{spread:>16}{r['sps']:>8.2f}{r['real_step']:>14,.0f}{r['computed_step']:>14,.0f}{r['trained_step']:>17,.0f}"
            f"{r['rss']:>13,.0f}{r['loss']:>11.3f}{r['last']:>13.3f}{r['mfu']:>7.1%}{r['mfu_body']:>9.1%}{base / r['tps']:>12.2f}"
        )
    for v in variants:
        if "effective" in results[v][0]:
            print(f"{v} ran with: " + ", ".join(f"{k} {val}" for k, val in results[v][0]["effective"].items()))
    for v, e in errors.items():
        print(f"{v} failed: {e}")
    print("computed/step: token positions the model ran on, padding included (packed rows count as full)")
    print(f"trains on: posttrain: {TRAINS_ON['posttrain']}; TRL: {TRAINS_ON['trl']}")
    print(f"loss@: the per-step loss interpolated at {target:,} cumulative trained tokens (the least any run reached), mean over runs")
    print(
        f"MFU: real tok/s × 6·N / {peak_dtype} matmul peak, N = {n_all:,} (all parameters); MFU body: N = {n_body:,} (without the input embedding and LM head)."
        " Attention FLOPs are not counted; posttrain computes the LM head only at trained positions"
    )
    print(
        "not like for like: padded TRL runs take fewer real and trained tokens per step than packed ones (so, at the same"
        " trained tokens, more optimizer steps, which lowers their loss@); TRL's padding-free run on CPU (sdpa) attends"
        " over the whole flattened row with a block mask, so its cost grows with the row, not with each example"
    )
    trl_rows = {v: r for v, r in rows.items() if VARIANTS[v][0] == "trl"}
    print(
        f"posttrain MFU: {rows['posttrain']['mfu']:.1%} of the {peak_dtype} matmul peak ({rows['posttrain']['mfu_body']:.1%} counting N without embeddings)"
    )
    if "trl" not in trl_rows:
        return  # a posttrain-only run (e.g. the MFU of --model small): no ratio to TRL
    best = max(trl_rows, key=lambda v: trl_rows[v]["tps"])
    for name, v in (("TRL default", "trl"), (f"best TRL ({best})", best)):
        rel = rows["posttrain"]["loss"] / rows[v]["loss"] - 1
        rss = rows["posttrain"]["rss"] / rows[v]["rss"]
        print(f"posttrain vs {name}: {base / rows[v]['tps']:.2f}× real tok/s, loss@ {rel:+.1%}, peak RSS {rss:.2f}×")
    print(f"ratio={base / rows['trl']['tps']:.2f}")


if __name__ == "__main__":
    main()
