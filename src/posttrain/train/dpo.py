"""Direct preference optimisation and its variants, one loop read top to bottom.

Each step: pairs → chosen and rejected sequences of a micro-batch packed into rows (no padding between
them) → ONE forward pass over them (on CPU over one row in which a pair's prompt runs once, see
:class:`posttrain.train.forward.Forward`) → summed (or per-token averaged) response log-probs → the variant's loss from
:mod:`posttrain.train.losses` → backward → step → log.

The reference model costs no memory while training: by default its log-probs are computed once
before the first step, with the initial weights, and cached under a content hash of (tokenized
pairs, model weights, precision); with LoRA/DoRA it can instead be the same model with the adapter
disabled; a frozen copy is the last resort. Reference-free variants (SimPO, ORPO) never compute one.
The precompute packs the whole data set at once (best fit, longest first), so its rows carry almost no
padding. Pairs labelled by ``posttrain label --reference-logps`` from this same model carry the
log-probs the sampler measured while generating them (``meta["reference"]``); the precompute takes those
(``dpo.sampler_reference``) for every sequence it renders to exactly the tokens they were measured on,
in the same precision, and computes only the rest (:func:`sampler_reference`); under torchrun the
processes split the precompute between them. KTO's reference point z₀ is estimated over each step's
mismatched sequences on every process, in a pass without gradients before the step's update.
The batches are :mod:`posttrain.train.sequences`', the forward :mod:`posttrain.train.forward`'s, the reference precompute
:mod:`posttrain.train.reference`'s. Plumbing (checkpoints, exact resume, metrics) is
:mod:`posttrain.train.loop`'s and processes (DDP, FSDP2) :mod:`posttrain.train.runtime`'s, as for SFT.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import DPOConfig
from posttrain.data.cache import TokenizedData, prepare
from posttrain.data.chat import RenderOptions
from posttrain.data.packing import Batch
from posttrain.models.adapters import apply_adapter, enable_gradient_checkpointing, save_final
from posttrain.models.load import load_model, load_tokenizer, weights_fingerprint
from posttrain.train import loop
from posttrain.train.forward import Forward, one_row_here, pack, run
from posttrain.train.losses import (
    PreferenceLoss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from posttrain.train.packed_attention import packed_attention
from posttrain.train.reference import ReferenceTable, reference_logps, sampler_reference  # noqa: F401 - part of dpo's interface
from posttrain.train.runtime import Runtime
from posttrain.train.sequences import pair_batch, pair_examples, splice  # noqa: F401 - part of dpo's interface


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (AttributeError, OSError):
        return None


def release_freed_memory(device: torch.device) -> None:
    """Give the heap memory that freed CPU tensors left behind back to the system (glibc's ``malloc_trim``), now.

    PyTorch's CPU tensors come from ``malloc``. glibc raises its mmap threshold as large blocks are freed,
    so after the first steps activations live in the heap; with sizes that change with every sequence,
    the heap fragments and what is freed is seldom given back. On the DPO benchmark (bf16, one 30-step
    epoch) resident memory climbed from 1.3 to 1.8 GB while live tensors never passed ~1.1 GB; trimming
    after every micro-batch and optimizer step kept the peak at 1.2 GB. Does nothing off CPU or without
    glibc. The training loop trims only when memory has grown (:class:`HeapTrimmer`).
    """
    if device.type == "cpu" and (trim := _malloc_trim()) is not None:
        trim(0)


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        return None


@functools.cache
def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    """:func:`release_freed_memory` when resident memory has grown past ``growth`` × its size at the first call.

    Trimming gives the freed pages back, and the next micro-batch faults them in again: trimming after
    every micro-batch and optimizer step made the demo's fp32 DPO steps slower (timed outside the repo's
    benchmarks; no figure is claimed here).
    The first call measures the resident size a micro-batch leaves (model, optimizer and the heap its
    activations used) and trims; later calls trim only once the heap has grown past that by ``growth``,
    which bounds the climb the trimming was there for. Without /proc (resident size unknown), every call
    trims.
    """

    def __init__(self, device: torch.device, growth: float = 1.15):
        self.device, self.growth = device, growth
        self.ceiling: float | None = None
        self.trims = 0

    def __call__(self) -> None:
        if self.device.type != "cpu" or _malloc_trim() is None:
            return
        resident = _resident_bytes()
        if resident is not None and self.ceiling is not None and resident <= self.ceiling:
            return
        if resident is not None and self.ceiling is None:
            self.ceiling = self.growth * resident
        release_freed_memory(self.device)
        self.trims += 1


def preference_loss(cfg: DPOConfig, pc, pr, counts_c, counts_r, ref: tuple[torch.Tensor, ...] | None, kl: torch.Tensor | None = None):
    """The configured variant on one micro-batch: (per-pair loss, chosen rewards, rejected rewards).

    KTO treats each chosen response as a desirable example and each rejected one as undesirable; a pair's
    loss is the mean of its two, so the step's loss is KTO's mean over examples. ``kl`` is its z₀.
    """
    kind = PreferenceLoss(cfg.dpo.loss_type)
    beta = cfg.dpo.resolved_beta
    avg_c, avg_r = pc / counts_c.clamp(min=1), pr / counts_r.clamp(min=1)
    if kind in (PreferenceLoss.SIGMOID, PreferenceLoss.ROBUST):
        return dpo_loss(pc, pr, ref[0], ref[1], beta=beta, label_smoothing=cfg.dpo.label_smoothing)
    if kind is PreferenceLoss.HINGE:
        return hinge_loss(pc, pr, ref[0], ref[1], beta=beta)
    if kind is PreferenceLoss.IPO:
        return ipo_loss(avg_c, avg_r, ref[0] / counts_c.clamp(min=1), ref[1] / counts_r.clamp(min=1), beta=beta)
    if kind is PreferenceLoss.SIMPO:
        return simpo_loss(avg_c, avg_r, beta=beta, gamma=cfg.dpo.simpo_gamma)
    if kind is PreferenceLoss.ORPO:
        return orpo_loss(avg_c, avg_r, -avg_c, lam=cfg.dpo.orpo_lambda)
    if kind is PreferenceLoss.KTO:
        m = len(pc)
        desirable = torch.arange(2 * m, device=pc.device) < m
        loss, rewards = kto_loss(
            torch.cat([pc, pr]), torch.cat([ref[0], ref[1]]), desirable, beta=beta, kl=kl,
            desirable_weight=cfg.dpo.kto_desirable_weight, undesirable_weight=cfg.dpo.kto_undesirable_weight,
        )  # fmt: skip
        return (loss[:m] + loss[m:]) / 2, rewards[:m], rewards[m:]
    raise ValueError(f"loss_type {kind.value} is not supported by posttrain dpo")


def preferred(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """How many pairs the policy prefers the right way; a tie (as at step 0, policy = reference) counts half."""
    return ((chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()).sum().item()


@dataclass
class DPOResult:
    run_dir: Path
    final_dir: Path
    steps: int
    losses: list[float]
    accuracies: list[float]
    reference_from_cache: bool | None
    reference_from_sampler: int = 0  # sequences whose reference log-prob the sampler had recorded


def train(config: DPOConfig) -> DPOResult:
    cfg = config
    rt = Runtime.start(cfg.train)
    run_dir = Path(cfg.output_dir)
    loop.seed_everything(cfg.train.seed)
    kind = PreferenceLoss(cfg.dpo.loss_type)
    kto = kind is PreferenceLoss.KTO

    # -- data: two examples per pair (chosen, rejected), each with only its response scored ----------
    tokenizer = load_tokenizer(cfg.model)
    options = RenderOptions(
        train_on="all_assistant", max_length=cfg.data.max_length, overlong=cfg.data.overlong, template=cfg.data.template
    )
    prep = {
        "format": cfg.data.format or "preference",
        "on_error": cfg.data.on_error,
        "split": cfg.data.split, "subset": cfg.data.subset, "revision": cfg.data.revision,
        "group": rt if rt.group else None,
    }  # fmt: skip
    data = prepare(cfg.data.path, tokenizer, options, **prep, decontaminate_against=cfg.data.decontaminate_against, decontaminate_n=cfg.data.decontaminate_n)
    n_pairs = len(data) // 2
    if cfg.data.eval_path:
        eval_data = prepare(cfg.data.eval_path, tokenizer, options, **prep)
        train_pairs, eval_pairs = list(range(n_pairs)), list(range(len(eval_data) // 2))
    else:
        train_pairs, eval_pairs = loop.split_eval(n_pairs, cfg.data.eval_fraction, cfg.train.seed)
        eval_data = data
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * rt.world
    if len(train_pairs) < per_step:
        raise loop.TrainingError(
            f"{len(train_pairs)} training pairs, but one step needs {per_step} (micro_batch_size × grad_accum × processes)"
        )
    steps_per_epoch = loop.steps_per_epoch(len(train_pairs), per_step, rt.world)
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    plan = loop.Plan([[i] for i in train_pairs], per_step, steps_per_epoch, total)

    # -- model, reference, optimizer ------------------------------------------------------------------
    model = load_model(cfg.model, rt.load_device, quantize=cfg.adapter.quantize)
    use_sampler = kind.needs_reference and cfg.dpo.reference == "precompute" and cfg.dpo.sampler_reference
    given = sampler_reference(cfg, model) if use_sampler else {}
    model = apply_adapter(model, cfg.adapter)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.adapter.kind)
    one_row = one_row_here(rt.device, cfg.model.attn_implementation)  # see posttrain.train.forward
    logps_module = Forward(model, one_row=one_row)
    needs_reference = kind.needs_reference
    precompute = needs_reference and cfg.dpo.reference == "precompute"
    fingerprint = weights_fingerprint(logps_module) if precompute else None  # of the whole initial weights, before any sharding
    ref_model: torch.nn.Module | None = None
    if needs_reference and cfg.dpo.reference == "model":
        ref_model = Forward(copy.deepcopy(model).eval().requires_grad_(False), one_row=one_row).to(rt.device)
    step_module = rt.wrap(logps_module, model)  # under FSDP logps_module itself is now sharded
    ref_table = ref_eval_table = None
    ref_cached, from_sampler, ref_shares = None, 0, None
    if precompute:
        # Before any update (and before loading a checkpoint): the reference is the initial model.
        model.eval()
        ref_table, ref_cached, from_sampler, ref_shares = reference_logps(logps_module, data, pad_id, cfg, rt, given=given, fingerprint=fingerprint)
        if eval_pairs and eval_data is not data:
            ref_eval_table = reference_logps(logps_module, eval_data, pad_id, cfg, rt, given=given, fingerprint=fingerprint).table
        else:
            ref_eval_table = ref_table
        release_freed_memory(rt.device)
    model.train()
    optimizer = loop.make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    scheduler = loop.make_scheduler(optimizer, cfg.train, total)
    identity = loop.run_identity(cfg, data=data.key, batch=per_step)
    start, checkpoint, metrics = loop.start_run(run_dir, cfg, model, optimizer, scheduler, rt, identity)

    def reference(pairs: list[int], batch: Batch, table, column: int | None = None) -> tuple[torch.Tensor, ...] | None:
        """Reference log-probs of the batch's blocks: (chosen, rejected[, mismatched]), or of ``column`` alone."""
        if not needs_reference:
            return None
        if table is not None:
            rows = torch.as_tensor(table[pairs], dtype=torch.float32, device=rt.device)
            return tuple(rows[:, j] for j in ([column] if column is not None else range(rows.shape[1])))
        with torch.no_grad(), rt.autocast():
            if ref_model is not None:
                sums = run(ref_model, batch, "sums", device=rt.device)
            else:
                with model.disable_adapter():
                    sums = run(rt.unwrap(step_module), batch, "sums", device=rt.device)
        return tuple(sums.float().reshape(-1, len(pairs)))

    def z0(chunks: list[list[int]], source: TokenizedData, table, filler: list[int]) -> torch.Tensor:
        """KTO's reference point: mean(log π − log π_ref) over the mismatched sequences of ``chunks`` on
        every process, clamped at 0, before any gradient (it is never differentiated). Over the whole step,
        so micro-batching and the process count do not change it."""
        module = rt.unwrap(step_module)
        kl = count = 0.0
        with torch.no_grad():
            for pairs, weight in rt.balance(chunks, filler=filler):
                batch = pack([splice(source[2 * i], source[2 * ((i + 1) % (len(source) // 2))]) for i in pairs], pad_id)
                with rt.autocast():
                    policy = run(module, batch, "sums", device=rt.device)
                (ref,) = reference(pairs, batch, table, column=2)
                kl += weight * float((policy.float() - ref).sum())
                count += weight * len(pairs)
        rt.reshard(module)
        kl, count = rt.sum(kl, count)
        return torch.tensor(max(kl / max(count, 1.0), 0.0), device=rt.device)

    # -- the loop -------------------------------------------------------------------------------------
    losses: list[float] = []
    accuracies: list[float] = []
    progress = loop.progress_bar(
        rt.main, total, start, checkpoint, "loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2f}  margin {task.fields[margin]:.3f}"
    )
    task = progress.add_task("dpo", total=total, completed=start, loss=float("nan"), acc=0.0, margin=0.0)
    trim = HeapTrimmer(rt.device)
    progress.start()
    for step in range(start, total):
        t0 = time.perf_counter()
        step_pairs = [u[0] for u in plan.step_rows(step, cfg.train.seed)]
        mine = rt.share(step_pairs)
        chunks = [mine[k : k + cfg.train.micro_batch_size] for k in range(0, len(mine), cfg.train.micro_batch_size)]
        kl = z0(chunks, data, ref_table, step_pairs[:1]) if kto else None
        sums = {k: 0.0 for k in ("loss", "acc", "rc", "rr", "logps_c", "logps_r")}
        # Every process runs as many micro-batches as the busiest; a repeat has weight 0.
        balanced = rt.balance(chunks)
        for k, (pairs, weight) in enumerate(balanced):
            m = len(pairs)
            batch = pair_batch(data, pairs, pad_id)
            ref = reference(pairs, batch, ref_table)
            # One row on CPU (see Forward): the packed attention stays on through the backward, which
            # recomputes the layers under gradient checkpointing.
            with rt.no_sync(step_module, last=k == len(balanced) - 1), rt.autocast(), packed_attention(model, enabled=one_row):
                logps, counts = run(step_module, batch, "sums", "counts", device=rt.device)
                per_pair, chosen_r, rejected_r = preference_loss(cfg, logps[:m], logps[m : 2 * m], counts[:m], counts[m : 2 * m], ref, kl)
                # The step's loss is the mean over all its pairs, on every process.
                (per_pair.sum() * (weight * rt.gradient_scale / len(step_pairs))).backward()
            sums["loss"] += weight * per_pair.sum().item()
            sums["acc"] += weight * preferred(chosen_r, rejected_r)
            sums["rc"] += weight * chosen_r.sum().item()
            sums["rr"] += weight * rejected_r.sum().item()
            sums["logps_c"] += weight * logps[:m].detach().sum().item()
            sums["logps_r"] += weight * logps[m : 2 * m].detach().sum().item()
            trim()
        totals = {k: v / len(step_pairs) for k, v in zip(sums, rt.sum(*sums.values()))}
        grad_norm, lr = loop.optimizer_step(model, optimizer, scheduler, totals["loss"], cfg.train.max_grad_norm, step, run_dir, rt)
        trim()
        done = step + 1
        record = {
            "step": done,
            "loss": totals["loss"],
            "lr": lr,
            "accuracy": totals["acc"],
            "rewards_chosen": totals["rc"],
            "rewards_rejected": totals["rr"],
            "margin": totals["rc"] - totals["rr"],
            "logps_chosen": totals["logps_c"],
            "logps_rejected": totals["logps_r"],
            "grad_norm": grad_norm,
            "pairs_per_s": len(step_pairs) / (time.perf_counter() - t0),
            "peak_memory_gb": rt.peak_memory_gb(),
        }
        if kl is not None:
            record["kto_z0"] = float(kl)
        if cfg.train.eval_every and eval_pairs and (done % cfg.train.eval_every == 0 or done == total):
            record.update(evaluate(step_module, eval_data, eval_pairs, cfg, rt, pad_id, reference, ref_eval_table, z0))
        losses.append(record["loss"])
        accuracies.append(record["accuracy"])
        if done % cfg.train.log_every == 0 or done == total or "eval_accuracy" in record:
            metrics.log(record)
        progress.update(task, completed=done, loss=record["loss"], acc=record["accuracy"], margin=record["margin"])
        if rt.main and not progress.console.is_terminal and (done % max(1, total // 20) == 0 or done == total or step == start):
            # No live bar in logs and pipes: a plain line every 5% instead.
            progress.console.print(
                f"dpo step {done}/{total}  loss {record['loss']:.4f}  acc {record['accuracy']:.2f}  margin {record['margin']:.3f}",
                highlight=False,
            )
        if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == total:
            state = {"epoch": step // steps_per_epoch, "total_steps": total, "identity": identity}
            loop.save_checkpoint(run_dir, done, model, optimizer, scheduler, state, cfg.train.keep_last, rt)
    progress.stop()
    metrics.close()
    release_freed_memory(rt.device)  # what the steps' heap kept, back for whatever runs next in this process (the demo's next stages)
    final = run_dir / "final"
    gathered = rt.gathered_state(model, trainable_only=cfg.adapter.kind != "full")
    if rt.main:
        save_final(model, tokenizer, final, gathered)
        loop.plot_losses(run_dir, f"DPO ({kind.value}) of {cfg.model.name}")
        reference_stats = {"from_cache": ref_cached, "from_sampler": from_sampler, "scored_by_process": ref_shares}
        (run_dir / "data_stats.json").write_text(
            json.dumps({"render": data.stats.to_dict(), "read": data.read, "pairs": n_pairs, "reference": reference_stats}, indent=1)
        )
    rt.barrier()
    rt.close()
    return DPOResult(run_dir, final, total, losses, accuracies, ref_cached, from_sampler)


def evaluate(
    step_module, data: TokenizedData, pairs: list[int], cfg: DPOConfig, rt: Runtime, pad_id: int, reference, table, z0
) -> dict[str, float]:
    """Held-out preference loss and accuracy (each process takes a share; KTO's z₀ over the whole held-out set).

    On the module inside DDP's wrapper; under FSDP every process runs as many batches as the busiest.
    """
    module = rt.unwrap(step_module)
    module.eval()
    loss = acc = 0.0
    mine = pairs[rt.rank :: rt.world]
    chunks = [mine[k : k + cfg.train.micro_batch_size] for k in range(0, len(mine), cfg.train.micro_batch_size)]
    kl = z0(chunks, data, table, pairs[:1]) if cfg.dpo.loss_type == "kto" else None
    with torch.no_grad():
        for chunk, weight in rt.forwards(chunks, filler=pairs[:1]):
            m = len(chunk)
            batch = pair_batch(data, chunk, pad_id)
            ref = reference(chunk, batch, table)
            with rt.autocast():
                logps, counts = run(module, batch, "sums", "counts", device=rt.device)
                per_pair, cr, rr = preference_loss(cfg, logps[:m], logps[m : 2 * m], counts[:m], counts[m : 2 * m], ref, kl)
            loss += weight * per_pair.sum().item()
            acc += weight * preferred(cr, rr)
    rt.reshard(module)
    module.train()
    loss, acc = rt.sum(loss, acc)
    n = max(len(pairs), 1)
    return {"eval_loss": loss / n, "eval_accuracy": acc / n}
