"""RLHF with PPO as in InstructGPT (Ouyang et al. 2022, §3.5), one loop read top to bottom:
rollouts → scores → KL-penalised per-token rewards → GAE → PPO epochs of clipped policy + value loss → log.

What this does, and where it departs from the paper:

* **Policy**: any causal LM (an SFT run's ``final/`` when it is a full model; export a LoRA SFT run with
  ``posttrain export`` first), trained in full or through a LoRA/DoRA adapter.
* **Reference**: the initial policy, frozen. In full fine-tuning that is a second copy of the weights;
  with LoRA/DoRA it is the *same* model with its adapter switched off (peft's ``disable_adapter()``), so
  the base weights are in memory once.
* **Value function**: a ``Linear(d, 1)`` head, zero-initialised, on the policy's own final hidden states
  (one trunk, as TRL's classic ``AutoModelForCausalLMWithValueHead``). The value loss, weighted by
  ``ppo.vf_coef``, trains the head and (through it) the trunk. InstructGPT instead initialised a
  separate value model from the reward model: better values, a third model's memory.
* **Reward**: the reward model's score of (prompt, response), or a Python reward ``package.module:function`` returning a
  float for (prompt, response). The response is decoded and rendered again with the reward model's own
  tokenizer and chat template (so policy and reward model may tokenize differently), and scored after
  its end-of-turn token, exactly as ``posttrain rm score`` would. Per-token rewards are
  ``-kl_coef·(log π - log π_ref)`` with the score added at the response's last token
  (:func:`~posttrain.train.losses.kl_penalized_rewards`); the paper's β is 0.02, ours defaults to 0.05.
* **Rollouts**: ``ppo.prompts_per_step × ppo.samples_per_prompt`` sequences per step from the generation
  engine (temperature 1 by default), each step's sampling seed fixed by (``train.seed``, step). The
  sampled tokens' log-probs are recomputed with a training-shaped forward pass, so the PPO ratio is
  exactly 1 before the first update (the sampler's own log-probs differ by rounding and would not).
  Dropout is switched off in the policy (its modules' rates set to 0, as TRL does) for the same reason;
  the policy stays in train mode, so gradient checkpointing still applies.
* **Update**: ``ppo.epochs`` passes over the rollouts in shuffled minibatches of
  ``micro_batch_size × grad_accum`` sequences, one optimizer step each; advantages whitened over the
  batch's response tokens. The pretraining-loss mix (PPO-ptx) is not implemented.

Metrics per step (``metrics.jsonl``): reward (mean score), kl (per sequence, summed over its tokens),
entropy, policy and value loss, clip fraction, response length and more, plotted in ``reward.png``; a
few samples per step go to ``samples.jsonl``. A checkpoint holds the policy (or adapter), the value head, optimizer, schedule and
RNG; sampling seeds and minibatch order are functions of the step, so a resumed run repeats an
uninterrupted one.

Under torchrun (DDP), ``ppo.prompts_per_step`` counts prompts over all processes and each samples its
share; an optimizer step takes ``micro_batch_size × grad_accum`` of each process's rollouts, and the
token means and the advantages' whitening are taken over all processes' rollouts, as one process would.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.config import PPOConfig
from posttrain.data.formats import ReadReport, read_records
from posttrain.data.packing import Batch
from posttrain.data.prompts import prompt_of
from posttrain.generate.engine import Engine
from posttrain.generate.params import Completion, SamplingParams
from posttrain.models.adapters import apply_adapter, enable_gradient_checkpointing, save_final
from posttrain.models.load import load_model, load_tokenizer
from posttrain.records import Record
from posttrain.train import loop
from posttrain.train.forward import Forward, one_row_here, pack, per_sequence, run, scored_examples
from posttrain.train.losses import gae, kl_penalized_rewards, ppo_policy_loss, ppo_value_loss
from posttrain.train.packed_attention import packed_attention
from posttrain.train.reward import hidden_size, import_reward_function, load_reward_model, pad_id_of
from posttrain.train.runtime import Runtime

VALUE_HEAD = "value_head.safetensors"
INFO = "ppo_policy.json"
SAMPLES_PER_STEP = 4  # written to samples.jsonl

Prompt = str | list[dict]  # text given to the model as it is, or chat messages (rendered with the template)
RewardFn = Callable[[list[Prompt], list[str]], list[float]]


# -- the models ---------------------------------------------------------------------------------


def policy_with_value(lm: torch.nn.Module, one_row: bool = False) -> Forward:
    """The policy LM and its value head, one module (one optimizer, one checkpoint): a :class:`Forward` whose
    ``head`` is a zero-initialised ``Linear(d, 1)``. ``"values"`` at position t is the value of the state
    in which the token at t + 1 was sampled."""
    head = torch.nn.Linear(hidden_size(lm), 1).to(next(lm.parameters()).device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return Forward(lm, head, one_row=one_row)


@dataclass
class PPOModels:
    """Everything with weights that a PPO run holds, besides the reward model."""

    policy: Forward  # the LM (.model) and its value head (.head)
    reference: torch.nn.Module | None  # None: the policy with its adapter disabled

    @torch.no_grad()
    def rollout_stats(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequence order (log p, values, entropy of the policy at each scored position), no gradients."""
        return run(self.policy, batch, "logps", "values", "entropy", device=self.device)

    @torch.no_grad()
    def reference_logps(self, batch: Batch) -> torch.Tensor:
        if self.reference is None:
            with self.policy.model.disable_adapter():
                return run(Forward(self.policy.model, one_row=self.policy.one_row), batch, "logps", device=self.device)
        return run(Forward(self.reference, one_row=self.policy.one_row), batch, "logps", device=self.device)

    @property
    def device(self) -> torch.device:
        return self.policy.head.weight.device


def build_models(cfg: PPOConfig, device: torch.device) -> PPOModels:
    """The policy (with adapter and value head) and the reference: a frozen copy only in full fine-tuning."""
    lm = load_model(cfg.model, device)
    reference = None
    if cfg.adapter.kind == "full":
        reference = copy.deepcopy(lm).eval().requires_grad_(False)
    lm = apply_adapter(lm, cfg.adapter)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(lm, cfg.adapter.kind)
    disable_dropout(lm)
    # On CPU each micro-batch runs as one row, a prompt its samples share once (see Forward).
    return PPOModels(policy_with_value(lm, one_row_here(device, cfg.model.attn_implementation)), reference)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout rate in ``model`` to 0: ``nn.Dropout`` modules (LoRA's included) and attention's own rate."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


# -- prompts and rewards ------------------------------------------------------------------------


def scored_record(prompt: Prompt, response: str) -> Record:
    """(prompt, response) as the prompt/completion record a reward model scores."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": response}
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": response}]}


def load_reward(spec: str, device: torch.device, batch_size: int) -> RewardFn:
    """An ``rm`` run directory, or a Python reward ``package.module:function`` (:func:`import_reward_function`)."""
    if not Path(spec).exists():
        fn = import_reward_function(spec, "reward")
        return lambda prompts, responses: [fn(p, r) for p, r in zip(prompts, responses)]
    scorer = load_reward_model(spec, device=device, batch_size=batch_size)
    return lambda prompts, responses: scorer.score([scored_record(p, r) for p, r in zip(prompts, responses)])


# -- rollouts -----------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """One step's sampled sequences (prompt + response) and, in :func:`~posttrain.train.forward.per_sequence`'s
    layout [N, longest], which positions' targets are response tokens."""

    sequences: list[list[int]]
    prompt_lengths: list[int]
    mask: torch.Tensor  # [N, T]: mask[i, t] = token t + 1 of sequence i is a response token

    def batch(self, rows: list[int], pad_id: int) -> Batch:
        """The sequences ``rows`` packed into rows for one forward (no padding between them)."""
        return pack(scored_examples([self.sequences[r] for r in rows], [self.prompt_lengths[r] for r in rows]), pad_id)


def make_rollouts(completions: list[Completion], device: torch.device) -> Rollouts:
    seqs = [list(c.prompt_token_ids) + list(c.token_ids) for c in completions]
    mask = torch.zeros((len(seqs), max(len(s) for s in seqs)), dtype=torch.bool)
    for i, (s, c) in enumerate(zip(seqs, completions)):
        mask[i, len(c.prompt_token_ids) - 1 : len(s) - 1] = True
    return Rollouts(seqs, [len(c.prompt_token_ids) for c in completions], mask.to(device))


def in_micro_batches(fn: Callable[[Batch], Any], rollouts: Rollouts, micro: int, pad_id: int) -> list[torch.Tensor]:
    """``fn(batch)`` -> sequence-order tensors over micro-batches of ``micro`` sequences, put back as [N, T] (0 after each sequence)."""
    n, t = rollouts.mask.shape
    outs: list[torch.Tensor] | None = None
    for k in range(0, n, micro):
        rows = list(range(k, min(n, k + micro)))
        parts = fn(rollouts.batch(rows, pad_id))
        parts = parts if isinstance(parts, tuple) else (parts,)
        lengths = [len(rollouts.sequences[r]) for r in rows]
        if outs is None:
            outs = [torch.zeros((n, t), dtype=torch.float32, device=parts[0].device) for _ in parts]
        for out, part in zip(outs, parts):
            out[k : k + len(rows), : max(lengths)] = per_sequence(part, lengths)
    assert outs is not None
    return outs


def whiten(x: torch.Tensor, mask: torch.Tensor, rt: Runtime | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked positions (of every process's ``x``, when ``rt`` is several); 0 elsewhere."""
    rt = rt or Runtime()
    values = x[mask].double()
    n, total = rt.sum(values.numel(), float(values.sum()))
    if n < 2:
        return torch.zeros_like(x)
    mean = total / n
    std = math.sqrt(rt.total(float(((values - mean) ** 2).sum())) / (n - 1))  # unbiased, as torch.std
    return torch.where(mask, (x - mean) / (std + 1e-8), 0.0)


# -- the loop -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    records: list[dict[str, Any]] = field(default_factory=list)  # this invocation's metrics, one per step

    @property
    def losses(self) -> list[float]:
        """The PPO loss (policy + vf_coef · value) of each step of this invocation, as the other runs report."""
        return [r["loss"] for r in self.records]

    @property
    def rewards(self) -> list[float]:
        return [r["reward"] for r in self.records]


def train(config: PPOConfig) -> RunResult:
    """Run PPO as configured; returns where the run is and this invocation's per-step metrics."""
    cfg, ppo = config, config.ppo
    rt = Runtime.start(cfg.train)
    run_dir = Path(cfg.output_dir)
    loop.seed_everything(cfg.train.seed)
    if ppo.prompts_per_step % rt.world:
        raise loop.TrainingError(f"ppo.prompts_per_step ({ppo.prompts_per_step}) must be a multiple of the number of processes ({rt.world})")
    local_rollouts = ppo.prompts_per_step // rt.world * ppo.samples_per_prompt
    minibatch = cfg.train.micro_batch_size * cfg.train.grad_accum
    if local_rollouts % minibatch:
        raise loop.TrainingError(
            f"each of the {rt.world} processes samples {local_rollouts} rollouts a step (ppo.prompts_per_step × ppo.samples_per_prompt / processes), "
            f"not a multiple of train.micro_batch_size × train.grad_accum ({minibatch})"
        )

    # -- prompts --------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    report = ReadReport(cfg.data.path)
    records = read_records(cfg.data.path, format=cfg.data.format, on_error=cfg.data.on_error, split=cfg.data.split, subset=cfg.data.subset, revision=cfg.data.revision, report=report)
    all_prompts = [prompt_of(r).prompt for r in records]  # the data layer's notion of a record's prompt, as label uses

    # -- models, optimizer, schedule ------------------------------------------------------------
    models = build_models(cfg, rt.device)
    policy = models.policy
    step_module = rt.wrap(policy, policy.model)
    engine = Engine(policy.model, tokenizer, batch_size=ppo.generation_batch_size, template=cfg.data.template)
    # A text prompt goes to the model as it is (as prompt/completion training renders it); chats get the template.
    encoded = engine.encode([{"prompt": p, "completion": ""} if isinstance(p, str) else p for p in all_prompts])
    keep = [i for i, ids in enumerate(encoded) if 0 < len(ids) <= cfg.data.max_prompt_length]
    prompts, prompt_ids = [all_prompts[i] for i in keep], [encoded[i] for i in keep]
    if len(prompts) < ppo.prompts_per_step:
        raise loop.TrainingError(
            f"{cfg.data.path}: {len(prompts)} usable prompts ({len(all_prompts) - len(prompts)} longer than data.max_prompt_length "
            f"{cfg.data.max_prompt_length} tokens or empty) but a step needs ppo.prompts_per_step = {ppo.prompts_per_step}"
        )
    steps_per_epoch = len(prompts) // ppo.prompts_per_step
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    plan = loop.Plan([[i] for i in range(len(prompts))], ppo.prompts_per_step, steps_per_epoch, total)
    reward_fn = load_reward(cfg.reward, rt.device, cfg.train.micro_batch_size)

    updates_per_step = ppo.epochs * (local_rollouts // minibatch)
    optimizer = loop.make_optimizer(policy, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    total_updates = total * updates_per_step
    scheduler = loop.make_scheduler(optimizer, cfg.train, total_updates)
    identity = loop.run_identity(cfg, data=loop.content_key(prompt_ids), batch=minibatch * rt.world)
    start, checkpoint, metrics = loop.start_run(run_dir, cfg, policy, optimizer, scheduler, rt, identity)
    samples_path = run_dir / "samples.jsonl"
    if rt.main:
        _truncate_samples(samples_path, start if checkpoint else 0)
    pad_id = pad_id_of(tokenizer)
    micro = cfg.train.micro_batch_size

    # -- the loop -------------------------------------------------------------------------------
    logged: list[dict[str, Any]] = []
    policy.train()  # dropout is off (build_models): train mode only keeps gradient checkpointing on
    for step in range(start, total):
        t0 = time.perf_counter()

        # 1. rollouts: sample (each process its share of the prompts), score, and the per-token
        #    quantities PPO needs, without gradients
        chosen = list(rt.share([row[0] for row in plan.step_rows(step, cfg.train.seed)]))
        params = SamplingParams(
            max_new_tokens=ppo.max_new_tokens,
            temperature=ppo.temperature,
            top_p=ppo.top_p,
            top_k=ppo.top_k,
            n=ppo.samples_per_prompt,
            seed=cfg.train.seed * 1_000_003 + step,
            bf16=cfg.train.bf16,
        )
        completions = [c for group in engine.generate_ids([prompt_ids[i] for i in chosen], params, progress=False) for c in group]
        owners = [prompts[i] for i in chosen for _ in range(ppo.samples_per_prompt)]
        responses = [c.text for c in completions]
        raw_scores = torch.tensor(reward_fn(owners, responses), dtype=torch.float32, device=rt.device)
        truncated = torch.tensor([c.finish_reason == "length" for c in completions], device=rt.device)
        scores = raw_scores - (ppo.missing_eos_penalty or 0.0) * truncated.float()
        rollouts = make_rollouts(completions, rt.device)
        mask = rollouts.mask
        with rt.autocast():
            old_logps, old_values, entropy = in_micro_batches(models.rollout_stats, rollouts, micro, pad_id)
            (ref_logps,) = in_micro_batches(models.reference_logps, rollouts, micro, pad_id)
        rewards, kl = kl_penalized_rewards(scores, old_logps, ref_logps, mask, kl_coef=ppo.kl_coef)
        advantages, returns = gae(rewards, old_values, mask, gamma=ppo.gamma, lam=ppo.lam)
        if ppo.whiten_advantages:
            advantages = whiten(advantages, mask, rt)
        kl_per_seq = kl.sum(dim=1)
        if not rt.all_finite(kl_per_seq, scores):
            raise loop.TrainingError(_stop("the KL or the reward became non-finite", step, run_dir))

        # 2. PPO epochs over the rollouts: shuffled minibatches, one optimizer step each (every process
        #    takes the same number of its own rollouts per update)
        order_rng = random.Random((cfg.train.seed * 1_000_003 + step) * 7919 + rt.rank)
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
        grad_norms = []
        total_tokens = 0.0
        lr = scheduler.get_last_lr()[0]
        for _ in range(ppo.epochs):
            order = list(range(len(completions)))
            order_rng.shuffle(order)
            for b in range(0, len(order), minibatch):
                rows = order[b : b + minibatch]
                mb_tokens = rt.total(float(mask[rows].sum()))  # over every process's part of this update
                parts = [rows[k : k + micro] for k in range(0, len(rows), micro)]
                for k, part in enumerate(parts):
                    lengths = [len(rollouts.sequences[r]) for r in part]
                    width = max(lengths)
                    m = mask[part, :width]
                    with rt.no_sync(step_module, last=k == len(parts) - 1), rt.autocast(), packed_attention(policy.model, enabled=policy.one_row):
                        outputs = run(step_module, rollouts.batch(part, pad_id), "logps", "values", device=rt.device)
                        logps, values = (per_sequence(x, lengths) for x in outputs)
                        pg_loss, clip_fraction = ppo_policy_loss(logps, old_logps[part, :width], advantages[part, :width], m, clip=ppo.clip)
                        vf_loss = ppo_value_loss(values, old_values[part, :width], returns[part, :width], m, clip=ppo.value_clip)
                        # Both losses are token means over the micro-batch: weight by its share of the update's tokens.
                        tokens = float(m.sum())
                        ((pg_loss + ppo.vf_coef * vf_loss) * (tokens * rt.gradient_scale / max(mb_tokens, 1.0))).backward()
                    sums["policy_loss"] += float(pg_loss.detach()) * tokens
                    sums["value_loss"] += float(vf_loss.detach()) * tokens
                    sums["clip_fraction"] += float(clip_fraction) * tokens
                    sums["approx_kl"] += float(((old_logps[part, :width] - logps.detach()) * m).sum())
                    total_tokens += tokens
                loss_now = rt.total(sums["policy_loss"] + sums["value_loss"])
                if not math.isfinite(loss_now):
                    raise loop.TrainingError(_stop("the PPO loss became non-finite", step, run_dir))
                grad_norm = rt.clip_grad_norm(policy.parameters(), cfg.train.max_grad_norm)
                if not math.isfinite(grad_norm):
                    raise loop.TrainingError(_stop(f"the gradient norm became {grad_norm}", step, run_dir))
                grad_norms.append(grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

        # 3. log (means over every process's rollouts)
        done = step + 1
        totals = dict(zip(sums, rt.sum(*sums.values())))
        total_tokens = rt.total(total_tokens)
        per_token = {k: v / max(total_tokens, 1.0) for k, v in totals.items()}
        n, score_sum, score_sq, kl_sum, ret_sum, trunc, response_tokens, entropy_sum, value_sum, adv_sum, adv_sq = rt.sum(
            len(raw_scores), float(raw_scores.sum()), float((raw_scores.double() ** 2).sum()), float(kl_per_seq.sum()),
            float((scores - ppo.kl_coef * kl_per_seq).sum()), float(truncated.float().sum()), float(mask.sum()),
            float((entropy * mask).sum()), float((old_values * mask).sum()), float(advantages[mask].double().sum()),
            float((advantages[mask].double() ** 2).sum()),
        )  # fmt: skip
        reward_mean = score_sum / n
        record = {
            "step": done,
            "reward": reward_mean,
            "reward_std": _std(n, score_sum, score_sq),
            "kl": kl_sum / n,
            "return": ret_sum / n,
            "entropy": entropy_sum / max(response_tokens, 1),
            "policy_loss": per_token["policy_loss"],
            "value_loss": per_token["value_loss"],
            "loss": per_token["policy_loss"] + ppo.vf_coef * per_token["value_loss"],
            "clip_fraction": per_token["clip_fraction"],
            "approx_kl": per_token["approx_kl"],
            "value_mean": value_sum / max(response_tokens, 1),
            "advantage_std": _std(response_tokens, adv_sum, adv_sq),
            "response_length": response_tokens / n,
            "truncated": trunc / n,
            "lr": lr,
            "grad_norm": max(grad_norms),
            "seconds": time.perf_counter() - t0,
        }
        logged.append(record)
        if done % cfg.train.log_every == 0 or done == total:
            metrics.log(record)
            if rt.main:
                with samples_path.open("a") as f:
                    for p, r, s in list(zip(owners, responses, raw_scores.tolist()))[:SAMPLES_PER_STEP]:
                        f.write(json.dumps({"step": done, "prompt": p, "response": r, "score": s}) + "\n")
        if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == total:
            state = {"total_steps": total, "identity": identity}
            loop.save_checkpoint(run_dir, done, policy, optimizer, scheduler, state, cfg.train.keep_last, rt)
    metrics.close()
    final = run_dir / "final"
    if rt.main:
        save_policy(policy, tokenizer, engine.prompts.renderer.template, cfg, final)
        plot_rewards(run_dir, f"PPO of {cfg.model.name}")
        (run_dir / "data_stats.json").write_text(
            json.dumps(
                {
                    "read": report.read,
                    "rejected": len(report.rejected),
                    "prompts": len(prompts),
                    "dropped_long_prompts": len(all_prompts) - len(prompts),
                    "steps_per_epoch": steps_per_epoch,
                },
                indent=1,
            )
        )
    rt.barrier()
    rt.close()
    return RunResult(run_dir, final, total, logged)


def _std(n: float, total: float, squares: float) -> float:
    """The unbiased standard deviation of ``n`` values from their sum and sum of squares (0 for fewer than 2)."""
    if n < 2:
        return 0.0
    mean = total / n
    return math.sqrt(max(squares - n * mean * mean, 0.0) / (n - 1))


def plot_rewards(run_dir: Path, title: str) -> Path | None:
    """``reward.png``: mean reward and KL to the reference per step (the loss of PPO says little)."""
    rows = loop.read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["reward"] for r in rows], label="reward (mean score)", lw=1.5)
    ax.set_xlabel("PPO step")
    ax.set_ylabel("reward")
    kl_ax = ax.twinx()
    kl_ax.plot(steps, [r["kl"] for r in rows], color="tab:red", label="KL to reference (per sequence)", lw=1.0, alpha=0.7)
    kl_ax.set_ylabel("KL (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.9))
    fig.tight_layout()
    out = run_dir / "reward.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def _truncate_samples(path: Path, step: int) -> None:
    """Keep the samples of steps up to ``step`` (those of a resumed-from timeline after it never happened)."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def save_policy(policy: Forward, tokenizer: Any, template: str, cfg: PPOConfig, out: Path) -> None:
    """``final/``: the policy (a model directory, or an adapter on ``model.name``) with its tokenizer, plus the value head."""
    from safetensors.torch import save_file

    tokenizer.chat_template = template
    save_final(policy.model, tokenizer, out)
    save_file({k: v.detach().float().contiguous() for k, v in policy.head.state_dict().items()}, out / VALUE_HEAD)
    info = {
        "kind": "ppo_policy",
        "value_head": VALUE_HEAD,
        "adapter": cfg.adapter.kind,
        "base_model": cfg.model.model_dump(mode="json"),
        "reward": cfg.reward,
    }
    (out / INFO).write_text(json.dumps(info, indent=1))


def _stop(what: str, step: int, run_dir: Path) -> str:
    return loop.stop_message(what, step, run_dir, "Lower train.lr, raise ppo.kl_coef, keep train.max_grad_norm on, or turn off bf16.")
