"""Losses: hand-computed values (the arithmetic in the comments), the properties each objective promises,
and the chunked log-prob core against the naive full-logits computation."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.train import losses as L
from posttrain.train.losses import (
    IGNORE,
    PreferenceLoss,
    bradley_terry_loss,
    dpo_loss,
    gae,
    group_advantages,
    grpo_loss,
    hinge_loss,
    ipo_loss,
    kl_penalized_rewards,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logps,
    simpo_loss,
    token_logps,
    token_nll_sum,
)


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def approx(x: torch.Tensor, expected, tol: float = 1e-5) -> None:
    torch.testing.assert_close(x.detach().double(), torch.as_tensor(expected, dtype=torch.float64).expand_as(x), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------------
# the contract: names, argument order, keyword-only markers
# ---------------------------------------------------------------------------------------------------

P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
CONTRACT = {
    "sequence_logps": [("hidden", P), ("targets", P), ("lm_head", P), ("chunk", K)],
    "token_logps": [("hidden", P), ("targets", P), ("lm_head", P), ("chunk", K)],
    "token_nll_sum": [("hidden", P), ("targets", P), ("lm_head", P), ("chunk", K)],
    "dpo_loss": [("policy_chosen", P), ("policy_rejected", P), ("ref_chosen", P), ("ref_rejected", P), ("beta", K), ("label_smoothing", K)],
    "hinge_loss": [("policy_chosen", P), ("policy_rejected", P), ("ref_chosen", P), ("ref_rejected", P), ("beta", K)],
    "ipo_loss": [("policy_chosen_avg", P), ("policy_rejected_avg", P), ("ref_chosen_avg", P), ("ref_rejected_avg", P), ("beta", K)],
    "simpo_loss": [("policy_chosen_avg", P), ("policy_rejected_avg", P), ("beta", K), ("gamma", K)],
    "orpo_loss": [("policy_chosen_avg", P), ("policy_rejected_avg", P), ("chosen_nll", P), ("lam", K)],
    "kto_loss": [
        ("policy_logps", P),
        ("ref_logps", P),
        ("desirable", P),
        ("beta", K),
        ("kl", K),
        ("desirable_weight", K),
        ("undesirable_weight", K),
    ],
    "kto_kl_estimate": [("policy_logps_mismatched", P), ("ref_logps_mismatched", P)],
    "bradley_terry_loss": [("chosen_scores", P), ("rejected_scores", P)],
    "kl_penalized_rewards": [("scores", P), ("logps", P), ("ref_logps", P), ("mask", P), ("kl_coef", K)],
    "gae": [("rewards", P), ("values", P), ("mask", P), ("gamma", K), ("lam", K)],
    "ppo_policy_loss": [("logps", P), ("old_logps", P), ("advantages", P), ("mask", P), ("clip", K)],
    "ppo_value_loss": [("values", P), ("old_values", P), ("returns", P), ("mask", P), ("clip", K)],
    "group_advantages": [("rewards", P), ("eps", K)],
    "grpo_loss": [("logps", P), ("old_logps", P), ("ref_logps", P), ("advantages", P), ("mask", P), ("clip", K), ("beta", K)],
}
DEFAULTS = {
    "dpo_loss": {"beta": 0.1, "label_smoothing": 0.0},
    "simpo_loss": {"beta": 2.5, "gamma": 1.375},
    "orpo_loss": {"lam": 0.1},
    "kto_loss": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "gae": {"gamma": 1.0, "lam": 0.95},
    "group_advantages": {"eps": 1e-4},
    "grpo_loss": {"clip": 0.2, "beta": 0.04},
    "sequence_logps": {"chunk": 2048},
}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_signatures_follow_the_spec(name):
    params = inspect.signature(getattr(L, name)).parameters
    assert [(p.name, p.kind) for p in params.values()] == CONTRACT[name]
    for arg, default in DEFAULTS.get(name, {}).items():
        assert params[arg].default == default
    assert L.IGNORE == IGNORE == -100


def test_preference_enum_says_what_each_loss_needs():
    assert [m.value for m in PreferenceLoss] == ["sigmoid", "hinge", "ipo", "robust", "simpo", "orpo", "kto"]
    assert PreferenceLoss("simpo") is PreferenceLoss.SIMPO and PreferenceLoss.SIMPO == "simpo"
    assert {m for m in PreferenceLoss if not m.needs_reference} == {PreferenceLoss.SIMPO, PreferenceLoss.ORPO}
    assert {m for m in PreferenceLoss if not m.paired} == {PreferenceLoss.KTO}
    assert {m for m in PreferenceLoss if m.average_logps} == {PreferenceLoss.IPO, PreferenceLoss.SIMPO, PreferenceLoss.ORPO}


def test_reference_free_losses_take_no_reference():
    assert PreferenceLoss.SIMPO.needs_reference is False and PreferenceLoss.ORPO.needs_reference is False
    for fn in (simpo_loss, orpo_loss):
        assert not any("ref" in name for name in inspect.signature(fn).parameters), fn.__name__


# ---------------------------------------------------------------------------------------------------
# log-probs: chunked core vs naive
# ---------------------------------------------------------------------------------------------------


class RowRecorder(torch.nn.Module):
    """Wraps an lm_head and records the largest number of rows (positions) it is ever given at once."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head, self.largest, self.total, self.ndims = head, 0, 0, set()

    def forward(self, h):
        self.ndims.add(h.dim())
        self.largest = max(self.largest, h.shape[0])
        self.total += h.shape[0]
        return self.head(h)


def toy(seed: int = 0, rows: int = 3, T: int = 7, d: int = 5, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, d, generator=g)
    head = torch.nn.Linear(d, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=g))
        head.bias.copy_(torch.randn(V, generator=g))
    targets = torch.randint(0, V, (rows, T), generator=g)
    targets[0, :2] = IGNORE  # a prompt
    targets[1, :] = IGNORE  # a row with no trained token
    targets[2, 3] = IGNORE  # a gap
    return hidden, targets, head


def naive_token_logps(hidden, targets, head):
    """The full [R,T,V] float64 computation the chunked core must agree with."""
    logp = torch.log_softmax(F.linear(hidden.double(), head.weight.double(), head.bias.double()), dim=-1)
    keep = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(keep, picked, 0.0)


def test_sequence_logps_by_hand():
    # V = 2, identity head: position 0 has logits (ln 3, 0) and target 0 -> log p = ln 3 - ln(3 + 1) = ln 0.75 = -0.287682;
    # position 1 has logits (0, 0) and target 1 -> log p = ln 0.5 = -0.693147; row sum = -0.980829, count 2.
    # Row 1 is all IGNORE -> sum 0, count 0.
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    hidden = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0]], [[5.0, 1.0], [1.0, 5.0]]])
    targets = torch.tensor([[0, 1], [IGNORE, IGNORE]])
    total, count = sequence_logps(hidden, targets, head)
    approx(total, [math.log(0.75) + math.log(0.5), 0.0])
    assert count.tolist() == [2, 0] and total.dtype == torch.float32
    approx(token_logps(hidden, targets, head), [[math.log(0.75), math.log(0.5)], [0.0, 0.0]])
    approx(token_nll_sum(hidden, targets, head), -(math.log(0.75) + math.log(0.5)))


@pytest.mark.parametrize("chunk", [1, 3, 2048])
def test_sequence_logps_matches_naive_values_and_gradients(chunk):
    hidden, targets, head = toy()
    hidden.requires_grad_(True)
    total, count = sequence_logps(hidden, targets, head, chunk=chunk)
    naive = naive_token_logps(hidden, targets, head).sum(dim=1)
    torch.testing.assert_close(total.double(), naive.detach(), atol=1e-5, rtol=1e-5)
    assert count.tolist() == (targets != IGNORE).sum(dim=1).tolist()
    assert total[1].item() == 0.0 and count[1].item() == 0

    weights = torch.tensor([0.7, -1.3, 2.0])  # any cotangent: gradients must agree, not only for .sum()
    ours = torch.autograd.grad((total * weights).sum(), [hidden, head.weight, head.bias])
    theirs = torch.autograd.grad((naive * weights.double()).sum(), [hidden, head.weight, head.bias])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)
    assert ours[0][1].abs().sum() == 0  # the untrained row gets no gradient


def test_token_logps_matches_naive_and_token_nll_sum_agrees():
    hidden, targets, head = toy(seed=1)
    hidden.requires_grad_(True)
    per_token = token_logps(hidden, targets, head, chunk=4)
    naive = naive_token_logps(hidden, targets, head)
    torch.testing.assert_close(per_token.double(), naive.detach(), atol=1e-5, rtol=1e-5)
    assert per_token.shape == targets.shape and (per_token[targets == IGNORE] == 0).all()
    g_ours = torch.autograd.grad(per_token[0].sum() * 2 + per_token[2].sum(), hidden)[0]
    g_naive = torch.autograd.grad(naive[0].sum() * 2 + naive[2].sum(), hidden)[0]
    torch.testing.assert_close(g_ours.double(), g_naive.double(), atol=1e-5, rtol=1e-5)
    # token_nll_sum shares the core: the negated total, and what cross-entropy on full logits gives
    nll = token_nll_sum(hidden, targets, head, chunk=4)
    torch.testing.assert_close(nll, -sequence_logps(hidden, targets, head)[0].sum(), atol=1e-5, rtol=1e-5)
    full = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(nll, full, atol=1e-4, rtol=1e-5)


def test_logits_are_only_built_a_chunk_of_trained_positions_at_a_time():
    hidden, targets, head = toy(rows=4, T=50)
    recorder = RowRecorder(head)
    for fn in (sequence_logps, token_logps):
        recorder.largest = recorder.total = 0
        fn(hidden, targets, recorder, chunk=8)
        assert recorder.ndims == {2}  # [positions, d], never [R, T, d]
        assert 0 < recorder.largest <= 8
        assert recorder.total == (targets != IGNORE).sum().item()  # only trained positions are projected


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(seen.values())


def test_a_linear_head_keeps_no_logits_for_the_backward():
    # 4 rows × 64 positions, 512-token vocabulary: the trained positions' fp32 logits are N × 512 × 4 bytes.
    hidden, targets, head = toy(rows=4, T=64, d=8, V=512)
    hidden.requires_grad_(True)
    logits_bytes = (targets != IGNORE).sum().item() * 512 * 4
    fast = saved_bytes(lambda: sequence_logps(hidden, targets, head, chunk=16))
    generic = saved_bytes(lambda: sequence_logps(hidden, targets, RowRecorder(head), chunk=16))
    assert generic >= logits_bytes  # a module head: autograd keeps every chunk's logits
    assert fast < logits_bytes / 8  # a Linear head: hidden states, weights and one logsumexp per position


@pytest.mark.parametrize("bf16", [False, True])
def test_the_linear_head_path_equals_the_module_path(bf16):
    # RowRecorder is not a Linear, so it takes the plain autograd path: values and every gradient must agree
    # (under bf16 autocast too, where both run the projection in bf16 and the softmax in fp32).
    hidden, targets, head = toy(seed=3, rows=3, T=20, d=16, V=50)
    weights = torch.tensor([0.7, -1.3, 2.0])
    results = []
    for h in (head, RowRecorder(head)):
        x = hidden.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total, _ = sequence_logps(x, targets, h, chunk=7)
            (total * weights).sum().backward()
        results.append([total.detach(), x.grad, head.weight.grad, head.bias.grad])
    tol = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-5}
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, **tol)
    assert results[0][0].dtype == torch.float32


@pytest.mark.parametrize("bf16", [False, True])
def test_the_cpu_pieces_equal_whole_chunks(monkeypatch, bf16):
    # On CPU the Linear head's forward takes rows and its backward vocabulary slices sized by CPU_CHUNK_BYTES;
    # made small here, so the forward runs 128 rows at a time over 3 slices of 256 entries (the last cut) in the
    # backward. Values and every gradient must equal the naive full-logits computation (fp32) and the
    # ``chunk`` rows path, CUDA's (bf16 autocast), within the same tolerances as the tests above.
    hidden, targets, head = toy(seed=4, rows=3, T=90, d=16, V=600)
    n = (targets != IGNORE).sum().item()
    weights = torch.tensor([0.7, -1.3, 2.0])
    monkeypatch.setattr(L, "CPU_CHUNK_BYTES", 4 * 256 * (n + -n % L.ROW_QUANTUM))
    assert L._cpu_columns(n + -n % L.ROW_QUANTUM, 600) == 256 and L._cpu_rows(600, 2048) == 128 < n
    results = []
    for pieces in (True, False):
        monkeypatch.setattr(L, "CPU_PIECES", pieces)
        x = hidden.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total, _ = sequence_logps(x, targets, head)
            (total * weights).sum().backward()
        results.append([total.detach(), x.grad, head.weight.grad, head.bias.grad])
    if not bf16:
        x = hidden.clone().requires_grad_(True)
        naive = naive_token_logps(x, targets, head).sum(dim=1)
        results[1] = [naive.detach(), *torch.autograd.grad((naive * weights.double()).sum(), [x, head.weight, head.bias])]
    tol = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-5}
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours.double(), theirs.double(), **tol)


def test_bf16_hidden_gives_fp32_logps():
    hidden, targets, head = toy()
    total, _ = sequence_logps(hidden.bfloat16(), targets, head.bfloat16())
    assert total.dtype == torch.float32 and torch.isfinite(total).all()


def test_no_trained_token_at_all_is_zero_and_still_differentiable():
    hidden, targets, head = toy()
    targets[:] = IGNORE
    hidden.requires_grad_(True)
    total, count = sequence_logps(hidden, targets, head)
    assert total.tolist() == [0.0, 0.0, 0.0] and count.tolist() == [0, 0, 0]
    nll = token_nll_sum(hidden, targets, head)
    nll.backward()  # a zero loss on the graph, not a constant that cannot be backpropagated
    assert nll.item() == 0.0 and hidden.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------------
# preference losses: hand values
# ---------------------------------------------------------------------------------------------------


def test_dpo_by_hand():
    # Δ = (-1 - -2) - (-3 - -3) = 1; loss = -log σ(0.1·1) = log(1 + e^-0.1) = 0.644397
    # rewards: 0.1·(-1 - -2) = 0.1, 0.1·(-3 - -3) = 0
    loss, chosen, rejected = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-3.0), beta=0.1)
    approx(loss, 0.644397)
    approx(chosen, 0.1)
    approx(rejected, 0.0)


def test_cdpo_label_smoothing_by_hand():
    # ε = 0.1: -(0.9) log σ(0.1) - 0.1 log σ(-0.1) = 0.9·0.644397 + 0.1·(0.1 + 0.644397) = 0.654397
    loss, _, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-3.0), beta=0.1, label_smoothing=0.1)
    approx(loss, 0.654397)


def test_hinge_by_hand():
    # Δ = 1: relu(1 - 0.1·1) = 0.9; with β = 2: relu(1 - 2) = 0
    loss, chosen, rejected = hinge_loss(t(-1.0), t(-3.0), t(-2.0), t(-3.0), beta=0.1)
    approx(loss, 0.9)
    approx(chosen, 0.1)
    approx(rejected, 0.0)
    approx(hinge_loss(t(-1.0), t(-3.0), t(-2.0), t(-3.0), beta=2.0)[0], 0.0)


def test_ipo_by_hand():
    # Δ̄ = (-0.5 - -0.6) - (-1.0 - -0.9) = 0.1 - -0.1 = 0.2; β = 1: (0.2 - 1/2)² = 0.09; β = 0.1: (0.2 - 5)² = 23.04
    approx(ipo_loss(t(-0.5), t(-1.0), t(-0.6), t(-0.9), beta=1.0)[0], 0.09)
    loss, chosen, rejected = ipo_loss(t(-0.5), t(-1.0), t(-0.6), t(-0.9), beta=0.1)
    approx(loss, 23.04, tol=1e-4)
    approx(chosen, 0.01)  # 0.1·0.1
    approx(rejected, -0.01)


def test_simpo_by_hand():
    # β·(avg_w - avg_l) - γ = 2.5·(-1.0 - -1.5) - 1.375 = 1.25 - 1.375 = -0.125; loss = -log σ(-0.125) = log(1 + e^0.125) = 0.757599
    loss, chosen, rejected = simpo_loss(t(-1.0), t(-1.5))
    approx(loss, 0.757599)
    approx(chosen, -2.5)  # 2.5·-1.0
    approx(rejected, -3.75)  # 2.5·-1.5


def test_orpo_by_hand():
    # p_w = 0.5 -> odds 1, log odds 0; p_l = 0.2 -> odds 0.25, log odds -ln 4; difference ln 4
    # -log σ(ln 4) = log(1 + 1/4) = 0.223144; loss = NLL + λ·0.223144 = 0.693147 + 0.0223144 = 0.715462
    loss, chosen, rejected = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), t(math.log(2)), lam=0.1)
    approx(loss, 0.715462)
    approx(chosen, 0.1 * math.log(0.5))
    approx(rejected, 0.1 * math.log(0.2))


def test_orpo_is_finite_at_the_edges():
    avg_w = t(-1e-9, 0.0, -0.01, -30.0).requires_grad_(True)  # near-certain, certain (or empty), ordinary, hopeless
    avg_l = t(-50.0, -2.0, -1e-8, -0.0).requires_grad_(True)
    loss, _, _ = orpo_loss(avg_w, avg_l, -avg_w)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(avg_w.grad).all() and torch.isfinite(avg_l.grad).all()


def test_kto_by_hand():
    # r = -1 - -2 = 1, z₀ = 0.5; desirable: 1 - σ(0.1·(1 - 0.5)) = 1 - σ(0.05) = 0.487503;
    # undesirable (weight 2): 2·(1 - σ(0.1·(0.5 - 1))) = 2·(1 - σ(-0.05)) = 2·0.512497 = 1.024995
    loss, rewards = kto_loss(t(-1.0, -1.0), t(-2.0, -2.0), torch.tensor([True, False]), kl=torch.tensor(0.5), undesirable_weight=2.0)
    approx(loss, [0.487503, 1.024995])
    approx(rewards, [0.1, 0.1])  # β·r
    # a negative kl estimate is clamped to 0: 1 - σ(0.1·1) = 0.475021
    approx(kto_loss(t(-1.0), t(-2.0), torch.tensor([True]), kl=torch.tensor(-3.0))[0], 0.475021)


def test_kto_kl_estimate_by_hand():
    # mean((-1 - -1.5), (-2 - -1)) = mean(0.5, -1) = -0.25 -> clamped to 0; mean(0.5, 1.5) = 1.0
    approx(kto_kl_estimate(t(-1.0, -2.0), t(-1.5, -1.0)), 0.0)
    policy = t(-1.0, -0.5).requires_grad_(True)
    z0 = kto_kl_estimate(policy, t(-1.5, -2.0))
    approx(z0, 1.0)
    assert z0.dim() == 0 and not z0.requires_grad


def test_kto_far_side_of_the_reference_point_costs_nothing():
    # desirable with r = 200 ≫ z₀ = 0: 1 - σ(0.1·200) = 1 - σ(20) = 2.1e-9; undesirable with r = -200 ≪ z₀ likewise
    loss, _ = kto_loss(t(0.0, -200.0), t(-200.0, 0.0), torch.tensor([True, False]), kl=torch.tensor(0.0))
    assert (loss < 1e-8).all()
    # and the wrong side costs up to the weight
    loss, _ = kto_loss(t(-200.0, 0.0), t(0.0, -200.0), torch.tensor([True, False]), kl=torch.tensor(0.0))
    approx(loss, [1.0, 1.0])


def test_bradley_terry_by_hand():
    # -log σ(2 - 1) = log(1 + e^-1) = 0.313262; -log σ(0) = ln 2 = 0.693147 (a tie counts as wrong)
    loss, accuracy = bradley_terry_loss(t(2.0, 0.0, -1.0), t(1.0, 0.0, 1.0))
    approx(loss, [0.313262, math.log(2), math.log(1 + math.e**2)])
    assert accuracy.tolist() == [1.0, 0.0, 0.0] and accuracy.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# preference losses: properties
# ---------------------------------------------------------------------------------------------------


def test_preferring_the_chosen_response_lowers_every_pairwise_loss():
    ref_w, ref_l = t(-10.0), t(-10.0)
    prefers_w, prefers_l = (t(-9.0), t(-11.0)), (t(-11.0), t(-9.0))  # Δ = +2 vs -2
    for fn in (dpo_loss, hinge_loss):
        assert fn(*prefers_w, ref_w, ref_l)[0] < fn(*prefers_l, ref_w, ref_l)[0], fn.__name__
    assert dpo_loss(*prefers_w, ref_w, ref_l, label_smoothing=0.1)[0] < dpo_loss(*prefers_l, ref_w, ref_l, label_smoothing=0.1)[0]
    # IPO, below its target 1/(2β) = 1: Δ̄ = +0.5 beats -0.5; the loss is 0 at the target and rises past it
    avg_ref = t(-1.0)
    ipo = lambda w, l: ipo_loss(t(w), t(l), avg_ref, avg_ref, beta=0.5)[0]
    assert ipo(-0.75, -1.25) < ipo(-1.25, -0.75)
    approx(ipo(-0.5, -1.5), 0.0)
    assert ipo(-0.5, -1.5) < ipo(-0.25, -1.75)
    # reference-free
    assert simpo_loss(t(-0.5), t(-1.5))[0] < simpo_loss(t(-1.5), t(-0.5))[0]
    assert orpo_loss(t(-0.5), t(-1.5), t(0.5))[0] < orpo_loss(t(-1.5), t(-0.5), t(0.5))[0]


def test_gradients_push_towards_the_chosen_response():
    for fn, args in (
        (dpo_loss, (t(-10.0), t(-10.0))),
        (hinge_loss, (t(-10.0), t(-10.0))),
        (ipo_loss, (t(-1.0), t(-1.0))),
        (simpo_loss, ()),
        (orpo_loss, (t(0.5),)),
    ):
        w, l = t(-1.0).requires_grad_(True), t(-1.0).requires_grad_(True)
        fn(w, l, *args)[0].sum().backward()
        assert w.grad.item() < 0 < l.grad.item(), fn.__name__  # descending raises log π(y_w), lowers log π(y_l)


def test_implied_rewards_are_detached_and_the_loss_is_not():
    def leaf(v):
        return t(v, v - 0.5).requires_grad_(True)

    cases = [
        dpo_loss(leaf(-1.0), leaf(-2.0), leaf(-1.5), leaf(-1.5)),
        dpo_loss(leaf(-1.0), leaf(-2.0), leaf(-1.5), leaf(-1.5), label_smoothing=0.1),
        hinge_loss(leaf(-1.0), leaf(-2.0), leaf(-1.5), leaf(-1.5)),
        ipo_loss(leaf(-1.0), leaf(-2.0), leaf(-1.5), leaf(-1.5)),
        simpo_loss(leaf(-1.0), leaf(-2.0)),
        orpo_loss(leaf(-1.0), leaf(-2.0), leaf(1.0)),
        kto_loss(leaf(-1.0), leaf(-2.0), torch.tensor([True, False]), kl=leaf(0.3).mean()),
        bradley_terry_loss(leaf(1.0), leaf(0.0)),
    ]
    for loss, *rewards in cases:
        assert loss.requires_grad and loss.shape == (2,)
        assert all(not r.requires_grad and r.shape == (2,) for r in rewards)


# ---------------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------------


def test_kl_penalized_rewards_by_hand():
    # row 0: response tokens 0, 1: kl = (-1 - -1.5, -2 - -1.5) = (0.5, -0.5); rewards = (-0.05, 0.05 + score 1) = (-0.05, 1.05), 0
    # row 1: response tokens 1, 2: kl = (0, -1 - -0.5) = (0, -0.5); rewards = 0, 0, 0.05 + score 2 = 2.05
    # row 2: no response token: nothing, not even the score
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.5, -9.0], [-2.0, -1.0, -0.5], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    rewards, kl = kl_penalized_rewards(t(1.0, 2.0, 3.0), logps, ref, mask, kl_coef=0.1)
    approx(kl, [[0.5, -0.5, 0.0], [0.0, 0.0, -0.5], [0.0, 0.0, 0.0]])
    approx(rewards, [[-0.05, 1.05, 0.0], [0.0, 0.0, 2.05], [0.0, 0.0, 0.0]])
    assert not rewards.requires_grad and not kl.requires_grad


def test_gae_by_hand():
    # γ = 1, λ = 0.95, r = (0, 1), V = (0.5, 0.5):
    # t=1: δ = 1 + 0 - 0.5 = 0.5, A = 0.5;  t=0: δ = 0 + 0.5 - 0.5 = 0, A = 0 + 0.95·0.5 = 0.475
    # returns = A + V = (0.975, 1.0)
    advantages, returns = gae(t(0.0, 1.0)[None], t(0.5, 0.5)[None], torch.ones(1, 2, dtype=torch.bool))
    approx(advantages, [[0.475, 0.5]])
    approx(returns, [[0.975, 1.0]])


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_values():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 6:] = False  # padding after the response
    mask[2, 2:4] = False  # a gap inside it
    mask[3, :3] = False  # left padding
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    r = torch.where(mask, rewards, 0.0)
    to_go = r.flip(1).cumsum(1).flip(1)
    approx(advantages, torch.where(mask, to_go - values, 0.0))
    approx(returns, torch.where(mask, to_go, 0.0))


def test_gae_ignores_masked_positions():
    # the same trajectory with junk spliced in off the mask gives the same estimates at the real tokens
    rewards, values = t(0.3, -1.0, 2.0), t(0.1, 0.4, -0.2)
    a, ret = gae(rewards[None], values[None], torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.8)
    junk = 1e3
    spliced_r = torch.tensor([[0.3, junk, -1.0, 2.0, junk]])
    spliced_v = torch.tensor([[0.1, junk, 0.4, -0.2, junk]])
    spliced_mask = torch.tensor([[True, False, True, True, False]])
    a2, ret2 = gae(spliced_r, spliced_v, spliced_mask, gamma=0.9, lam=0.8)
    approx(a2[:, [0, 2, 3]], a)
    approx(ret2[:, [0, 2, 3]], ret)
    assert a2[0, 1] == 0 and a2[0, 4] == 0 and ret2[0, 1] == 0


def test_ppo_policy_loss_by_hand():
    # ρ = 1.5, A = +1: max(-1.5, -1.2) = -1.2 (clipped);  ρ = 1.5, A = -1: max(1.5, 1.2) = 1.5
    # ρ = 0.5, A = +1: max(-0.5, -0.8) = -0.5;              ρ = 0.5, A = -1: max(0.5, 0.8) = 0.8 (clipped)
    # a fifth, masked token is ignored; mean = (-1.2 + 1.5 - 0.5 + 0.8)/4 = 0.15; clip fraction 2/4
    old = torch.zeros(1, 5)
    logps = torch.log(t(1.5, 1.5, 0.5, 0.5, 9.0))[None].requires_grad_(True)
    advantages = t(1.0, -1.0, 1.0, -1.0, 100.0)[None]
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clip_fraction = ppo_policy_loss(logps, old, advantages, mask, clip=0.2)
    approx(loss, 0.15)
    approx(clip_fraction, 0.5)
    loss.backward()
    # clipped tokens (and the masked one) pass no gradient; the others get -A·ρ/4
    approx(logps.grad, [[0.0, 1.5 / 4, -0.5 / 4, 0.0, 0.0]])


def test_ppo_value_loss_by_hand():
    # V = 1, V_old = 0, R = 2: unclipped (1 - 2)² = 1, clipped V = 0.2: (0.2 - 2)² = 3.24 -> 0.5·3.24 = 1.62
    # V = 1, V_old = 0.9, R = 0: both (1 - 0)² = 1 -> 0.5;  third token masked;  mean = (1.62 + 0.5)/2 = 1.06
    loss = ppo_value_loss(t(1.0, 1.0, 50.0)[None], t(0.0, 0.9, 0.0)[None], t(2.0, 0.0, 0.0)[None], torch.tensor([[1, 1, 0]]), clip=0.2)
    approx(loss, 1.06)
    assert loss.dim() == 0


# ---------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand_and_properties():
    # group (1, 0, 0, 1): mean 0.5, population std 0.5 -> ±0.5/(0.5 + 1e-4) = ±0.99980
    a = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0], [0.2, 5.0, -1.0, 2.0]]))
    approx(a[0], [0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001])
    assert a[1].tolist() == [0.0, 0.0, 0.0, 0.0] and torch.isfinite(a).all()  # equal rewards: zeros, not NaN
    approx(a.mean(dim=1), [0.0, 0.0, 0.0])
    assert group_advantages(torch.tensor([[7.0]])).tolist() == [[0.0]]  # a group of one


def test_grpo_at_ratio_one_is_minus_mean_advantage_plus_beta_kl():
    # logps = old: ρ = 1, so the surrogate is -A per token. ref - logp = ln 2 on every token:
    # k3 = e^{ln 2} - ln 2 - 1 = 0.306853. Row 0 (2 tokens, A = 1.5): -1.5 + 0.04·0.306853;
    # row 1 (1 token, A = -0.5): 0.5 + 0.04·0.306853; loss = mean = -0.5 + 0.012274 = -0.487726, kl = 0.306853
    logps = torch.tensor([[-1.0, -2.0, -7.0], [-3.0, -5.0, -5.0]], requires_grad=True)
    ref = logps.detach() + math.log(2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    advantages = t(1.5, -0.5)
    loss, kl = grpo_loss(logps, logps.detach(), ref, advantages, mask, beta=0.04)
    approx(kl, 0.306853)
    approx(loss, -advantages.mean() + 0.04 * 0.306853)
    assert loss.requires_grad and not kl.requires_grad


def test_grpo_averages_each_sequence_then_the_sequences():
    # no reference: row 0 has two tokens at -A = -1, row 1 one token at -A = +1
    # per sequence then over sequences: (-1 + 1)/2 = 0  (a token-level mean would give (-2 + 1)/3 = -1/3)
    logps = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, kl = grpo_loss(logps, logps, None, t(1.0, -1.0), mask)
    approx(loss, 0.0)
    assert kl.item() == 0.0


def test_grpo_without_reference_skips_kl():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    with_zero_beta, _ = grpo_loss(logps, logps.detach(), logps.detach() + 3.0, t(0.7), mask, beta=0.0)
    no_ref, kl = grpo_loss(logps, logps.detach(), None, t(0.7), mask)
    approx(no_ref, with_zero_beta.detach())
    approx(no_ref, -0.7)
    assert kl.item() == 0.0


def test_grpo_clipping_engages_outside_the_trust_region_by_the_sign_of_the_advantage():
    # per token -min(ρA, clip(ρ, 0.8, 1.2)A):
    # ρ = 1.5, A = +1 -> -1.2 (clipped, no gradient);   ρ = 1.5, A = -1 -> 1.5 (unclipped)
    # ρ = 0.5, A = +1 -> -0.5 (unclipped);              ρ = 0.5, A = -1 -> 0.8 (clipped, no gradient)
    ratios = t(1.5, 1.5, 0.5, 0.5)
    logps = torch.log(ratios)[:, None].requires_grad_(True)
    advantages = t(1.0, -1.0, 1.0, -1.0)
    loss, _ = grpo_loss(logps, torch.zeros(4, 1), None, advantages, torch.ones(4, 1), clip=0.2)
    approx(loss, (-1.2 + 1.5 - 0.5 + 0.8) / 4)
    loss.backward()
    # unclipped tokens: d(-ρA)/d logp / 4 = -A·ρ/4
    approx(logps.grad[:, 0], [0.0, 1.5 / 4, -0.5 / 4, 0.0])
    # inside the region nothing is clipped: ρ = 1.1 with either sign gives -ρA
    inside, _ = grpo_loss(torch.log(t(1.1, 1.1))[:, None], torch.zeros(2, 1), None, t(1.0, -1.0), torch.ones(2, 1))
    approx(inside, 0.0)


def test_grpo_kl_gradient_pulls_towards_the_reference():
    # d/dlogp [e^{ref - logp} - (ref - logp) - 1] = 1 - e^{ref - logp}: negative when ref > logp, so descent raises logp
    logps = torch.tensor([[-2.0]], requires_grad=True)
    loss, _ = grpo_loss(logps, logps.detach(), torch.tensor([[-1.0]]), t(0.0), torch.ones(1, 1), beta=0.04)
    loss.backward()
    approx(logps.grad, [[0.04 * (1 - math.e)]])
