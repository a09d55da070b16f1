"""Reward models (InstructGPT, Ouyang et al. 2022, §3.5), one loop read top to bottom.

A reward model is the causal LM's decoder with a scalar head: ``Linear(d, 1)`` on the final hidden state
of each sequence's *last* token (:class:`~posttrain.train.forward.Forward`'s ``"scores"``). It is trained with the
Bradley–Terry loss ``-log σ(r(x, y_w) - r(x, y_l))`` on preference pairs; chosen and rejected are rendered
by the one renderer (:meth:`ChatRenderer.render_preference`), so the score is read after the
template's end-of-turn token, exactly where :func:`RewardScorer.score` reads it for a (prompt, response).

Departures from the paper, said here once: InstructGPT compares K = 4..9 responses per prompt (all
K(K-1)/2 pairs in one batch element) and normalises the reward so that the SFT demonstrations score 0
on average; we train on the pairs as given and do not normalise (PPO whitens its advantages instead).
The head starts as N(0, 1/(d+1)) with zero bias, as in OpenAI's ``lm-human-preferences``.

``final/`` is the LM (full fine-tuning) or the adapter (LoRA/DoRA) via ``save_pretrained``, the tokenizer
(with the chat template the run used), ``score_head.safetensors`` and ``reward_model.json`` saying what
it is; :func:`load_reward_model` turns it back into a :class:`RewardScorer`. Our own code: the head and
the loop are a few lines; transformers and peft provide the rest.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.config import ModelConfig, RewardConfig
from posttrain.data.chat import IGNORE, ChatRenderer, RenderOptions, RenderStats
from posttrain.data.decontaminate import decontaminate_items
from posttrain.data.formats import ReadReport, iter_read, read_records
from posttrain.models.adapters import apply_adapter, enable_gradient_checkpointing, save_final
from posttrain.models.load import load_model, load_tokenizer
from posttrain.records import Record, kind_of, write_jsonl
from posttrain.train import loop
from posttrain.train.forward import Forward, pack, run, scored_examples
from posttrain.train.losses import bradley_terry_loss
from posttrain.train.runtime import Runtime

SCORE_HEAD = "score_head.safetensors"
INFO = "reward_model.json"


# -- the model ----------------------------------------------------------------------------------


def hidden_size(lm: torch.nn.Module) -> int:
    config = lm.get_base_model().config if hasattr(lm, "get_base_model") else lm.config
    return int(config.hidden_size)


def reward_model(lm: torch.nn.Module, head: torch.nn.Linear | None = None) -> Forward:
    """A causal LM's decoder and a ``Linear(d, 1)`` score head read at each sequence's last token: a
    :class:`Forward` whose ``"scores"`` are the rewards. A new head starts as N(0, 1/(d+1)), zero bias."""
    if head is None:
        d = hidden_size(lm)
        head = torch.nn.Linear(d, 1)
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(d + 1))
        torch.nn.init.zeros_(head.bias)
    return Forward(lm, head.to(next(lm.parameters()).device))


def score_sequences(model: torch.nn.Module, sequences: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """[len(sequences)] fp32: each sequence's score, from one forward over them packed into rows."""
    return run(model, pack(scored_examples(sequences), pad_id), "scores", device=device)


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


# -- data ---------------------------------------------------------------------------------------


Pair = tuple[list[int], list[int]]


def render_pairs(renderer: ChatRenderer, records: list[Record]) -> tuple[list[Pair], RenderStats]:
    """Preference records -> (chosen ids, rejected ids) pairs; a pair is dropped when either side is (counted in stats).

    A side is dropped by the renderer when ``overlong="drop"`` and it is too long, or when truncation left
    none of its response: then chosen and rejected would be the same prefix and teach nothing.
    """
    stats = RenderStats()
    pairs = []
    for record in records:
        chosen, rejected = renderer.render_preference(record, stats)
        if chosen is None or rejected is None:
            for partner in (ex for ex in (chosen, rejected) if ex is not None):
                stats.dropped_with_partner += 1
                stats.kept -= 1
                stats.tokens -= len(partner["input_ids"])
                stats.trained_tokens -= sum(label != IGNORE for label in partner["labels"])
            continue
        pairs.append((chosen["input_ids"], rejected["input_ids"]))
    return pairs, stats


def pair_scores(module: torch.nn.Module, pairs: list[Pair], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of (chosen [B], rejected [B]) from one forward pass over the 2B sequences."""
    both = score_sequences(module, [c for c, _ in pairs] + [r for _, r in pairs], pad_id, device)
    return both[: len(pairs)], both[len(pairs) :]


# -- the loop -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    losses: list[float]
    eval_accuracy: float | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


def train(config: RewardConfig) -> RunResult:
    """Train a reward model as configured; returns where the run is, this invocation's losses and the held-out accuracy."""
    cfg = config
    rt = Runtime.start(cfg.train)
    run_dir = Path(cfg.output_dir)
    loop.seed_everything(cfg.train.seed)

    # -- data ---------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    options = RenderOptions(
        train_on=cfg.data.train_on, max_length=cfg.data.max_length, overlong=cfg.data.overlong, template=cfg.data.template
    )
    renderer = ChatRenderer(tokenizer, options)
    report = ReadReport(cfg.data.path)
    items = list(iter_read(cfg.data.path, format="preference", on_error=cfg.data.on_error, split=cfg.data.split, subset=cfg.data.subset, revision=cfg.data.revision, report=report))
    decontaminated = decontaminate_items(items, cfg.data.decontaminate_against, cfg.data.decontaminate_n) if cfg.data.decontaminate_against else None
    records = [items[i][1] for i in decontaminated.kept] if decontaminated is not None else [record for _, record in items]
    pairs, stats = render_pairs(renderer, records)
    if cfg.data.eval_path:
        eval_pairs, _ = render_pairs(
            renderer, read_records(cfg.data.eval_path, format="preference", on_error=cfg.data.on_error, split=cfg.data.split, subset=cfg.data.subset, revision=cfg.data.revision)
        )
        train_idx = list(range(len(pairs)))
    else:
        train_idx, eval_idx = loop.split_eval(len(pairs), cfg.data.eval_fraction, cfg.train.seed)
        eval_pairs = [pairs[i] for i in eval_idx]
    pad_id = pad_id_of(tokenizer)
    pairs_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * rt.world
    if len(train_idx) < pairs_per_step:
        raise loop.TrainingError(
            f"the data gives {len(train_idx)} training pairs but one step needs {pairs_per_step} "
            f"(micro_batch_size {cfg.train.micro_batch_size} × grad_accum {cfg.train.grad_accum} × {rt.world} processes); lower them or add data"
        )
    steps_per_epoch = len(train_idx) // pairs_per_step
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    plan = loop.Plan([[i] for i in train_idx], pairs_per_step, steps_per_epoch, total)

    # -- model, optimizer, schedule -------------------------------------------------------------
    lm = load_model(cfg.model, rt.load_device, quantize=cfg.adapter.quantize)
    lm = apply_adapter(lm, cfg.adapter)
    if cfg.adapter.kind == "full":
        freeze_unused_output_head(lm)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(lm, cfg.adapter.kind)
    model = reward_model(lm)
    step_module = rt.wrap(model, lm)
    optimizer = loop.make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    scheduler = loop.make_scheduler(optimizer, cfg.train, total)
    identity = loop.run_identity(cfg, data=loop.content_key([pairs[i] for i in train_idx]), batch=pairs_per_step)
    start, checkpoint, metrics = loop.start_run(run_dir, cfg, model, optimizer, scheduler, rt, identity)

    # -- the loop -------------------------------------------------------------------------------
    losses: list[float] = []
    logged: list[dict[str, Any]] = []
    eval_accuracy = None
    model.train()
    for step in range(start, total):
        t0 = time.perf_counter()
        batch = [pairs[row[0]] for row in plan.step_rows(step, cfg.train.seed)]
        mine = rt.share(batch)
        chunks = [mine[k : k + cfg.train.micro_batch_size] for k in range(0, len(mine), cfg.train.micro_batch_size)]
        loss_sum = correct = margin = 0.0
        balanced = rt.balance(chunks)
        for k, (micro, weight) in enumerate(balanced):
            with rt.no_sync(step_module, last=k == len(balanced) - 1), rt.autocast():
                chosen, rejected = pair_scores(step_module, micro, pad_id, rt.device)
            loss, accuracy = bradley_terry_loss(chosen, rejected)
            # The step's loss is the mean over all its pairs, whatever the micro-batching and process count.
            (loss.sum() * (weight * rt.gradient_scale / len(batch))).backward()
            loss_sum += weight * float(loss.detach().sum())
            correct += weight * float(accuracy.sum())
            margin += weight * float((chosen - rejected).detach().sum())
        loss_sum, correct, margin = rt.sum(loss_sum, correct, margin)
        loss = loss_sum / len(batch)
        grad_norm, lr = loop.optimizer_step(model, optimizer, scheduler, loss, cfg.train.max_grad_norm, step, run_dir, rt)
        done = step + 1
        record = {
            "step": done,
            "loss": loss,
            "accuracy": correct / len(batch),
            "margin": margin / len(batch),
            "lr": lr,
            "grad_norm": grad_norm,
            "seconds": time.perf_counter() - t0,
        }
        if eval_pairs and ((cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == total):
            result = evaluate(rt.unwrap(step_module), eval_pairs, cfg.train.micro_batch_size, pad_id, rt.device, cfg.train.bf16, rt)
            record |= {f"eval_{k}": v for k, v in result.items()}
            eval_accuracy = result["accuracy"]
        losses.append(loss)
        if done % cfg.train.log_every == 0 or done == total or "eval_loss" in record:
            metrics.log(record)
            logged.append(record)
        if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == total:
            state = {"epoch": step // plan.steps_per_epoch, "total_steps": total, "identity": identity}
            loop.save_checkpoint(run_dir, done, model, optimizer, scheduler, state, cfg.train.keep_last, rt)
    metrics.close()
    final = run_dir / "final"
    gathered = rt.gathered_state(model, trainable_only=cfg.adapter.kind != "full")
    if rt.main:
        save_reward_model(model, tokenizer, renderer.template, cfg, final, gathered)
        loop.plot_losses(run_dir, f"Reward model on {cfg.model.name}")
        (run_dir / "data_stats.json").write_text(
            json.dumps(
                {
                    "render": stats.to_dict(),
                    "read": report.read,
                    "rejected": len(report.rejected),
                    "pairs": len(pairs),
                    "train_pairs": len(train_idx),
                    "eval_pairs": len(eval_pairs),
                    "steps_per_epoch": steps_per_epoch,
                    **({"decontaminated": decontaminated.summary()} if decontaminated is not None else {}),
                },
                indent=1,
            )
        )
    rt.barrier()
    rt.close()
    return RunResult(run_dir, final, total, losses, eval_accuracy, logged)


def freeze_unused_output_head(lm: torch.nn.Module) -> None:
    """The LM head does not take part in scoring: freeze it unless it is the (used) input embedding, tied."""
    head, embed = lm.get_output_embeddings(), lm.get_input_embeddings()
    if head is not None and head.weight is not embed.weight:
        head.weight.requires_grad_(False)


def evaluate(
    model: Forward, pairs: list[Pair], batch_size: int, pad_id: int, device: torch.device, bf16: bool, rt: Runtime | None = None
) -> dict[str, float]:
    """Held-out loss, pair accuracy (chosen scored strictly above rejected) and mean margin.

    With several processes each scores a share of the pairs (as many batches as the busiest under FSDP).
    """
    rt = rt or Runtime()
    was_training = model.training
    model.eval()
    loss = correct = margin = 0.0
    mine = pairs[rt.rank :: rt.world]
    chunks = [mine[k : k + batch_size] for k in range(0, len(mine), batch_size)]
    with torch.no_grad():
        for chunk, weight in rt.forwards(chunks, filler=pairs[:1]):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                chosen, rejected = pair_scores(model, chunk, pad_id, device)
            batch_loss, accuracy = bradley_terry_loss(chosen, rejected)
            loss += weight * float(batch_loss.sum())
            correct += weight * float(accuracy.sum())
            margin += weight * float((chosen - rejected).sum())
    rt.reshard(model)
    model.train(was_training)
    loss, correct, margin = rt.sum(loss, correct, margin)
    n = len(pairs)
    return {"loss": loss / n, "accuracy": correct / n, "margin": margin / n}


# -- saving and loading -------------------------------------------------------------------------


def save_reward_model(
    model: Forward, tokenizer: Any, template: str, cfg: RewardConfig, out: Path, gathered: dict[str, torch.Tensor] | None = None
) -> None:
    """``final/``: the LM or adapter, the tokenizer carrying the template used, the head, and what it is.

    ``gathered``: the whole state of ``model`` when its own tensors are FSDP shards (``model.*`` and ``head.*``).
    """
    from safetensors.torch import save_file

    tokenizer.chat_template = template  # scoring must render exactly as training did
    lm_state = {k.removeprefix("model."): v for k, v in gathered.items() if k.startswith("model.")} if gathered is not None else None
    head_state = {k.removeprefix("head."): v for k, v in gathered.items() if k.startswith("head.")} if gathered is not None else model.head.state_dict()
    save_final(model.model, tokenizer, out, lm_state)
    save_file({k: v.detach().float().contiguous() for k, v in head_state.items()}, out / SCORE_HEAD)
    info = {
        "kind": "reward_model",
        "head": SCORE_HEAD,
        "score_at": "last token",
        "adapter": cfg.adapter.kind,
        "base_model": cfg.model.model_dump(mode="json"),
        "max_length": cfg.data.max_length,
    }
    (out / INFO).write_text(json.dumps(info, indent=1))


def final_dir(path: str | Path) -> Path:
    """A run directory's ``final/``, or ``path`` itself when it is one."""
    path = Path(path)
    return path / "final" if (path / "final").is_dir() else path


@dataclass
class RewardScorer:
    """A loaded reward model with the tokenizer and rendering it was trained with."""

    model: Forward
    tokenizer: Any
    options: RenderOptions
    batch_size: int = 16

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, records: list[Record]) -> list[float]:
        """One score per record: a prompt/completion (the response scored after its prompt) or a conversation.

        Every record gets a score: a sequence longer than the model's ``max_length`` is cut and scored at
        the cut. Batches hold sequences of similar length; scores come back in the records' order.
        """
        renderer = ChatRenderer(self.tokenizer, self.options)
        bad = [i for i, r in enumerate(records) if kind_of(r) not in ("prompt_completion", "conversation")]
        if bad:
            raise ValueError(
                f"records {bad[:5]} are {kind_of(records[bad[0]])} records; a reward model scores prompt/completion records or conversations"
            )
        seqs = [ex["input_ids"] for ex in renderer.render_many(records)]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        scores = [0.0] * len(seqs)
        pad_id = pad_id_of(self.tokenizer)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for k in range(0, len(order), self.batch_size):
                idx = order[k : k + self.batch_size]
                for i, s in zip(idx, score_sequences(self.model, [seqs[i] for i in idx], pad_id, self.device).tolist()):
                    scores[i] = s
        self.model.train(was_training)
        return scores


def load_reward_model(path: str | Path, *, device: str | torch.device | None = None, batch_size: int = 16) -> RewardScorer:
    """The reward model of an ``rm`` run (its directory or its ``final/``), frozen, in eval mode, adapters merged."""
    from safetensors.torch import load_file

    final = final_dir(path)
    if not (final / INFO).exists():
        raise FileNotFoundError(f"{path}: not a reward model (no {INFO}; is it the directory of a finished `posttrain rm train` run?)")
    info = json.loads((final / INFO).read_text())
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = ModelConfig(**info["base_model"])
    if info["adapter"] == "full":
        lm = load_model(base.model_copy(update={"name": str(final), "gguf_file": None}), device)
    else:
        from posttrain.models.adapters import merged_with

        lm = merged_with(load_model(base, device), final)
    head = torch.nn.Linear(hidden_size(lm), 1)
    head.load_state_dict(load_file(final / SCORE_HEAD))
    model = reward_model(lm, head.to(dtype=next(lm.parameters()).dtype)).eval().requires_grad_(False)
    tokenizer = load_tokenizer(str(final))
    # train_on="all": nothing is "trained" at scoring time, so truncation can never drop a record.
    options = RenderOptions(train_on="all", max_length=info.get("max_length"), overlong="truncate")
    return RewardScorer(model, tokenizer, options, batch_size)


def score_file(model: str | Path, data: str | Path, output: str | Path, *, batch_size: int = 16, device: str | None = None) -> int:
    """``posttrain rm score``: each record of ``data`` (prompt/completion or conversation) with its ``score``; returns the count."""
    scorer = load_reward_model(model, device=device, batch_size=batch_size)
    records = read_records(data)
    scores = scorer.score(records)
    return write_jsonl(output, ({**r, "score": s} for r, s in zip(records, scores)))


def import_reward_function(spec: str, what: str = "reward") -> Callable[[str, str, Any], float]:
    """A Python reward named ``package.module:function`` (``python:`` in front is accepted), shared by PPO and GRPO.

    The function is called as ``function(prompt, completion, record)`` when it takes three parameters,
    else ``function(prompt, completion)``; it must return a finite number.
    """
    module_name, _, name = spec.removeprefix("python:").partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({err}); is it on PYTHONPATH?") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no function {name!r}")  # noqa: TRY004 - a config error
    takes_record = len(inspect.signature(fn).parameters) >= 3

    def call(prompt: str, completion: str, record: Any = None) -> float:
        value = fn(prompt, completion, record) if takes_record else fn(prompt, completion)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise loop.TrainingError(f"{what} {spec!r} returned {value!r} for prompt {str(prompt)[:60]!r}; it must return a finite number")
        return float(value)

    return call
