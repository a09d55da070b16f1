"""posttrain DPO vs TRL's DPOTrainer: same model, pairs and hyperparameters, alternating runs, CPU.

    python benchmarks/dpo_vs_trl.py [--quick | --full] [--pairs N] [--steps N] [--repeats 3] [--variants A,B,...]
                                    [--lr 1e-4] [--threads N] [--omp-wait-policy PASSIVE] [--workdir DIR] [--keep]

Needs TRL (``pip install -e .[bench]``). The model and tokenizer are those of ``sft_vs_trl.py`` (its
``build_model``): a ~7.3M-parameter Llama-style model with fixed-seed random weights and a ChatML
byte-level BPE tokenizer, here trained on the pairs' text, saved once in a temporary directory that
every run loads. The data are ../shared/data's 284 Orca DPO pairs (``input.messages`` = system + user
turn, ``preferred_output`` / ``non_preferred_output`` = one assistant turn each), max length 512.
posttrain reads that file as it is; TRL reads the same pairs written as conversational
``prompt``/``chosen``/``rejected`` records. Both truncate each prompt+response sequence at its first
512 tokens (TRL's ``truncation_mode="keep_start"``, posttrain's ``overlong: truncate``); a pair whose
prompt alone is ≥ 512 tokens would have nothing left to score and both tools drop it (TRL filters
``len(prompt_ids) < max_length``, posttrain drops pairs with no scored token), so the parent leaves
those 42 out of both files itself. Before any run it checks that both tools score the same token ids
(TRL's ``prompt_ids + chosen_ids`` against posttrain's rendering, and where each response starts).

Variants (each run a fresh subprocess with its own empty caches, in rotation A B C D A B C D …):

* ``posttrain``: posttrain's defaults: ``train.bf16`` left to posttrain (bf16 autocast where the CPU
  has native bf16 dot products, as this one does), 4 pairs per forward pass (DPO's default
  ``micro_batch_size``) with gradient accumulation 2; on CPU a pass's sequences run as one row (padded
  to a multiple of 32 tokens), each pair's prompt once, and the LM head once over them all; reference
  log-probs precomputed once, before step 1, over every pair.
* ``posttrain-fp32`` / ``posttrain-bf16``: the same with ``train.bf16`` set off / on explicitly (the
  default variant list adds the one that differs from ``posttrain`` on this machine).
* ``posttrain-mb8``: posttrain's defaults but all 8 pairs in one forward pass, as TRL's default does.
* ``trl``: TRL's default DPOConfig on CPU: bf16 autocast, gradient checkpointing, a second model in
  memory as the reference, run on every step; 8 pairs (16 padded sequences) in one forward pass.
* ``trl-precompute``: TRL's defaults plus ``precompute_ref_log_probs=True`` (no reference model kept).
* ``trl-fp32`` / ``trl-precompute-fp32`` (only when asked): those two with bf16 and gradient checkpointing
  off, TRL's faster setups on a CPU without native bf16, where its default bf16 autocast is emulated.

All train the same number of optimizer steps of 8 pairs at the same peak learning rate, linear decay,
no warmup, AdamW (0.9, 0.999), no weight decay, gradient clipping at 1.0, sigmoid DPO loss, β 0.1, seed
0; by default one epoch (every kept pair once, 30 steps). Every run gets ``OMP_NUM_THREADS=--threads``
(default: all cores) and ``OMP_WAIT_POLICY=PASSIVE``: on a machine that other jobs share, OpenMP
threads that spin while waiting take the cores the working threads need, and a step then costs 2-6x
the CPU time, differently from run to run (measured here for both tools).

Reported per variant (median over its runs): pairs/s and seconds/step over the training steps after
the first (model loading, tokenization, reference precompute and the warm-up step excluded); the
reference precompute's seconds; end-to-end pairs/s = trained pairs / (precompute + every training
step, the first included); peak RSS of the run's process; step-1 loss (both log 2 when policy =
reference) and the mean loss and reward accuracy over the last 5 steps, averaged over the runs.
The last two lines are ``memory_ratio=`` (posttrain's peak RSS over the better TRL variant's) and ``ratio=``,
posttrain's end-to-end pairs/s over the better TRL variant's, the one of those run with the most end-to-end
pairs/s (so posttrain's precompute counts against it, as TRL's precompute or per-step reference forward
counts against TRL).

``--full``: one whole epoch of the 242 kept pairs (30 steps), 3 alternating runs of each variant, by default
posttrain, trl and trl-precompute. On a CPU without native bf16 TRL's two defaults take ~80 s a step (40
minutes a run); ``--full --variants posttrain,trl-fp32,trl-precompute-fp32`` compares against TRL's fp32
setups instead, which are several times faster there.

``--quick`` (about a minute on 2 idle cores with native bf16; about 7 minutes on a CPU without, where TRL's
default bf16 step takes ~80 s): the first 16 pairs, posttrain and TRL's default only, 2
runs each of 2 steps; its ``ratio=`` is against TRL's default, the only TRL variant it runs.
Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_vs_trl import build_model, tool_env  # the same model recipe as the SFT benchmark; env of a tool's worker

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "orca_dpo_pairs_validation.jsonl"
MAX_LENGTH = 512
BATCH = 8  # pairs per optimizer step (16 sequences in one forward pass), for every variant
BETA = 0.1
LAST = 5  # steps averaged for the end-of-run loss and accuracy
NOT_LIKE_FOR_LIKE = [
    (
        "posttrain's default micro-batch is 4 pairs, so its step is two forward/backward passes of 4 pairs (gradient accumulation 2);"
        " TRL's default runs the 8 pairs in one (per_device_train_batch_size 8): the same update, but posttrain holds half the"
        " activations at a time; posttrain-mb8 runs 8 in one pass, as TRL does"
    ),
    (
        "posttrain on CPU runs a pass's sequences as one row, each pair's prompt once, padded only at the row's end to a multiple"
        " of 32 tokens; TRL pads every sequence to the batch's longest and runs them together"
    ),
    (
        "TRL's default keeps a second model as the reference and runs it on every step; posttrain (and trl-precompute) run the"
        " initial model once over every pair before step 1 (its cost is in 'ref precompute s' and the end-to-end pairs/s)"
    ),
    "TRL's default also checkpoints activations (recomputes the forward in the backward); posttrain does not by default",
    (
        "TRL's fused log-prob head scores every position on CPU (prompt and padding too) and computes entropy and top-1 metrics;"
        " posttrain's computes only the response tokens' log-probs"
    ),
    "TRL steps with torch's fused AdamW (adamw_torch_fused), posttrain with torch.optim.AdamW's default implementation",
    (
        "the tools shuffle the pairs differently (each step has 8 pairs, not the same 8), so losses agree only roughly;"
        " TRL's reward accuracy counts a tie (step 1: policy = reference) as wrong, posttrain's as half"
    ),
]

VARIANTS = {
    "posttrain": ("posttrain", {}, "its defaults: bf16 auto, 4 pairs × 2 accum"),
    "posttrain-fp32": ("posttrain", {"bf16": False}, "fp32, 4 pairs × 2 accum"),
    "posttrain-bf16": ("posttrain", {"bf16": True}, "bf16 autocast, 4 pairs × 2 accum"),
    "posttrain-mb8": ("posttrain", {"micro_batch_size": 8}, "defaults but 8 pairs in one forward"),
    "trl": ("trl", {}, "TRL defaults: bf16, grad ckpt, ref model"),
    "trl-precompute": ("trl", {"precompute_ref_log_probs": True}, "TRL defaults + precompute_ref_log_probs"),
    "trl-fp32": ("trl", {"bf16": False, "gradient_checkpointing": False}, "fp32, no grad ckpt, ref model"),
    "trl-precompute-fp32": (
        "trl",
        {"bf16": False, "gradient_checkpointing": False, "precompute_ref_log_probs": True},
        "fp32, no grad ckpt, precompute_ref_log_probs",
    ),
}
FULL_VARIANTS = "posttrain,trl,trl-precompute"


def default_variants() -> str:
    """posttrain's defaults, in the other precision, with 8 pairs per pass; TRL's defaults, with and without precompute."""
    from posttrain.config import native_bf16

    return f"posttrain,{'posttrain-fp32' if native_bf16('cpu') else 'posttrain-bf16'},posttrain-mb8,trl,trl-precompute"


# -- setup (parent process) ------------------------------------------------------------------------


def read_pairs() -> list[dict]:
    with DATA.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def conversational(orca: dict) -> dict:
    return {"prompt": orca["input"]["messages"], "chosen": orca["preferred_output"], "rejected": orca["non_preferred_output"]}


def write_data(workdir: Path, model_dir: Path, n: int | None) -> tuple[Path, Path, dict]:
    """The kept pairs (the first ``n``) as two files: Orca's format for posttrain, prompt/chosen/rejected for TRL.

    Also checks, pair by pair, that TRL's tokenization (prompt with the generation prompt, then
    prompt+response, split at their common prefix, cut to MAX_LENGTH) gives posttrain's scored tokens.
    """
    from transformers import AutoTokenizer

    from posttrain.data.chat import IGNORE, ChatRenderer, RenderOptions

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    renderer = ChatRenderer(tokenizer, RenderOptions(max_length=MAX_LENGTH))
    kept, dropped, mismatched, tokens, scored = [], 0, 0, 0, 0
    for orca in read_pairs():
        record = conversational(orca)
        prompt = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        if len(prompt) >= MAX_LENGTH:
            dropped += 1
            continue
        ours = renderer.render_preference(record)
        for side, example in zip(("chosen", "rejected"), ours):
            full = tokenizer.apply_chat_template(record["prompt"] + record[side], tokenize=True, return_dict=True)["input_ids"]
            first = next(k for k, label in enumerate(example["labels"]) if label != IGNORE)
            mismatched += full[:MAX_LENGTH] != example["input_ids"] or first != len(prompt) or full[: len(prompt)] != prompt
            tokens += len(example["input_ids"])
            scored += sum(label != IGNORE for label in example["labels"])
        kept.append(orca)
        if n is not None and len(kept) == n:
            break
    if n is not None and len(kept) < n:
        raise SystemExit(f"--pairs {n}: only {len(kept)} pairs have a prompt shorter than {MAX_LENGTH} tokens")
    ours_path, theirs_path = workdir / "orca_pairs.jsonl", workdir / "orca_pairs_prompt_chosen_rejected.jsonl"
    ours_path.write_text("".join(json.dumps(p) + "\n" for p in kept))
    theirs_path.write_text("".join(json.dumps(conversational(p)) + "\n" for p in kept))
    stats = {
        "pairs": len(kept),
        "dropped_long_prompt": dropped,
        "mismatched_sequences": int(mismatched),
        "tokens": tokens,
        "scored": scored,
    }
    return ours_path, theirs_path, stats


def run_worker(variant: str, spec: dict, workdir: Path, index: int, env: dict) -> dict:
    """One run in a fresh process with its own caches; its result plus the process's peak RSS (from wait4)."""
    result_path = workdir / f"result-{index}-{variant}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--spec", json.dumps(spec), "--result", str(result_path)]
    # Fresh caches: no run may find the reference log-probs (posttrain's content-hashed cache, TRL's
    # datasets cache) or the tokenized data that an earlier run left.
    caches = workdir / "caches" / f"{index}-{variant}"
    env = dict(env, POSTTRAIN_CACHE=str(caches / "posttrain"), HF_DATASETS_CACHE=str(caches / "hf-datasets"))
    log = (workdir / f"log-{index}-{variant}.txt").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=tool_env(env, VARIANTS[variant][0]), stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (workdir / f"log-{index}-{variant}.txt").read_text()[-4000:]
        raise SystemExit(f"{variant} run failed (rc {proc.returncode}):\n{tail}")
    result = json.loads(result_path.read_text())
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["process_s"] = time.perf_counter() - t0
    shutil.rmtree(caches, ignore_errors=True)
    return result


# -- workers (one run each, in a fresh process) -----------------------------------------------------


def summarize(
    step_seconds: list[float], pairs: list[int], losses: list[float], accuracies: list[float], precompute_s: float, computed: list[int]
) -> dict:
    timed = slice(1, None)  # the first step warms up
    seconds = sum(step_seconds[timed])
    return {
        "steps": len(step_seconds),
        "pairs_per_s": sum(pairs[timed]) / seconds,
        "seconds_per_step": seconds / len(step_seconds[timed]),
        "precompute_s": precompute_s,
        "end_to_end_pairs_per_s": sum(pairs) / (precompute_s + sum(step_seconds)),
        "pairs": pairs,
        "losses": losses,
        "accuracies": accuracies,
        "step_seconds": step_seconds,
        "computed_tokens": computed,  # token positions the training forward passes ran on, padding included
    }


def worker_posttrain(spec: dict, overrides: dict) -> dict:
    import torch

    from posttrain.config import load_config
    from posttrain.train import dpo, loop
    from posttrain.train.forward import shared_row

    precompute = [0.0]
    real_reference = dpo.reference_logps

    def timed_reference(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real_reference(*args, **kwargs)
        finally:
            precompute[0] += time.perf_counter() - t

    # Wall time between successive step logs, as TRL's is between successive step ends: the step,
    # its logging and the progress line all count.
    log_times: list[float] = []
    real_log = loop.Metrics.log

    def timed_log(self, record):
        real_log(self, record)
        log_times.append(time.perf_counter())

    computed: list[int] = []
    real_batch = dpo.pair_batch

    def counting_batch(*args, **kwargs):
        batch = real_batch(*args, **kwargs)
        if torch.is_grad_enabled():  # training steps only, not the reference precompute (under no_grad)
            # On CPU posttrain runs the batch as one row, each pair's prompt once (Forward with one_row).
            spans = [(s.row, s.start, s.end) for s in sorted(batch.segments, key=lambda s: s.index)]
            computed.append(len(shared_row(batch.input_ids, batch.target_ids, spans)[0]))
        return batch

    dpo.reference_logps, loop.Metrics.log, dpo.pair_batch = timed_reference, timed_log, counting_batch
    micro = overrides.get("micro_batch_size", dpo.DPOConfig.model_fields["train"].default.micro_batch_size)
    cfg = load_config(
        {
            "model": {"name": spec["model"]},
            "data": {"path": spec["data_posttrain"], "max_length": MAX_LENGTH, "overlong": "truncate", "eval_fraction": 0.0},
            "adapter": {"kind": "full"},
            "train": {
                "lr": spec["lr"],
                "schedule": "linear",
                "warmup_steps": 0,
                "max_steps": spec["steps"],
                "micro_batch_size": micro,
                "grad_accum": BATCH // micro,
                "max_grad_norm": 1.0,
                "weight_decay": 0.0,
                "betas": [0.9, 0.999],
                "seed": 0,
                "device": "cpu",
                "log_every": 1,
                **({"bf16": overrides["bf16"]} if "bf16" in overrides else {}),  # else posttrain's default
            },
            "dpo": {"loss_type": "sigmoid", "beta": BETA, "reference": "precompute"},
            "output_dir": spec["out"],
        },
        cls=dpo.DPOConfig,
    )
    result = dpo.train(cfg)
    rows = [r for r in loop.read_metrics(result.run_dir) if "loss" in r]
    first = BATCH / rows[0]["pairs_per_s"]  # the first step: from its own clock (nothing logged before it)
    seconds = [first] + [b - a for a, b in itertools.pairwise(log_times)]
    out = summarize(seconds, [BATCH] * len(rows), [r["loss"] for r in rows], [r["accuracy"] for r in rows], precompute[0], computed)
    out["effective"] = {
        "bf16": cfg.train.bf16,
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum,
        "reference": cfg.dpo.reference,
        "from_cache": result.reference_from_cache,
    }
    return out


def worker_trl(spec: dict, overrides: dict) -> dict:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t, self.seconds, self.logs = 0.0, [], {}

        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.seconds.append(now - self.t)
            self.t = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs[state.global_step] = (float(logs["loss"]), float(logs["rewards/accuracies"]))

    precompute = [0.0]

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                precompute[0] += time.perf_counter() - t

    args = DPOConfig(
        output_dir=spec["out"],
        max_steps=spec["steps"],
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=MAX_LENGTH,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **overrides,
    )
    dataset = load_dataset("json", data_files=spec["data_trl"], split="train")
    timer = Timer()
    trainer = TimedDPOTrainer(model=spec["model"], args=args, train_dataset=dataset, callbacks=[timer])
    if len(trainer.train_dataset) != spec["pairs"]:
        raise SystemExit(f"TRL kept {len(trainer.train_dataset)} of {spec['pairs']} pairs")
    # Count each batch's pairs and padded positions as the collator makes it (in step order: no workers).
    counts: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        counts.append((len(examples), int(batch["input_ids"].numel())))
        return batch

    trainer.data_collator = counting
    trainer.train()
    steps = len(timer.seconds)
    result = summarize(
        timer.seconds,
        [c[0] for c in counts[:steps]],
        [timer.logs[s + 1][0] for s in range(steps)],
        [timer.logs[s + 1][1] for s in range(steps)],
        precompute[0],
        [c[1] for c in counts[:steps]],
    )
    model = trainer.model
    result["effective"] = {
        "bf16": bool(trainer.args.bf16),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "reference_model": trainer.ref_model is not None,
        "precompute_ref_log_probs": bool(trainer.args.precompute_ref_log_probs),
        "attn": getattr(model.config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype),
        "optim": str(trainer.args.optim),
    }
    return result


def worker(variant: str, spec: dict, result_path: Path) -> None:
    tool, overrides, _ = VARIANTS[variant]
    result = (worker_posttrain if tool == "posttrain" else worker_trl)(spec, overrides)
    result_path.write_text(json.dumps(result))


# -- report ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="under a minute: 16 pairs, posttrain vs TRL default, 2 runs each of 2 steps")
    ap.add_argument(
        "--full",
        action="store_true",
        help=f"one whole epoch of every kept pair, 3 alternating runs of each variant (default variants: {FULL_VARIANTS})",
    )
    ap.add_argument("--pairs", type=int, default=None, help="use the first N kept pairs (default: all 242)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run, the same for every variant (default: one epoch)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating")
    ap.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: posttrain, posttrain in its other precision, posttrain-mb8, trl, trl-precompute)",
    )
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of every run")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"], help="OMP_WAIT_POLICY of every run")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed afterwards")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (model, data, runs, logs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(args.spec), args.result)

    if args.quick and args.full:
        raise SystemExit("--quick and --full exclude each other")
    if args.quick:
        args.pairs, args.steps, args.repeats, args.variants = 16, 2, 2, "posttrain,trl"
    if args.full:
        args.pairs, args.steps, args.repeats = None, None, 3
        args.variants = args.variants or FULL_VARIANTS
    args.variants = args.variants or default_variants()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "posttrain" not in variants or not any(VARIANTS[v][0] == "trl" for v in variants):
        raise SystemExit(f"--variants must include posttrain and a TRL variant, from {', '.join(VARIANTS)}; unknown: {unknown}")
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None

    started = time.perf_counter()
    args.load_start = os.getloadavg()[0]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = workdir / "model"
        texts = [m["content"] for p in read_pairs() for m in p["input"]["messages"] + p["preferred_output"] + p["non_preferred_output"]]
        built = build_model(model_dir, texts)  # the parameter count (or a tuple starting with it)
        params = built[0] if isinstance(built, tuple) else built
        data_posttrain, data_trl, stats = write_data(workdir, model_dir, args.pairs)
        if stats["mismatched_sequences"]:
            raise SystemExit(
                f"{stats['mismatched_sequences']} sequences are tokenized differently by the two tools; the comparison would not be like for like"
            )
        epoch = stats["pairs"] // BATCH
        args.steps = args.steps or epoch
        if args.repeats < 1 or args.steps < 2 or args.steps > epoch:
            raise SystemExit(f"--repeats ≥ 1 and 2 ≤ --steps ≤ {epoch} (one epoch of {stats['pairs']} pairs; the first step is not timed)")
        # OpenMP threads that wait for work sleep instead of spinning (the same for every run): on a machine
        # other jobs share, spinning threads take the cores the working ones need, and a step then costs
        # 2-6x the CPU time, varying from run to run.
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY=args.omp_wait_policy)
        env.update(TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
        results: dict[str, list[dict]] = {v: [] for v in variants}
        index = 0
        for _ in range(args.repeats):
            for variant in variants:
                spec = {
                    "model": str(model_dir),
                    "data_posttrain": str(data_posttrain),
                    "data_trl": str(data_trl),
                    "pairs": stats["pairs"],
                    "lr": args.lr,
                    "steps": args.steps,
                    "out": str(workdir / "runs" / f"{index}-{variant}"),
                }
                r = run_worker(variant, spec, workdir, index, env)
                results[variant].append(r)
                print(
                    f"run {index + 1}/{args.repeats * len(variants)} {variant:<20}{r['pairs_per_s']:>7.2f} pairs/s  {r['seconds_per_step']:.2f} s/step"
                    f"  precompute {r['precompute_s']:.1f}s  end-to-end {r['end_to_end_pairs_per_s']:.2f} pairs/s  {r['peak_rss_mib']:,.0f} MiB"
                    f"  loss {r['losses'][0]:.3f}→{r['losses'][-1]:.3f}",
                    flush=True,
                )
                index += 1
        report(args, variants, results, params, stats, trl.__version__, time.perf_counter() - started)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep or args.workdir:
            print(f"work directory: {workdir}")


def report(
    args: argparse.Namespace, variants: list[str], results: dict[str, list[dict]], params: int, stats: dict, trl_version: str, wall: float
) -> None:
    import torch
    import transformers

    rows = {}
    for v in variants:
        rs = results[v]
        rows[v] = {
            "pps": statistics.median(r["pairs_per_s"] for r in rs),
            "lo": min(r["pairs_per_s"] for r in rs),
            "hi": max(r["pairs_per_s"] for r in rs),
            "sps": statistics.median(r["seconds_per_step"] for r in rs),
            "pre": statistics.median(r["precompute_s"] for r in rs),
            "e2e": statistics.median(r["end_to_end_pairs_per_s"] for r in rs),
            "rss": statistics.median(r["peak_rss_mib"] for r in rs),
            "loss0": statistics.mean(r["losses"][0] for r in rs),
            "loss": statistics.mean(statistics.mean(r["losses"][-LAST:]) for r in rs),
            "acc": statistics.mean(statistics.mean(r["accuracies"][-LAST:]) for r in rs),
            "computed": statistics.mean(sum(r["computed_tokens"]) / r["steps"] for r in rs),
        }
    base = rows["posttrain"]
    trl_variants = [v for v in variants if VARIANTS[v][0] == "trl"]
    best = max(trl_variants, key=lambda v: rows[v]["e2e"])  # the TRL variant with the most end-to-end pairs/s
    ref = rows["trl"] if "trl" in rows else rows[best]  # the column "RSS x/trl" compares against TRL's defaults where they ran
    print(
        f"\nDPO of a {params / 1e6:.1f}M-parameter Llama-style model from config on {stats['pairs']} Orca DPO pairs"
        f" ({stats['dropped_long_prompt']} left out: prompt ≥ {MAX_LENGTH} tokens), max length {MAX_LENGTH}, sigmoid loss, β {BETA}"
    )
    print(
        f"{args.steps} optimizer steps of {BATCH} pairs per run, lr {args.lr:g} linear, {args.repeats} runs per variant, alternating;"
        f" {args.threads} threads, OMP_WAIT_POLICY={args.omp_wait_policy}; {wall / 60:.1f} min in all"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}; {date.today()}"
    )
    print(
        f"data: {stats['tokens'] / stats['pairs']:,.0f} tokens per pair after truncation ({stats['scored'] / stats['pairs']:,.0f} scored);"
        f" both tools score the same token ids ({stats['mismatched_sequences']} sequences differ)"
    )
    n = min(LAST, args.steps)
    head = (
        f"{'variant':<21}{'setup':<46}{'pairs/s':>8}{'(min–max)':>13}{'s/step':>8}{'ref precompute s':>17}{'end-to-end pairs/s':>19}"
        f"{'computed tok/step':>18}{'peak RSS MiB':>13}{'loss@1':>8}{f'loss last {n}':>12}{f'acc last {n}':>11}{'e2e posttrain/x':>16}{'RSS x/ref':>10}"
    )
    print(head)
    for v in variants:
        r = rows[v]
        spread = f"{r['lo']:.2f}–{r['hi']:.2f}"
        print(
            f"{v:<21}{VARIANTS[v][2]:<46}{r['pps']:>8.2f}{spread:>13}{r['sps']:>8.2f}{r['pre']:>17.1f}{r['e2e']:>19.2f}"
            f"{r['computed']:>18,.0f}{r['rss']:>13,.0f}{r['loss0']:>8.4f}{r['loss']:>12.4f}{r['acc']:>11.2f}{base['e2e'] / r['e2e']:>16.2f}{r['rss'] / ref['rss']:>10.2f}"
        )
    for v in variants:
        print(f"{v} ran with: " + ", ".join(f"{k} {val}" for k, val in results[v][0]["effective"].items()))
    print(
        "pairs/s: training steps after the first; end-to-end: trained pairs / (reference precompute + every training step);"
        " computed tok/step: token positions the training forward passes ran on, padding included; peak RSS: the run's whole process"
    )
    print("not like for like:")
    for line in NOT_LIKE_FOR_LIKE:
        print(f"  - {line}")
    print(f"load average (1 min) at the start and the end: {args.load_start:.1f}, {os.getloadavg()[0]:.1f} (other jobs share the machine)")
    ref_name = "trl" if "trl" in rows else best
    print(f"RSS x/ref: peak RSS over {ref_name}'s")
    print(
        f"steady state (steps after the first): posttrain {base['pps'] / rows[best]['pps']:.2f}x {best}'s pairs/s;"
        f" peak RSS {base['rss'] / rows[best]['rss']:.2f}x {best}'s"
    )
    print(f"better TRL variant (most end-to-end pairs/s): {best}; ratio below: end-to-end pairs/s, posttrain's precompute included")
    print(f"memory_ratio={base['rss'] / rows[best]['rss']:.2f}")
    print(f"ratio={base['e2e'] / rows[best]['e2e']:.2f}")


if __name__ == "__main__":
    main()
