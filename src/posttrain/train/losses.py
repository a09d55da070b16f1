"""Losses as pure functions on tensors (no models, no configs); shapes in the docstrings.

Every loss returns per-example values (not reduced) unless its docstring says otherwise; the loops
reduce with ``.mean()``. Implied rewards are always detached. Shapes: ``B`` pairs or sequences, ``T``
tokens, ``R`` rows of a batch, ``V`` the vocabulary, ``P`` prompts of ``G`` samples each.

Written here rather than taken from TRL: the objectives are a few lines each and are the product's core;
TRL keeps them inside Trainer methods that cannot be called on bare tensors. The log-prob core is ours
because the models' own loss path materialises the full ``[R, T, V]`` logits, which for a 150k-token
vocabulary dominates a small model's memory.

Sources (formulas as summarised in REFERENCE.md "Preference and RL objectives"):
DPO, Rafailov et al. 2023; cDPO, Mitchell 2023; IPO, Azar et al. 2023; SimPO, Meng et al. 2024;
ORPO, Hong et al. 2024; KTO, Ethayarajh et al. 2024; PPO-RLHF, Ouyang et al. 2022 (InstructGPT) with
GAE, Schulman et al. 2016; GRPO, Shao et al. 2024 (DeepSeekMath).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100
ROW_QUANTUM = 32  # _LinearTargetLogps pads its rows to a multiple of this

# ---------------------------------------------------------------------------------------------------
# log-probabilities of targets, without the full-vocabulary fp32 logits
# ---------------------------------------------------------------------------------------------------


class _LinearTargetLogps(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[y] for each row of ``h`` [N,d], a chunk of rows at a time; -> [N] fp32.

    Saves only ``h``, the weights and each row's logsumexp (N floats): the backward recomputes the
    logits and turns them, in place, into the logits' gradient ``g·(onehot(y) - softmax)``, then into
    the gradients of ``h``, ``W`` and ``b``. Autograd through ``linear → float → logsumexp/gather``
    would instead keep every chunk's fp32 logits alive until the backward ([N,V] in all) and build two
    or three more [chunk,V] tensors there. One more [N,d]×[d,V] matmul is the price (the same trade
    as Liger's and TRL's fused heads). Matmuls run in the autocast dtype when autocast is on (as
    ``lm_head(h)`` would), softmax and the log-probs in fp32, weight gradients in fp32. Rows are padded
    to a multiple of ``ROW_QUANTUM`` (their outputs dropped): the number of trained positions changes
    with every batch, and bf16 matmuls on CPU (oneDNN) keep compiled kernels for every shape they meet,
    so unpadded shapes made resident memory grow without bound over a run.

    On CPU the fp32 logits are built in pieces of about ``CPU_CHUNK_BYTES``, so that the passes over
    them (logsumexp's, the backward's exp and scaling) read them from cache, not memory: the forward
    takes :func:`_cpu_rows` rows at a time, and the backward takes every row against :func:`_cpu_columns`
    vocabulary entries at a time, which also writes each slice of ``W``'s gradient once instead of
    adding a [V,d] fp32 product into it for every chunk of rows. Elsewhere (CUDA) it is ``chunk`` rows
    at a time both ways, as before. ``python benchmarks/lm_head.py`` measures both.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, chunk: int) -> Tensor:
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        n = h.shape[0]
        h, y = F.pad(h, (0, 0, 0, -n % ROW_QUANTUM)), F.pad(y, (0, -n % ROW_QUANTUM))
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        rows = _cpu_rows(weight.shape[0], chunk) if _pieces(h) else chunk
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for k in range(0, h.shape[0], rows):
                logits = F.linear(h[k : k + rows].to(dtype), w, b).float()
                lse[k : k + rows] = torch.logsumexp(logits, dim=-1)
                out[k : k + rows] = logits.gather(-1, y[k : k + rows, None]).squeeze(-1) - lse[k : k + rows]
        ctx.save_for_backward(h, weight, bias, y, lse)
        ctx.chunk, ctx.dtype, ctx.n = chunk, dtype, n
        return out[:n]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, bias, y, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad = F.pad(grad, (0, h.shape[0] - ctx.n)).float()  # the padding rows get no gradient
        with torch.autocast(h.device.type, enabled=False):
            if _pieces(h):
                grad_h, grad_w, grad_b = _backward_by_columns(h, weight, bias, y, lse, grad, ctx.dtype, need_h, need_w, need_b)
            else:
                grad_h, grad_w, grad_b = _backward_by_rows(h, weight, bias, y, lse, grad, ctx.dtype, ctx.chunk, need_h, need_w, need_b)
        return (
            None if grad_h is None else grad_h[: ctx.n],
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
        )


CPU_CHUNK_BYTES = 16 << 20  # fp32 logits per piece on CPU: well inside a server CPU's L3 (see _LinearTargetLogps)
CPU_PIECES = True  # False: ``chunk`` rows at a time both ways on CPU too (benchmarks/lm_head.py compares the two)


def _pieces(h: Tensor) -> bool:
    return CPU_PIECES and h.device.type == "cpu"


def _cpu_rows(vocab: int, chunk: int) -> int:
    """Rows per forward piece on CPU: a power of two with ``CPU_CHUNK_BYTES`` of logits, 128 to ``chunk``
    (fewer than 128 rows would read the whole weight from memory for too little work)."""
    fit = CPU_CHUNK_BYTES // (4 * vocab)
    return max(min(128, chunk), min(chunk, 1 << max(fit, 1).bit_length() - 1))


def _cpu_columns(rows: int, vocab: int) -> int:
    """Vocabulary entries per backward piece on CPU: a power of two with ``CPU_CHUNK_BYTES`` of logits over
    ``rows`` rows, at least 256 (a power of two, so a run meets few matmul shapes)."""
    fit = CPU_CHUNK_BYTES // (4 * max(rows, 1))
    return min(vocab, max(256, 1 << max(fit, 1).bit_length() - 1))


def _dlogits(logits: Tensor, lse: Tensor, g: Tensor) -> Tensor:
    """In place: fp32 ``logits`` -> ``-g·softmax``, the logits' gradient but for the target's ``+g``."""
    return logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])


def _backward_by_rows(h, weight, bias, y, lse, grad, dtype, chunk, need_h, need_w, need_b):
    """``chunk`` rows at a time against the whole vocabulary; ``W``'s gradient accumulates over the chunks."""
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    for k in range(0, h.shape[0], chunk):
        hk, g = h[k : k + chunk].to(dtype), grad[k : k + chunk]
        dlogits = _dlogits(F.linear(hk, w, b).float(), lse[k : k + chunk], g)
        dlogits.scatter_add_(-1, y[k : k + chunk, None], g[:, None])
        if need_b:
            grad_b += dlogits.sum(dim=0)
        dlogits = dlogits.to(dtype)
        if need_h:
            grad_h[k : k + chunk] = dlogits @ w
        if need_w and dtype == torch.float32:
            grad_w.addmm_(dlogits.t(), hk)
        elif need_w:
            grad_w += (dlogits.t() @ hk).float()
    return grad_h, grad_w, grad_b


def _backward_by_columns(h, weight, bias, y, lse, grad, dtype, need_h, need_w, need_b):
    """Every row against :func:`_cpu_columns` vocabulary entries at a time: each slice of ``W``'s (and
    ``b``'s) gradient is written once; ``h``'s accumulates in fp32 over the slices."""
    vocab = weight.shape[0]
    step = _cpu_columns(h.shape[0], vocab)
    hc = h.to(dtype)
    grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
    grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.empty(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    rows = torch.arange(h.shape[0], device=h.device)
    for v in range(0, vocab, step):
        w = weight[v : v + step].to(dtype)
        b = None if bias is None else bias[v : v + step].to(dtype)
        dlogits = _dlogits(F.linear(hc, w, b).float(), lse, grad)
        hit = (y >= v) & (y < v + step)  # rows whose target is in this slice: + g at the target
        dlogits.index_put_((rows[hit], y[hit] - v), grad[hit], accumulate=True)
        if need_b:
            grad_b[v : v + step] = dlogits.sum(dim=0)
        dlogits = dlogits.to(dtype)
        if need_h and dtype == torch.float32:
            grad_h.addmm_(dlogits, w)
        elif need_h:
            grad_h += dlogits @ w
        if need_w:
            grad_w[v : v + step] = dlogits.t() @ hc
    return None if grad_h is None else grad_h.to(h.dtype), grad_w, grad_b


def _trained_logps(hidden: Tensor, targets: Tensor, lm_head: torch.nn.Module, chunk: int) -> tuple[Tensor, Tensor]:
    """The one chunked core: fp32 log p of each trained target, flattened in row-major order.

    ``hidden`` [R,T,d], ``targets`` [R,T] (already shifted, ``IGNORE`` where not scored) -> (log p [N]
    fp32, keep [R,T] bool) with N = keep.sum(). Logits exist only at trained positions, ≤ ``chunk`` rows
    at a time, upcast to fp32 one chunk at a time, so neither [R,T,V] nor [N,V] fp32 is ever built.
    A plain ``torch.nn.Linear`` head goes through :class:`_LinearTargetLogps`, which also keeps no
    logits for the backward; any other head (a PEFT-wrapped one, say) is called as a module, and
    autograd then keeps each chunk's fp32 logits until the backward, as ``cross_entropy`` would.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on [R, T]")
    keep = targets != IGNORE
    h = hidden[keep]
    y = targets[keep]
    if type(lm_head) is torch.nn.Linear:  # exactly Linear: subclasses (quantized layers) may compute differently
        return _LinearTargetLogps.apply(h, lm_head.weight, lm_head.bias, y, chunk), keep
    parts = []
    # max(N, 1): with no trained token, one empty chunk still runs, so the result stays on the autograd
    # graph (a zero loss with zero gradients, rather than a tensor that cannot be backpropagated)
    for k in range(0, max(h.shape[0], 1), chunk):
        logits = lm_head(h[k : k + chunk]).float()
        # log softmax at the target only: logit[y] - logsumexp(logits), no second [chunk, V] tensor
        picked = logits.gather(-1, y[k : k + chunk, None]).squeeze(-1)
        parts.append(picked - torch.logsumexp(logits, dim=-1))
    return torch.cat(parts), keep


def token_nll_sum(hidden: Tensor, targets: Tensor, lm_head: torch.nn.Module, *, chunk: int = 2048) -> Tensor:
    """Summed next-token negative log-likelihood over trained positions.

    ``hidden``: [rows, T, d] final hidden states; ``targets``: [rows, T], already shifted (``IGNORE`` where
    not trained); ``lm_head``: the output projection. Logits are computed only at trained positions, a
    chunk of positions at a time, and upcast to fp32 per chunk: the full [rows, T, vocab] logits are
    never materialised. Returns a scalar (the sum, not the mean: the loop divides by the step's
    trained-token count, so gradient accumulation and several processes give the same update).
    """
    logps, _ = _trained_logps(hidden, targets, lm_head, chunk)
    return -logps.sum()


def sequence_logps(hidden: Tensor, targets: Tensor, lm_head: torch.nn.Module, *, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Per-row summed log-probability of the trained targets.

    ``hidden`` [R,T,d], ``targets`` [R,T] (already shifted, ``IGNORE`` where not scored) -> (sum log p [R]
    fp32, token count [R] int64). A row with no scored token has sum 0 and count 0; per-token means are
    ``sum / count.clamp(min=1)``. Differentiable with respect to ``hidden`` and ``lm_head``.
    """
    logps, keep = _trained_logps(hidden, targets, lm_head, chunk)
    rows = keep.nonzero()[:, 0]
    total = logps.new_zeros(targets.shape[0]).index_add(0, rows, logps)
    return total, keep.sum(dim=1)


def token_logps(hidden: Tensor, targets: Tensor, lm_head: torch.nn.Module, *, chunk: int = 2048) -> Tensor:
    """-> [R,T] fp32 log p of each target (0 where ``IGNORE``); for PPO/GRPO per-token work. Differentiable."""
    logps, keep = _trained_logps(hidden, targets, lm_head, chunk)
    rows, cols = keep.nonzero(as_tuple=True)
    return logps.new_zeros(targets.shape).index_put((rows, cols), logps)


def token_entropy(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, *, chunk: int = 2048) -> torch.Tensor:
    """Entropy (nats, fp32) of the next-token distribution at each scored position [B,T], 0 elsewhere; for logging."""
    keep = targets != IGNORE
    h = hidden[keep]
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    parts = []
    for k in range(0, h.shape[0], chunk):
        logp = torch.log_softmax(lm_head(h[k : k + chunk]).float(), dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    if parts:
        out[keep] = torch.cat(parts)
    return out


# ---------------------------------------------------------------------------------------------------
# preference objectives
# ---------------------------------------------------------------------------------------------------


class PreferenceLoss(str, Enum):
    """The preference objectives (``loss_type`` values); the properties say what each needs from the loop."""

    SIGMOID = "sigmoid"  # DPO, dpo_loss
    HINGE = "hinge"  # hinge_loss (SLiC-style)
    IPO = "ipo"  # ipo_loss
    ROBUST = "robust"  # dpo_loss with label_smoothing > 0 (cDPO form, see dpo_loss)
    SIMPO = "simpo"  # simpo_loss
    ORPO = "orpo"  # orpo_loss
    KTO = "kto"  # kto_loss, on unpaired examples

    @property
    def needs_reference(self) -> bool:
        """Whether the loss takes reference-model log-probs (SimPO and ORPO do not)."""
        return self not in (PreferenceLoss.SIMPO, PreferenceLoss.ORPO)

    @property
    def paired(self) -> bool:
        """Whether examples come as (chosen, rejected) pairs (KTO's are single, labelled desirable or not)."""
        return self is not PreferenceLoss.KTO

    @property
    def average_logps(self) -> bool:
        """Whether the loss takes per-token mean log-probs instead of sums (IPO, SimPO, ORPO)."""
        return self in (PreferenceLoss.IPO, PreferenceLoss.SIMPO, PreferenceLoss.ORPO)


def _log_ratios(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    return chosen, rejected, chosen - rejected


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023): -log σ(βΔ), Δ = [log π(y_w) - log π_ref(y_w)] - [log π(y_l) - log π_ref(y_l)].

    All inputs [B], summed sequence log-probs -> (loss [B], chosen_rewards [B], rejected_rewards [B]),
    rewards β·(log π - log π_ref), detached. With ``label_smoothing`` ε > 0 (the ROBUST loss type) this is
    conservative DPO (Mitchell 2023): -(1-ε) log σ(βΔ) - ε log σ(-βΔ), i.e. the preference label is
    taken to be flipped with probability ε. Note that it is not rDPO of Chowdhury et al. 2024 (TRL's
    "robust"), which instead divides (1-ε)·(-log σ(βΔ)) - ε·(-log σ(-βΔ)) by 1 - 2ε.
    """
    chosen, rejected, delta = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return loss, (beta * chosen).detach(), (beta * rejected).detach()


def hinge_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge (SLiC, Zhao et al. 2023, with DPO's reference-normalised margin): relu(1 - βΔ).

    Inputs [B] summed log-probs -> (loss [B], chosen_rewards [B], rejected_rewards [B]), rewards as in
    ``dpo_loss``.
    """
    chosen, rejected, delta = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return torch.relu(1 - beta * delta), (beta * chosen).detach(), (beta * rejected).detach()


def ipo_loss(
    policy_chosen_avg: Tensor, policy_rejected_avg: Tensor, ref_chosen_avg: Tensor, ref_rejected_avg: Tensor, *, beta: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023): (Δ̄ - 1/(2β))², Δ̄ built from per-token *mean* log-probs.

    The paper's Δ uses sequence log-probs; the per-token average follows REFERENCE.md (and TRL), which
    keeps the target 1/(2β) on the same scale whatever the response lengths.
    Inputs [B] -> (loss [B], chosen_rewards [B], rejected_rewards [B]), rewards β·(avg log π - avg log π_ref).
    """
    chosen, rejected, delta = _log_ratios(policy_chosen_avg, policy_rejected_avg, ref_chosen_avg, ref_rejected_avg)
    return (delta - 1 / (2 * beta)) ** 2, (beta * chosen).detach(), (beta * rejected).detach()


def simpo_loss(
    policy_chosen_avg: Tensor, policy_rejected_avg: Tensor, *, beta: float = 2.5, gamma: float = 1.375
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024), reference-free: -log σ(β(avg log π(y_w) - avg log π(y_l)) - γ).

    Defaults are the paper's β = 2.5, γ = 1.375 (γ is the margin itself, not γ/β). The paper's optional
    label smoothing is left out. Inputs [B] per-token mean log-probs -> (loss [B], chosen_rewards [B],
    rejected_rewards [B]), rewards β·avg log π, detached.
    """
    loss = -F.logsigmoid(beta * (policy_chosen_avg - policy_rejected_avg) - gamma)
    return loss, (beta * policy_chosen_avg).detach(), (beta * policy_rejected_avg).detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012): expm1 near 0, log1p far from it."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_avg: Tensor, policy_rejected_avg: Tensor, chosen_nll: Tensor, *, lam: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024), reference-free: NLL(y_w) - λ log σ(log odds(y_w) - log odds(y_l)).

    odds = p/(1-p) with p = exp(mean token log-prob), so log odds = avg - log(1 - exp(avg)), computed
    with a stable log(1 - exp(·)). ``policy_*_avg`` [B] per-token mean log-probs (< 0), ``chosen_nll`` [B]
    the chosen response's SFT loss (the paper's per-token mean NLL) -> (loss [B], chosen_rewards [B],
    rejected_rewards [B]), rewards λ·avg log π, detached.

    Departure: averages are clamped to ≤ -1e-6 first, so a response the policy is certain of (avg = 0,
    also what an empty response gives) yields a large finite log odds instead of inf and NaN gradients.
    """
    chosen = policy_chosen_avg.clamp(max=-1e-6)
    rejected = policy_rejected_avg.clamp(max=-1e-6)
    log_odds = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))
    loss = chosen_nll - lam * F.logsigmoid(log_odds)
    return loss, (lam * policy_chosen_avg).detach(), (lam * policy_rejected_avg).detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    beta: float = 0.1,
    kl: Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024) on unpaired examples.

    r = log π(y|x) - log π_ref(y|x); desirable: λ_D·(1 - σ(β(r - z₀))), undesirable: λ_U·(1 - σ(β(z₀ - r))),
    z₀ = ``kl`` detached and clamped ≥ 0 (from ``kto_kl_estimate``). ``policy_logps``, ``ref_logps`` [B]
    summed log-probs, ``desirable`` [B] bool -> (loss [B], rewards [B] = β·r, detached).
    """
    r = policy_logps - ref_logps
    z0 = kl.detach().clamp(min=0)
    loss = torch.where(
        desirable.bool(),
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    return loss, (beta * r).detach()


def kto_kl_estimate(policy_logps_mismatched: Tensor, ref_logps_mismatched: Tensor) -> Tensor:
    """KTO's reference point z₀: mean(log π - log π_ref) over mismatched (x, y') pairs [B], clamped ≥ 0, detached -> scalar.

    The paper estimates KL(π‖π_ref) from completions paired with the wrong prompts in the same batch; it
    is a baseline, never differentiated.
    """
    return (policy_logps_mismatched - ref_logps_mismatched).mean().clamp(min=0).detach()


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Reward-model loss (Bradley–Terry, as in InstructGPT): -log σ(r_w - r_l).

    ``chosen_scores``, ``rejected_scores`` [B] -> (loss [B], accuracy [B] float: 1 where r_w > r_l, ties 0).
    """
    return -F.logsigmoid(chosen_scores - rejected_scores), (chosen_scores > rejected_scores).float().detach()


# ---------------------------------------------------------------------------------------------------
# PPO (InstructGPT): per-token KL penalty, score at the last token, GAE, clipped policy and value losses
# ---------------------------------------------------------------------------------------------------


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true (0 if there are none)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def kl_penalized_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, *, kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards: -kl_coef·(log π - log π_ref) on response tokens, plus the score at each row's last one.

    ``scores`` [B] reward-model scores, ``logps``/``ref_logps`` [B,T] log-probs of the sampled tokens,
    ``mask`` [B,T] true on response tokens -> (rewards [B,T], kl [B,T]), both 0 off the mask and detached
    (they are data for GAE, not differentiated). kl is the k1 estimator log π - log π_ref (InstructGPT's
    per-token penalty). A row with no response token gets no score.
    """
    mask = mask.bool()
    kl = torch.where(mask, logps.detach() - ref_logps.detach(), 0.0)
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1)  # last response token of each row (mask may have gaps)
    has = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    rewards = rewards.index_put((rows, last[has]), scores.detach()[has].to(rewards.dtype), accumulate=True)
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), right to left over each row's masked tokens.

    ``rewards``, ``values`` [B,T], ``mask`` [B,T] true on response tokens -> (advantages [B,T],
    returns [B,T] = advantages + values), 0 off the mask and detached. δ_t = r_t + γ·V_next - V_t,
    A_t = δ_t + γλ·A_next, where "next" is the next *masked-in* token (V = 0 and A = 0 past the last):
    positions off the mask are skipped, not treated as steps, so gaps (e.g. tool output inside a
    response) neither discount nor leak into the estimate. Advantage whitening is left to the loop.
    """
    mask = mask.bool()
    rewards, values = rewards.detach(), values.detach()
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_adv = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, 0.0)
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, clip: float = 0.2) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017): mean over masked tokens of max(-ρA, -clip(ρ, 1±ε)A).

    ``logps`` [B,T] current (differentiated), ``old_logps`` [B,T] at sampling, ``advantages`` [B,T],
    ``mask`` [B,T] -> (loss scalar, clip_fraction scalar: share of masked tokens where the clipped term
    was the larger, detached). Token-level mean over the whole batch, as in the common open-source PPO.
    """
    mask = mask.bool()
    ratio = torch.exp(torch.where(mask, logps - old_logps.detach(), 0.0))
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = _masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = _masked_mean((clipped > unclipped).float(), mask).detach()
    return loss, clip_fraction


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float = 0.2) -> Tensor:
    """Clipped value loss: 0.5·max((V - R)², (V_old + clip(V - V_old, ±ε) - R)²), mean over masked tokens -> scalar.

    ``values`` [B,T] current (differentiated), ``old_values`` [B,T] at sampling, ``returns`` [B,T] from ``gae``.
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * _masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask.bool())


# ---------------------------------------------------------------------------------------------------
# GRPO (DeepSeekMath)
# ---------------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, *, eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024): (r - mean)/(std + eps) within each prompt's group.

    ``rewards`` [P,G] -> advantages [P,G]. The std is the population one (unbiased=False), so a group of
    one, or of equal rewards, gives zeros rather than NaN. (TRL uses the unbiased std; the difference is
    a factor √((G-1)/G) on the advantages.)
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def grpo_loss(
    logps: Tensor, old_logps: Tensor, ref_logps: Tensor | None, advantages: Tensor, mask: Tensor, *, clip: float = 0.2, beta: float = 0.04
) -> tuple[Tensor, Tensor]:
    """GRPO objective (Shao et al. 2024, eq. 3), negated to be minimised -> (loss scalar, kl scalar).

    Per token: -min(ρA, clip(ρ, 1±ε)A) + β·(exp(ref - logp) - (ref - logp) - 1), ρ = exp(logp - old_logp),
    the last term the k3 estimator of KL(π‖π_ref). Averaged over each sequence's masked tokens, then
    over sequences, as in the paper's 1/G Σ 1/|o_i| Σ_t. ``logps`` [B,T] (differentiated), ``old_logps``
    [B,T], ``ref_logps`` [B,T] or None, ``advantages`` [B] (one per sequence, from ``group_advantages``),
    ``mask`` [B,T]. The returned kl is the same two-level mean of the k3 term, detached. When
    ``ref_logps`` is None (β = 0, no reference model kept) the KL term is skipped and kl is 0.
    """
    mask = mask.bool()
    m = mask.to(logps.dtype)

    def per_seq(x: Tensor) -> Tensor:  # mean over each sequence's tokens, then over sequences
        return ((x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()

    ratio = torch.exp(torch.where(mask, logps - old_logps.detach(), 0.0))
    a = advantages.detach()[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    if ref_logps is None:
        return per_seq(per_token), logps.new_zeros(())
    log_ratio = torch.where(mask, ref_logps.detach() - logps, 0.0)
    kl = torch.exp(log_ratio) - log_ratio - 1
    return per_seq(per_token + beta * kl), per_seq(kl).detach()
