"""Per-example causal attention for packed rows: the same numbers as sdpa with a block-diagonal mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_packing import alone_loss, conversations

from posttrain.data.chat import ChatRenderer, RenderOptions
from posttrain.data.packing import packed_batches, per_example_loss
from posttrain.models.zoo import build_tiny
from posttrain.train import packed_attention as pa

# Row 0: examples of 10, 25 and 5 tokens; row 1: one of 40 (positions restart at 0 for each example).
POSITIONS = torch.stack([torch.cat([torch.arange(10), torch.arange(25), torch.arange(5)]), torch.arange(40)])


def reference(q, k, v, positions):
    """sdpa with the block-diagonal causal mask transformers builds for packed rows."""
    seg = torch.zeros(positions.shape, dtype=torch.long)
    for i, (r, s, e) in enumerate(pa.segments(positions)):
        seg[r, s:e] = i
    t = torch.arange(positions.shape[1])
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (t[:, None] >= t[None, :])
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask)


def qkv(dtype, heads=4, kv_heads=2, dim=16):
    g = torch.Generator().manual_seed(0)
    make = lambda h: torch.randn(2, h, 40, dim, generator=g).to(dtype).requires_grad_()
    return make(heads), make(kv_heads), make(kv_heads), torch.randn(2, heads, 40, dim, generator=g).to(dtype)


def test_segments_are_the_runs_of_counting_positions():
    assert pa.segments(POSITIONS) == [(0, 0, 10), (0, 10, 35), (0, 35, 40), (1, 0, 40)]


@pytest.mark.parametrize("block", [128, 8, 3])  # 8 and 3: several query blocks per example, a short last one
def test_equals_sdpa_with_block_mask_forward_and_backward_fp32(monkeypatch, block):
    monkeypatch.setattr(pa, "BLOCK", block)
    q, k, v, grad = qkv(torch.float32)
    ours = pa.packed_causal_attention(q, k, v, POSITIONS, 16**-0.5)
    ref = reference(q, k, v, POSITIONS)
    assert (ours - ref).abs().max().item() <= 1e-5
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert (a - b).abs().max().item() <= 1e-5


# Row 0: a 12-token sequence whose first 7 tokens are a prompt, then two continuations of that prompt
# (positions 7.., 8 and 5 tokens), then a plain 8-token sequence; row 1: a plain 40-token sequence.
SHARED = torch.stack([torch.cat([torch.arange(12), torch.arange(7, 15), torch.arange(7, 12), torch.arange(8)]), torch.arange(33)])
# Prefixes that nest (a system prompt, a user turn, its responses), row 0 only: a 14-token sequence; one that shares
# its first 4 tokens (positions 4.., 9 tokens); one that shares 10 tokens with that one, so the first 4 of the first
# run and 6 of the second (positions 10.., 6 tokens); one that shares the first 4 again (positions 4.., 4 tokens).
NESTED = torch.stack([torch.cat([torch.arange(14), torch.arange(4, 13), torch.arange(10, 16), torch.arange(4, 8)]), torch.arange(33)])


@pytest.mark.parametrize(
    ("positions", "runs", "sequences"),
    [
        (
            SHARED,
            [(0, 0, 12, ()), (0, 12, 20, ((0, 7),)), (0, 20, 25, ((0, 7),)), (0, 25, 33, ()), (1, 0, 33, ())],
            ([slice(0, 12)], [slice(0, 7), slice(12, 20)], [slice(0, 7), slice(20, 25)]),
        ),
        (
            NESTED,
            [(0, 0, 14, ()), (0, 14, 23, ((0, 4),)), (0, 23, 29, ((0, 4), (14, 6))), (0, 29, 33, ((0, 4),)), (1, 0, 33, ())],
            ([slice(0, 14)], [slice(0, 4), slice(14, 23)], [slice(0, 4), slice(14, 20), slice(23, 29)], [slice(0, 4), slice(29, 33)]),
        ),
    ],
    ids=["one prompt", "nested prefixes"],
)
def test_continuation_runs_attend_to_their_prefix_as_if_the_sequence_ran_whole(monkeypatch, positions, runs, sequences):
    """A run starting at position q > 0 sees the first q tokens of the run before it, that run's own prefix
    included: each continuation's output equals causal attention over its prefix + itself alone, and a shared
    token's key and value gradients are the sums over every sequence that reads it."""
    monkeypatch.setattr(pa, "BLOCK", 3)  # several query blocks per run
    assert pa.runs(positions) == runs
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    grad = torch.randn(2, 4, 33, 16, generator=g, dtype=torch.float64)
    ours = pa.packed_causal_attention(q, k, v, positions, 0.25)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)

    def alone(rows: list[slice]):
        """Causal sdpa over row 0's tokens at ``rows`` (one sequence), its output and its q, k, v gradients
        scattered back; a continuation's output (and so its upstream gradient) covers its own tokens only."""
        idx = torch.cat([torch.arange(33)[r] for r in rows])
        qs, ks, vs = (t[0:1, :, idx] for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.25)
        own = rows[-1].stop - rows[-1].start
        upstream = grad[0:1, :, idx].clone()
        upstream[:, :, : len(idx) - own] = 0
        return idx[len(idx) - own :], out[0, :, len(idx) - own :], torch.autograd.grad(out, (q, k, v), upstream)

    covered = max(r[-1].stop for r in sequences)
    expected = torch.zeros(1, 4, covered, 16, dtype=torch.float64)  # row 0's sequences
    summed = [torch.zeros_like(t) for t in (q, k, v)]
    for rows in sequences:
        own, out, grads = alone(rows)
        expected[0, :, own] = out
        summed = [a + b for a, b in zip(summed, grads)]
    assert (ours[0:1, :, :covered] - expected).abs().max().item() <= 1e-10
    for ours_g, want in zip(ours_grads, summed):  # row 0's sequences (plain runs and row 1 are checked elsewhere)
        assert (ours_g[0, :, :covered] - want[0, :, :covered]).abs().max().item() <= 1e-10


def test_a_continuation_without_its_prompt_is_refused():
    with pytest.raises(ValueError, match="row 0, tokens 0-5: positions start at 3"):
        pa.runs(torch.arange(3, 8)[None])
    with pytest.raises(ValueError, match="does not hold 4 tokens"):
        pa.runs(torch.cat([torch.arange(3), torch.arange(4, 6)])[None])


def test_bf16_stays_within_bf16_rounding_of_fp32():
    q, k, v, grad = qkv(torch.float32)
    ref = reference(q, k, v, POSITIONS)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    ours = pa.packed_causal_attention(qb, kb, vb, POSITIONS, 16**-0.5)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - ref).abs().max().item() <= 3e-2
    for a, b in zip(torch.autograd.grad(ours, (qb, kb, vb), grad.bfloat16()), ref_grads):
        assert (a.float() - b).abs().max().item() <= 0.05 * b.abs().max().item()


def test_custom_ops_pass_torch_opcheck(monkeypatch):
    """Schemas, fake (meta) kernels and the autograd registration agree with the real kernels (what torch.compile relies on)."""
    monkeypatch.setattr(pa, "BLOCK", 8)
    q, k, v, grad = qkv(torch.float32, kv_heads=4)
    torch.library.opcheck(torch.ops.posttrain.packed_causal_attention.default, (q, k, v, POSITIONS, 0.25))
    torch.library.opcheck(
        torch.ops.posttrain.packed_causal_attention_backward.default, (grad, q.detach(), k.detach(), v.detach(), POSITIONS, 0.25)
    )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_model_packed_losses_and_gradients_match_sdpa(family, monkeypatch):
    """A real model on packed rows: each example's loss equals its loss alone, and the gradients equal sdpa's."""
    monkeypatch.setattr(pa, "BLOCK", 16)
    model, tok = build_tiny(family)
    examples = ChatRenderer(tok, RenderOptions(train_on="all_assistant")).render_many(conversations(12))
    batch = packed_batches(examples, max_tokens=384, rows_per_batch=4, pad_id=tok.pad_token_id)[0]
    assert any(n > 1 for n in [sum(s.row == r for s in batch.segments) for r in range(4)]), "a row must hold several examples"

    def loss_and_grads():
        model.zero_grad()
        sums, counts = per_example_loss(model(**batch.model_inputs()).logits, batch)
        (sums.sum() / counts.sum()).backward()
        return sums / counts, {n: p.grad.clone() for n, p in model.named_parameters()}

    sdpa_losses, sdpa_grads = loss_and_grads()
    with pa.packed_attention(model) as on:
        assert on and model.config._attn_implementation == pa.NAME
        losses, grads = loss_and_grads()
        alone = [alone_loss(model.eval(), examples[s.index], tok.pad_token_id) for s in batch.segments]
        model.train()
    assert model.config._attn_implementation == "sdpa"  # given back
    assert (losses - sdpa_losses).abs().max().item() <= 1e-5
    assert max(abs(a - b) for a, b in zip(losses.tolist(), alone)) <= 1e-5
    assert max((grads[n] - sdpa_grads[n]).abs().max().item() for n in grads) <= 1e-5


def test_refuses_a_padding_mask():
    model, tok = build_tiny("llama")
    ids = torch.tensor([[5, 6, 7, tok.pad_token_id]])
    with pa.packed_attention(model), pytest.raises(RuntimeError, match="packed rows only"):
        model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 0]]))
