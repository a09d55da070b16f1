"""Activation steering: the fit's arithmetic, the hooks' exact edits, the file, and generation through Engine."""

from __future__ import annotations

import pytest
import torch

from posttrain.generate import Engine, SamplingParams
from posttrain.generate.intervene import Steering, steered
from posttrain.models.zoo import build_tiny
from posttrain.steer.vectors import Direction, SteeringSet, direction, last_token_residuals


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tokenizer = build_tiny("llama")
    return model.eval(), tokenizer


def test_direction_is_the_normalised_mean_difference_and_c_the_mean_projection():
    g = torch.Generator().manual_seed(0)
    without = torch.randn(5, 3, 8, generator=g)
    shift = torch.randn(3, 8, generator=g)
    with_instruction = without + shift + 0.01 * torch.randn(5, 3, 8, generator=g)
    d = direction(with_instruction, without)
    mean = (with_instruction - without).mean(0)
    torch.testing.assert_close(d.u * d.norm.unsqueeze(-1), mean)
    torch.testing.assert_close(d.u.norm(dim=-1), torch.ones(3))
    for layer in range(3):
        assert d.c[layer].item() == pytest.approx((with_instruction[:, layer] @ d.u[layer]).mean().item(), rel=1e-5)


def _residuals(model, ids):
    return last_token_residuals(model, [ids], batch_size=1)[0]


def test_add_and_adjust_edit_exactly_the_layer_they_name(tiny):
    model, tokenizer = tiny
    ids = tokenizer("the quick brown fox jumps")["input_ids"]
    base = _residuals(model, ids)
    d = base.shape[1]
    u = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(1)), dim=0)
    # the capture hook is registered after the steering hook, so it sees the steered output of layer 0
    with steered(model, [Steering(0, u, "add", 2.5)]):
        added = _residuals(model, ids)
    torch.testing.assert_close(added[0], base[0] + 2.5 * u)
    assert not torch.allclose(added[1], base[1])  # the edit flows on to the next layer
    with steered(model, [Steering(1, u, "adjust", -3.0)]):
        adjusted = _residuals(model, ids)
    assert torch.equal(adjusted[0], base[0])  # layers before the steered one are untouched
    assert (adjusted[1] @ u).item() == pytest.approx(-3.0, abs=1e-4)
    torch.testing.assert_close(adjusted[1] - (adjusted[1] @ u) * u, base[1] - (base[1] @ u) * u)
    # the hooks are gone after the block, also after an error inside it
    with pytest.raises(RuntimeError), steered(model, [Steering(0, u, "add", 1.0)]):
        raise RuntimeError("inside")
    assert torch.equal(_residuals(model, ids), base)


def test_weight_zero_gives_the_unsteered_logits_and_tokens(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, batch_size=8, fast=False)
    prompts = ["write a poem about the sea", "name three rivers", "what is two plus two"]
    params = SamplingParams(max_new_tokens=12)
    plain = [c[0].token_ids for c in engine.generate(prompts, params, progress=False)]
    u = torch.nn.functional.normalize(torch.ones(model.config.hidden_size), dim=0)
    with steered(model, [Steering(1, u, "add", 0.0)]):
        zero = [c[0].token_ids for c in engine.generate(prompts, params, progress=False)]
    assert zero == plain
    with steered(model, [Steering(1, u, "add", 50.0)]):
        pushed = [c[0].token_ids for c in engine.generate(prompts, params, progress=False)]
    assert pushed != plain  # a large push changes what is generated: the hooks are really in the loop


def test_the_file_round_trips(tmp_path):
    g = torch.Generator().manual_seed(2)
    u = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    steering = SteeringSet("tiny-llama", {"detectable_format:title": Direction(u, torch.rand(4, generator=g), torch.randn(4, generator=g), 2, 4.0)})
    steering.save(tmp_path / "v.safetensors")
    back = SteeringSet.load(tmp_path / "v.safetensors")
    d = back.directions["detectable_format:title"]
    assert back.model == "tiny-llama" and d.layer == 2 and d.weight == 4.0 and torch.equal(d.u, u)
    s = back.steering("detectable_format:title")
    assert s.layer == 2 and s.mode == "add" and s.amount == pytest.approx(4.0 * float(d.norm[2]))
    assert back.steering("detectable_format:title", mode="adjust").amount == pytest.approx(float(d.c[2]))
    with pytest.raises(KeyError, match="no direction for instruction type"):
        back.steering("punctuation:no_comma")
    with pytest.raises(FileNotFoundError, match="posttrain steer fit"):
        SteeringSet.load(tmp_path / "missing.safetensors")
