"""GRPO (Shao et al., 2024, DeepSeekMath §4.1), one loop read top to bottom:
prompts → G samples each → rewards → group advantages → μ clipped policy updates → log.

Each step takes ``grpo.prompts_per_step`` prompts (a pure function of the seed and the step, as in SFT),
samples ``grpo.group_size`` (G) completions of each with the generation engine on the policy itself
(seeded per step), and rewards them: with IFEval-format prompts, the share of the prompt's instructions
the completion follows (``verifiers:loose`` or ``verifiers:strict``, the same verifiers that score
evaluation); or with a Python function ``package.module:function(prompt, completion, record) -> float``.
Advantages are outcome advantages, ``(r - mean) / std`` within each prompt's group
(:func:`~posttrain.train.losses.group_advantages`), and the policy takes ``grpo.updates_per_batch`` (μ)
optimizer updates on :func:`~posttrain.train.losses.grpo_loss`: the clipped ratio against the sampling
policy plus β times the k3 KL estimate against the reference.

The reference is the initial model. With a LoRA/DoRA policy it is the same weights with the adapter
switched off (peft's ``disable_adapter``), so no second copy of the model is held; with full
fine-tuning it is a frozen copy; with β = 0 there is none. Token log-probs come from
:class:`~posttrain.train.forward.Forward` over each micro-batch's sequences packed into rows (no padding
between them), with logits only at completion tokens, a chunk at a time: never the full [rows, T, vocab]
fp32 logits.

Departures from the paper, said once: one step's samples are one batch (the paper samples 1,024 per
step and updates in mini-batches); with μ = 1 the ratio is 1 and the sampling policy's log-probs are the
update's own, detached (as TRL does), instead of a second forward pass. Rewards are not normalised
beyond the group. A step's loss is the mean over its sequences of each sequence's mean token loss, as
in the paper's 1/G Σ 1/|o_i| Σ_t.

Our own loop: each piece is a few lines on the shared plumbing of :mod:`posttrain.train.loop`
(checkpoints with exact resume, metrics, schedule); the engine, verifiers and losses are posttrain's.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.config import GRPOConfig
from posttrain.data.formats import ReadReport
from posttrain.data.packing import Batch
from posttrain.data.prompts import Prompt, read_prompts
from posttrain.generate.engine import Engine
from posttrain.generate.params import Completion, SamplingParams
from posttrain.generate.prompts import PromptEncoder
from posttrain.models.adapters import apply_adapter, enable_gradient_checkpointing, save_final
from posttrain.models.load import load_model, load_tokenizer
from posttrain.train import loop
from posttrain.train.forward import Forward, lengths_of, one_row_here, pack, per_sequence, run, scored_examples, scored_mask
from posttrain.train.losses import group_advantages, grpo_loss
from posttrain.train.packed_attention import packed_attention
from posttrain.train.runtime import Runtime
from posttrain.verify.code import load_libraries
from posttrain.verify.scoring import prefetch, score_response, verifiers_of

# -- rewards ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """A completion's reward, and for verifier rewards each instruction's verdict (id, followed)."""

    reward: float
    instructions: tuple[tuple[str, bool], ...] = ()


RewardFn = Callable[[Prompt, str], Scored]


def verifier_reward(loose: bool) -> RewardFn:
    """The share of the prompt's IFEval instructions the completion follows (IFEval's loose or strict verdicts)."""

    def reward(prompt: Prompt, completion: str) -> Scored:
        if prompt.verifiable is None:
            raise ValueError("a verifier reward needs IFEval-format prompts (instruction_id_list and kwargs)")
        verdicts = tuple(
            (i.instruction_id, i.loose if loose else i.strict) for i in score_response(prompt.verifiable, completion).instructions
        )
        return Scored(sum(v for _, v in verdicts) / max(len(verdicts), 1), verdicts)

    return reward


def function_reward(spec: str) -> RewardFn:
    """``package.module:function`` (see :func:`posttrain.train.reward.import_reward_function`), given the prompt's text and record."""
    from posttrain.train.reward import import_reward_function

    fn = import_reward_function(spec, "grpo.reward")
    return lambda prompt, completion: Scored(fn(prompt.text, completion, prompt.record))


def load_reward(spec: str) -> RewardFn:
    if spec in ("verifiers:loose", "verifiers:strict"):
        return verifier_reward(loose=spec.endswith("loose"))
    return function_reward(spec)


# -- log-probs and the reference ----------------------------------------------------------------


@dataclass
class Reference:
    """Where the KL term's reference log-probs come from.

    ``kind``: ``"none"`` (β = 0: nothing is kept), ``"adapter"`` (LoRA/DoRA: the policy's own weights with the
    adapter disabled, no copy), ``"copy"`` (full fine-tuning: a frozen copy of the initial model, the one
    case that costs a second set of weights).
    """

    kind: Literal["none", "adapter", "copy"]
    policy: torch.nn.Module
    frozen: torch.nn.Module | None = None
    one_row: bool = False  # Forward's one row (CPU)

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor | None:
        """[sequences, longest] log p of each target (:func:`sequence_logps`), or None without a reference."""
        if self.kind == "none":
            return None
        if self.kind == "adapter":
            with self.policy.disable_adapter():
                return sequence_logps(Forward(self.policy, one_row=self.one_row), batch)
        return sequence_logps(Forward(self.frozen, one_row=self.one_row), batch)


def make_reference(model: torch.nn.Module, beta: float, adapter_kind: str, one_row: bool = False) -> Reference:
    """The reference for ``model`` as it is now (call before any update or checkpoint load)."""
    if beta == 0:
        return Reference("none", model)
    if adapter_kind != "full":
        return Reference("adapter", model, one_row=one_row)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return Reference("copy", model, frozen, one_row)


# -- one step's samples -------------------------------------------------------------------------


def sample_batch(samples: list[Completion], pad_id: int) -> Batch:
    """Completions as one packed batch: prompt + completion, every completion token scored (its end-of-turn token too: the policy sampled it)."""
    return pack(scored_examples([c.prompt_token_ids + c.token_ids for c in samples], [len(c.prompt_token_ids) for c in samples]), pad_id)


def sequence_logps(module: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """[sequences, longest] log p of each target token, each sequence from column 0 (0 where nothing is scored)."""
    device = next(module.parameters()).device
    return per_sequence(run(module, batch, "logps", device=device), lengths_of(batch))


def clipped_tokens(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float) -> int:
    """Completion tokens whose ratio left [1-ε, 1+ε] in the direction the advantage pushes (their gradient is cut)."""
    ratio = torch.exp(logps.detach() - old_logps)
    a = advantages[:, None]
    return int((mask & (((ratio > 1 + clip) & (a > 0)) | ((ratio < 1 - clip) & (a < 0)))).sum())


def generation_seed(seed: int, step: int) -> int:
    """The sampling seed of step ``step``: fixed by the run's seed, so a resumed run samples what it would have."""
    return seed * 1_000_003 + step


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    losses: list[float]
    rewards: list[float] = field(default_factory=list)
    """Mean reward of each step of this invocation."""
    reference: str = "none"


def train(config: GRPOConfig) -> RunResult:
    """Run GRPO as configured; returns where the run is and the per-step losses and mean rewards."""
    cfg, g = config, config.grpo
    rt = Runtime.start(cfg.train)
    run_dir = Path(cfg.output_dir)
    reward_fn = load_reward(g.reward)  # a bad reward spec fails before any model loads
    load_libraries(g.verifiers)  # code verifiers the prompts name (posttrain synth autoif's verifiers.jsonl)
    loop.seed_everything(cfg.train.seed)

    # -- prompts --------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    report = ReadReport(cfg.data.path)
    prompts = read_prompts(cfg.data.path, format=cfg.data.format, split=cfg.data.split, subset=cfg.data.subset, revision=cfg.data.revision, on_error=cfg.data.on_error, report=report, validate=verifiers_of)
    if g.reward.startswith("verifiers:") and any(p.verifiable is None for p in prompts):
        raise loop.TrainingError(
            f"{cfg.data.path}: grpo.reward {g.reward} needs IFEval-format prompts (instruction_id_list, kwargs); use a reward function for other prompts"
        )
    prompt_ids = PromptEncoder(tokenizer, cfg.data.template).encode([p.engine_input() for p in prompts])
    keep = [i for i, ids in enumerate(prompt_ids) if cfg.data.max_prompt_length is None or len(ids) <= cfg.data.max_prompt_length]
    dropped_long = len(prompts) - len(keep)
    prompts, prompt_ids = [prompts[i] for i in keep], [prompt_ids[i] for i in keep]
    if g.prompts_per_step < rt.world:
        raise loop.TrainingError(f"grpo.prompts_per_step ({g.prompts_per_step}) must be at least the number of processes ({rt.world})")
    if len(prompts) < g.prompts_per_step:
        raise loop.TrainingError(
            f"{cfg.data.path}: {len(prompts)} usable prompts but one step needs grpo.prompts_per_step = {g.prompts_per_step}"
        )
    steps_per_epoch = len(prompts) // g.prompts_per_step
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    plan = loop.Plan([[i] for i in range(len(prompts))], g.prompts_per_step, steps_per_epoch, total)
    instruction_types = sorted({t for p in prompts if p.verifiable for t in p.verifiable.instruction_id_list})

    # -- model, reference, optimizer, schedule --------------------------------------------------
    model = load_model(cfg.model, rt.device)
    model = apply_adapter(model, cfg.adapter)
    # On CPU each micro-batch runs as one row in which a group's shared prompt runs once (see Forward).
    one_row = one_row_here(rt.device, cfg.model.attn_implementation)
    reference = make_reference(model, g.beta, cfg.adapter.kind, one_row)  # the initial model, before any resume
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.adapter.kind)
    step_module = rt.wrap(Forward(model, one_row=one_row), model)
    engine = Engine(model, tokenizer, batch_size=g.generation_batch_size, template=cfg.data.template)
    optimizer = loop.make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    updates = total * g.updates_per_batch
    scheduler = loop.make_scheduler(optimizer, cfg.train, updates)
    identity = loop.run_identity(cfg, data=loop.content_key(prompt_ids), batch=g.prompts_per_step)
    start, checkpoint, metrics = loop.start_run(run_dir, cfg, model, optimizer, scheduler, rt, identity)
    pad_id = engine.pad_token_id
    mb = cfg.train.micro_batch_size

    # -- the loop -------------------------------------------------------------------------------
    losses: list[float] = []
    rewards_log: list[float] = []
    progress = loop.progress_bar(rt.main, total, start, checkpoint, "reward {task.fields[reward]:.3f}  loss {task.fields[loss]:.4f}")
    model.train()
    with progress:
        task = progress.add_task("grpo", total=total, completed=start, loss=float("nan"), reward=float("nan"))
        for step in range(start, total):
            t0 = time.perf_counter()
            rows = plan.step_rows(step, cfg.train.seed)
            mine = [row[0] for row in rt.share(rows)]  # shares may differ by a prompt: the step's loss is weighted over all of them

            # 1. sample G completions of each prompt with the current policy (a prompt's samples do not
            #    depend on which process draws them, nor on the other prompts in the batch)
            params = SamplingParams(
                n=g.group_size, temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
                seed=generation_seed(cfg.train.seed, step), bf16=cfg.train.bf16,
            )  # fmt: skip
            outputs: list[list[Completion]] = engine.generate_ids([prompt_ids[i] for i in mine], params, progress=False)
            t_gen = time.perf_counter() - t0

            # 2. rewards and group advantages
            prefetch((prompts[i].verifiable, c.text) for i, completions in zip(mine, outputs) if prompts[i].verifiable is not None for c in completions)
            scored = [[reward_fn(prompts[i], c.text) for c in completions] for i, completions in zip(mine, outputs)]
            rewards = torch.tensor([[s.reward for s in group] for group in scored], dtype=torch.float32).reshape(len(mine), g.group_size)
            advantages = group_advantages(rewards).flatten().to(rt.device)
            samples = [c for completions in outputs for c in completions]
            micro = [sample_batch(samples[k : k + mb], pad_id) for k in range(0, len(samples), mb)]
            masks = [scored_mask(b).to(rt.device) for b in micro]
            # Each micro-batch's loss is a mean over its sequences; weighted by its share of the whole
            # step's sequences (every process's), the step's loss is the mean over all of them.
            share = [len(b.segments) / (len(rows) * g.group_size) for b in micro]

            # 3. what stays fixed over the μ updates: the reference's and (μ > 1) the sampling policy's log-probs
            with rt.autocast():
                ref = [reference.logps(b) for b in micro]
                old = None
                if g.updates_per_batch > 1:
                    with torch.no_grad():
                        old = [sequence_logps(rt.unwrap(step_module), b) for b in micro]

            # 4. μ clipped policy updates on the same samples; every process runs as many micro-batches as
            #    the busiest (a repeat has weight 0)
            loss_sum = kl_sum = 0.0
            clipped = scored_tokens = 0
            balanced = rt.balance(list(range(len(micro))))
            for _ in range(g.updates_per_batch):
                for j, (k, weight) in enumerate(balanced):
                    mask = masks[k]
                    adv = advantages[k * mb : k * mb + mask.shape[0]]
                    # (the packed attention held through the backward, which recomputes it under checkpointing)
                    with rt.no_sync(step_module, last=j == len(balanced) - 1), packed_attention(model, enabled=one_row):
                        with rt.autocast():
                            logps = sequence_logps(step_module, micro[k])
                        old_k = old[k] if old is not None else logps.detach()
                        loss, kl = grpo_loss(logps, old_k, ref[k], adv, mask, clip=g.clip, beta=g.beta)
                        (loss * (weight * share[k] * rt.gradient_scale)).backward()
                    loss_sum += weight * loss.item() * share[k] / g.updates_per_batch
                    kl_sum += weight * kl.item() * share[k] / g.updates_per_batch
                    clipped += int(weight) * clipped_tokens(logps, old_k, adv, mask, g.clip)
                    scored_tokens += int(weight) * int(mask.sum())
                grad_norm = rt.clip_grad_norm(model.parameters(), cfg.train.max_grad_norm)
                if not math.isfinite(grad_norm) or not math.isfinite(rt.total(loss_sum)):
                    raise loop.TrainingError(
                        _stop(f"the loss or gradient norm became non-finite (grad norm {grad_norm})", step, run_dir)
                    )
                optimizer.step()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            # 5. log (every process reduces the same numbers, in the same order)
            done = step + 1
            flat = rewards.flatten()
            n, reward_sum = rt.sum(flat.numel(), float(flat.sum()))
            mean = reward_sum / n
            lengths = [c.num_tokens for c in samples]
            var, loss_all, kl_all, clipped_all, scored_all, length_all, truncated_all, signal = rt.sum(
                float(((flat - mean) ** 2).sum()), loss_sum, kl_sum, clipped, scored_tokens, sum(lengths),
                sum(c.finish_reason == "length" for c in samples), int((rewards.std(dim=1) > 0).sum()),
            )  # fmt: skip
            record: dict[str, Any] = {
                "step": done,
                "loss": loss_all,
                "reward_mean": mean,
                "reward_std": math.sqrt(var / n),
                "kl": kl_all,
                "clip_fraction": clipped_all / max(scored_all, 1),
                "completion_length": length_all / n,
                "truncated": truncated_all / n,
                "groups_with_signal": signal / len(rows),
                "lr": lr,
                "grad_norm": grad_norm,
                "seconds": time.perf_counter() - t0,
                "generation_seconds": t_gen,
            }
            per_type = []
            for t in instruction_types:  # every process reduces every type, in the same order
                verdicts = [ok for group in scored for s in group for tid, ok in s.instructions if tid == t]
                per_type += [len(verdicts), sum(verdicts)]
            per_type = list(rt.sum(*per_type)) if per_type else []
            for t, count, followed in zip(instruction_types, per_type[0::2], per_type[1::2]):
                if count:
                    record[f"pass_rate/{t}"] = followed / count
            losses.append(record["loss"])
            rewards_log.append(mean)
            if done % cfg.train.log_every == 0 or done == total:
                metrics.log(record)
            progress.update(task, completed=done, loss=record["loss"], reward=mean)
            if rt.main and not progress.console.is_terminal and (done % max(1, total // 20) == 0 or done == total or step == start):
                progress.console.print(
                    f"step {done}/{total}  reward {mean:.3f} ± {record['reward_std']:.3f}  kl {record['kl']:.4f}  loss {record['loss']:.4f}",
                    highlight=False,
                )
            if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == total:
                state = {"total_steps": total, "identity": identity}
                loop.save_checkpoint(run_dir, done, model, optimizer, scheduler, state, cfg.train.keep_last, rt)
    metrics.close()
    final = run_dir / "final"
    if rt.main:
        save_final(model, tokenizer, final)
        loop.plot_losses(run_dir, f"GRPO of {cfg.model.name}")
        plot_rewards(run_dir, f"GRPO of {cfg.model.name}: reward ({g.reward})")
        stats = {
            "read": report.read,
            "format": report.format,
            "rejected": len(report.rejected),
            "dropped_too_long": dropped_long,
            "prompts": len(prompts),
            "steps_per_epoch": steps_per_epoch,
        }
        (run_dir / "data_stats.json").write_text(json.dumps(stats, indent=1))
    rt.barrier()
    rt.close()
    return RunResult(run_dir, final, total, losses, rewards_log, reference.kind)


def plot_rewards(run_dir: Path, title: str) -> Path | None:
    """``reward.png``: mean reward per step, ±1 std band (over the step's samples)."""
    rows = [r for r in loop.read_metrics(run_dir) if "reward_mean" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    mean = [r["reward_mean"] for r in rows]
    std = [r["reward_std"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, mean, lw=1.5, label="mean reward")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2, label="± std")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "reward.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def _stop(what: str, step: int, run_dir: Path) -> str:
    return loop.stop_message(what, step, run_dir, "Lower train.lr, keep train.max_grad_norm on, or turn off bf16.")
