"""Packing: examples in one row never see each other, and each keeps its own loss."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.data.chat import IGNORE, ChatRenderer, RenderOptions
from posttrain.data.packing import best_fit_decreasing, collate_packed, packed_batches, padded_batches, per_example_loss
from posttrain.models.zoo import build_tiny

WORDS = "the quick brown fox jumps over a lazy dog while paris sleeps under the sea and light".split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 25)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))})
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    model, tok = build_tiny(request.param)
    return model.eval(), tok


def alone_loss(model, example, pad_id):
    one = collate_packed([example], [[0]], pad_id)
    with torch.no_grad():
        s, n = per_example_loss(model(**one.model_inputs()).logits, one)
    return (s / n).item()


@pytest.mark.parametrize("train_on", ["all_assistant", "all"])
def test_each_packed_example_has_its_alone_loss(tiny, train_on):
    model, tok = tiny
    examples = ChatRenderer(tok, RenderOptions(train_on=train_on)).render_many(conversations(24))
    batches = packed_batches(examples, max_tokens=384, rows_per_batch=3, pad_id=tok.pad_token_id)
    assert sum(len(b.segments) for b in batches) == len(examples)
    assert any(len({s.row for s in b.segments}) < len(b.segments) for b in batches), "some rows must hold several examples"
    worst = 0.0
    for batch in batches:
        assert batch.attention_mask is None
        with torch.no_grad():
            sums, counts = per_example_loss(model(**batch.model_inputs()).logits, batch)
        for seg, s, n in zip(batch.segments, sums, counts):
            worst = max(worst, abs((s / n).item() - alone_loss(model, examples[seg.index], tok.pad_token_id)))
    assert worst <= 1e-5


def test_packing_with_an_attention_mask_would_leak(tiny):
    """The control: the same packed row with a dense mask lets examples see each other, so losses change."""
    model, tok = tiny
    examples = ChatRenderer(tok, RenderOptions(train_on="all")).render_many(conversations(6, seed=1))
    batch = packed_batches(examples, max_tokens=4096, rows_per_batch=1, pad_id=tok.pad_token_id, seed=None)[0]
    inputs = {**batch.model_inputs(), "attention_mask": torch.ones_like(batch.input_ids)}
    with torch.no_grad():
        sums, counts = per_example_loss(model(**inputs).logits, batch)
    later = [(seg, s / n) for seg, s, n in zip(batch.segments, sums, counts) if seg.start > 0]
    assert max(abs(loss.item() - alone_loss(model, examples[seg.index], tok.pad_token_id)) for seg, loss in later) > 1e-3


def test_labels_are_shifted_inside_each_example():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    batch = collate_packed(examples, [[0, 1]], pad_id=0)
    # Token 3 (the first example's last) must not be trained to predict token 4 (the next example's first).
    assert batch.target_ids.tolist() == [[2, 3, IGNORE, 5, IGNORE]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]


def test_best_fit_decreasing_respects_capacity_and_keeps_everything():
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    # Close to the lower bound on the number of rows: little padding.
    assert len(bins) <= 1.05 * sum(lengths) / 512 + 1
    with pytest.raises(ValueError, match="longer than max_tokens=10"):
        best_fit_decreasing([5, 11], 10)


def test_padded_batches_group_lengths_and_mask_padding(tiny):
    model, tok = tiny
    examples = ChatRenderer(tok).render_many(conversations(40, seed=2))
    batches = list(padded_batches(examples, batch_size=8, pad_id=tok.pad_token_id))
    assert sorted(s.index for b in batches for s in b.segments) == list(range(40))
    padded = sum(b.input_ids.numel() for b in batches)
    ungrouped = sum(b.input_ids.numel() for b in padded_batches(examples, batch_size=8, pad_id=tok.pad_token_id, group_by_length=False))
    assert padded < ungrouped
    batch = batches[0]
    with torch.no_grad():
        sums, counts = per_example_loss(model(**batch.model_inputs()).logits, batch)
    for seg, s, n in zip(batch.segments, sums, counts):
        assert abs((s / n).item() - alone_loss(model, examples[seg.index], tok.pad_token_id)) <= 1e-5


def test_packed_rows_pad_to_a_fixed_width_when_asked():
    """``width``: every batch the same shape (for compiled models); the padding is one more position run, never a target."""
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    natural = collate_packed(examples, [[0, 1]], pad_id=0)
    wide = collate_packed(examples, [[0, 1]], pad_id=0, width=8)
    assert natural.input_ids.shape == (1, 5) and wide.input_ids.shape == (1, 8)
    assert wide.input_ids[0].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert wide.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert torch.equal(wide.target_ids[:, :5], natural.target_ids) and (wide.target_ids[:, 5:] == IGNORE).all()
    assert collate_packed(examples, [[0, 1]], pad_id=0, width=2).input_ids.shape == (1, 5)  # never narrower than the data
