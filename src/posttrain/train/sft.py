"""Supervised fine-tuning, one loop read top to bottom: batch → forward → loss → backward → step → log.

The step's loss is the sum of token losses over *all* micro-batches (and processes) of the step,
divided by the step's total number of trained tokens — so gradient accumulation, micro-batch size and
process count change nothing but float rounding. Data order is a pure function of (seed, epoch), and a
checkpoint holds the step, weights, optimizer, schedule and RNG, so a resumed run repeats the
uninterrupted run's losses exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from posttrain.config import SFTConfig
from posttrain.data.cache import TokenizedData, prepare
from posttrain.data.chat import IGNORE, RenderOptions
from posttrain.data.packing import Batch, best_fit_decreasing, collate_packed
from posttrain.models.adapters import apply_adapter, enable_gradient_checkpointing, save_final
from posttrain.models.load import load_model, load_tokenizer
from posttrain.train import loop
from posttrain.train.forward import Forward, one_row_here, run
from posttrain.train.runtime import Runtime


def make_rows(data: TokenizedData, indices: list[int], packing: bool, max_tokens: int) -> list[list[int]]:
    """Rows of example indices: one example a row, or packed best fit longest first with the samples of one
    prompt in one row (as many as fit), so a one-row forward runs their prompt once (:func:`same_prompt`)."""
    if not packing:
        return [[i] for i in indices]
    lengths = data.lengths()
    units = [unit for group in same_prompt(data, indices) for unit in _fitting(group, lengths, max_tokens)]
    bins = best_fit_decreasing([sum(int(lengths[i]) for i in unit) for unit in units], max_tokens)
    return [[i for k in b for i in units[k]] for b in bins]


def same_prompt(data: TokenizedData, indices: list[int]) -> list[list[int]]:
    """``indices`` grouped by their tokens before the first trained one, in first-seen order: several samples
    of one prompt (rejection sampling keeps up to ``keep_per_prompt``) form one group."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        example = data[i]
        trained = np.flatnonzero(example["labels"] != IGNORE)
        key = tuple(example["input_ids"][: trained[0]].tolist()) if len(trained) else (-1 - i,)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _fitting(group: list[int], lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    """A group in consecutive pieces of at most ``max_tokens`` tokens (an example longer than that alone in its
    piece, for :func:`best_fit_decreasing` to report)."""
    pieces: list[list[int]] = []
    used = max_tokens
    for i in group:
        n = int(lengths[i])
        if used + n > max_tokens:
            pieces.append([])
            used = 0
        pieces[-1].append(i)
        used += n
    return pieces


def collate(data: TokenizedData, rows: list[list[int]], packing: bool, pad_id: int, width: int | None = None) -> Batch:
    """Rows of example indices -> one batch (packed rows, padded to ``width`` if given, or one padded example per row)."""
    if packing:
        needed = sorted({i for row in rows for i in row})
        local = {i: k for k, i in enumerate(needed)}
        return collate_packed([data[i] for i in needed], [[local[i] for i in row] for row in rows], pad_id, indices=needed, width=width)
    from posttrain.data.packing import collate_padded

    flat = [row[0] for row in rows]
    return collate_padded([data[i] for i in flat], pad_id, indices=flat)


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    losses: list[float]


def train(config: SFTConfig) -> RunResult:
    """Run SFT as configured; returns where the run is and the per-step losses of this invocation."""
    cfg = config
    rt = Runtime.start(cfg.train)
    run_dir = Path(cfg.output_dir)
    loop.seed_everything(cfg.train.seed)

    # -- data: every process tokenizes a share, once; all read the one cache entry --------------
    tokenizer = load_tokenizer(cfg.model)
    options = RenderOptions(train_on=cfg.data.train_on, max_length=cfg.data.max_length, overlong=cfg.data.overlong, template=cfg.data.template)
    prep = dict(format=cfg.data.format, on_error=cfg.data.on_error, split=cfg.data.split, subset=cfg.data.subset, revision=cfg.data.revision, group=rt if rt.group else None)
    data = prepare(cfg.data.path, tokenizer, options, **prep, decontaminate_against=cfg.data.decontaminate_against, decontaminate_n=cfg.data.decontaminate_n)
    if cfg.data.eval_path:
        train_idx, eval_data = list(range(len(data))), prepare(cfg.data.eval_path, tokenizer, options, **prep)
        eval_idx = list(range(len(eval_data)))
    else:
        train_idx, eval_idx = loop.split_eval(len(data), cfg.data.eval_fraction, cfg.train.seed)
        eval_data = data
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = make_rows(data, train_idx, cfg.data.packing, cfg.data.row_width)
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * rt.world
    if len(rows) < rows_per_step:
        raise loop.TrainingError(
            f"the data gives {len(rows)} {'packed rows' if cfg.data.packing else 'examples'} but one step needs {rows_per_step} "
            f"(micro_batch_size {cfg.train.micro_batch_size} × grad_accum {cfg.train.grad_accum} × {rt.world} processes); lower them or add data"
        )
    steps_per_epoch = loop.steps_per_epoch(len(rows), rows_per_step, rt.world)
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    plan = loop.Plan(rows, rows_per_step, steps_per_epoch, total)
    eval_rows = make_rows(eval_data, eval_idx, cfg.data.packing, cfg.data.row_width) if eval_idx else []

    # -- model, optimizer, schedule -------------------------------------------------------------
    model = load_model(cfg.model, rt.load_device, quantize=cfg.adapter.quantize)
    model = apply_adapter(model, cfg.adapter)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.adapter.kind)
    width = None  # packed rows as wide as their longest; under compile always row_width wide (one shape, one compilation)
    if cfg.train.compile:
        loop.compile_layers(model)
        width = cfg.data.row_width
    # On CPU a micro-batch runs as one row, the samples of one prompt (one row of make_rows) sharing it; not
    # under compile (one shape a step) nor NEFTune (its noise scales with the row's length).
    one_row = cfg.data.packing and not cfg.train.compile and not cfg.train.neftune_alpha and one_row_here(rt.device, cfg.model.attn_implementation)
    step_module = rt.wrap(Forward(model, one_row=one_row), model)
    optimizer = loop.make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    scheduler = loop.make_scheduler(optimizer, cfg.train, total)
    identity = loop.run_identity(cfg, data=data.key, batch=rows_per_step)
    start, checkpoint, metrics = loop.start_run(run_dir, cfg, model, optimizer, scheduler, rt, identity)

    # -- the loop -------------------------------------------------------------------------------
    losses: list[float] = []
    progress = loop.progress_bar(rt.main, total, start, checkpoint, "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s")
    model.train()
    attention = rt.packed_attention(model, cfg.data.packing, cfg.model.attn_implementation)
    with loop.neftune(model, cfg.train.neftune_alpha), attention, progress:
        task = progress.add_task("sft", total=total, completed=start, loss=float("nan"), lr=0.0, tps=0.0)
        for step in range(start, total):
            t0 = time.perf_counter()
            mine = rt.share(plan.step_rows(step, cfg.train.seed))
            micro = [collate(data, mine[k : k + cfg.train.micro_batch_size], cfg.data.packing, pad_id, width) for k in range(0, len(mine), cfg.train.micro_batch_size)]
            step_tokens, real = rt.sum(sum(b.trained_tokens for b in micro), sum(b.real_tokens for b in micro))
            loss_sum = 0.0
            # Every process runs as many micro-batches as the busiest (a short last step splits unevenly);
            # a repeat has weight 0 and only keeps the processes' collectives in step.
            balanced = rt.balance(micro)
            for k, (batch, weight) in enumerate(balanced):
                batch = batch.to(rt.device)
                with rt.no_sync(step_module, last=k == len(balanced) - 1), rt.autocast():
                    nll = run(step_module, batch, "nll")
                    # The step's loss is the token mean over the whole step, on every process.
                    (nll * (weight * rt.gradient_scale / step_tokens)).backward()
                loss_sum += weight * nll.item()
            loss = rt.total(loss_sum) / step_tokens
            grad_norm, lr = loop.optimizer_step(model, optimizer, scheduler, loss, cfg.train.max_grad_norm, step, run_dir, rt)
            done = step + 1
            seconds = time.perf_counter() - t0
            record = {
                "step": done, "loss": loss, "lr": lr, "tokens_per_s": real / seconds, "trained_tokens": int(step_tokens), "seconds": seconds,
                "grad_norm": grad_norm, "peak_memory_gb": rt.peak_memory_gb(),
            }  # fmt: skip
            if cfg.train.eval_every and eval_rows and (done % cfg.train.eval_every == 0 or done == total):
                record["eval_loss"] = evaluate(step_module, eval_data, eval_rows, cfg, rt, pad_id)
            losses.append(loss)
            if done % cfg.train.log_every == 0 or done == total or "eval_loss" in record:
                metrics.log(record)
            progress.update(task, completed=done, loss=loss, lr=lr, tps=record["tokens_per_s"])
            if rt.main and not progress.console.is_terminal and (done % max(1, total // 20) == 0 or done == total or step == start):
                # No live bar in logs and pipes: a plain line every 5% instead.
                progress.console.print(f"step {done}/{total}  loss {loss:.4f}  lr {lr:.2e}  {record['tokens_per_s']:,.0f} tok/s", highlight=False)
            if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == total:
                state = {"epoch": step // plan.steps_per_epoch, "total_steps": total, "identity": identity}
                loop.save_checkpoint(run_dir, done, model, optimizer, scheduler, state, cfg.train.keep_last, rt)
    metrics.close()
    final = run_dir / "final"
    gathered = rt.gathered_state(model, trainable_only=cfg.adapter.kind != "full")
    if rt.main:
        save_final(model, tokenizer, final, gathered)
        loop.plot_losses(run_dir, f"SFT of {cfg.model.name}")
        (run_dir / "data_stats.json").write_text(json.dumps({"render": data.stats.to_dict(), "read": data.read, "rows": len(rows), "steps_per_epoch": steps_per_epoch}, indent=1))
    rt.barrier()
    rt.close()
    return RunResult(run_dir, final, total, losses)


def evaluate(step_module: torch.nn.Module, data: TokenizedData, rows: list[list[int]], cfg: SFTConfig, rt: Runtime, pad_id: int) -> float:
    """Mean NLL per trained token on the held-out rows (each process takes a share).

    On the module inside DDP's wrapper (no gradient hooks, no collectives in its forward); under FSDP the
    module's forward gathers each layer, so every process runs as many batches as the busiest.
    """
    module = rt.unwrap(step_module)
    module.eval()
    total = count = 0.0
    with torch.no_grad():
        mine = rows[rt.rank :: rt.world]
        chunks = [mine[k : k + cfg.train.micro_batch_size] for k in range(0, len(mine), cfg.train.micro_batch_size)]
        for chunk, weight in rt.forwards(chunks, filler=rows[:1]):
            batch = collate(data, chunk, cfg.data.packing, pad_id).to(rt.device)
            with rt.autocast():
                total += weight * float(run(module, batch, "nll"))
            count += weight * batch.trained_tokens
    rt.reshard(module)
    module.train()
    total, count = rt.sum(total, count)
    return total / max(count, 1)


def export(run_dir: str | Path, output: str | Path, *, merge: bool = True) -> Path:
    """Write ``output``: a Hugging Face model directory (the adapter merged into the base when ``merge``).

    Works for any training run (sft, dpo, grpo, ...): only its ``model`` and ``adapter`` sections matter.
    """
    import yaml

    from posttrain.config import AdapterConfig, ModelConfig
    from posttrain.models.adapters import merge_adapter

    run_dir, output = Path(run_dir), Path(output)
    final = run_dir / "final"
    if not final.is_dir():
        raise FileNotFoundError(f"{run_dir}: no final/ directory (has the run finished?)")
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    model_cfg, adapter_cfg = ModelConfig(**raw["model"]), AdapterConfig(**raw.get("adapter", {}))
    if output.exists():
        shutil.rmtree(output)
    if adapter_cfg.kind == "full" or not merge:
        shutil.copytree(final, output)
    else:
        merge_adapter(model_cfg, final, output)
    return output
