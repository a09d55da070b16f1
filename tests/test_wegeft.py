"""WeGeFT: the base model at initialisation, merging, the parameter count, where gradients go, the shared pair, files."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from posttrain.config import AdapterConfig
from posttrain.models.adapters import apply_adapter
from posttrain.models.wegeft import WeGeFTModel, is_wegeft_dir, load_wegeft
from posttrain.models.zoo import build_tiny

TYPES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _tiny(seed: int = 0):
    model, tokenizer = build_tiny("llama", seed=seed)
    return model.eval(), tokenizer


def _ids(tokenizer):
    return torch.tensor([tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]])


def _randomise(wrapped: WeGeFTModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wrapped.pairs.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_at_initialisation_the_outputs_are_the_base_models_exactly():
    model, tokenizer = _tiny()
    ids = _ids(tokenizer)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    wrapped = apply_adapter(model, AdapterConfig(kind="wegeft"))
    assert isinstance(wrapped, WeGeFTModel) and sorted(wrapped.targets) == TYPES
    with torch.no_grad():
        got = wrapped(input_ids=ids).logits
    assert torch.equal(got, want)


def test_merged_equals_unmerged_and_disabling_gives_the_base():
    model, tokenizer = _tiny()
    ids = _ids(tokenizer)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    wrapped = WeGeFTModel(model, r=8, alpha=16)
    _randomise(wrapped)
    with torch.no_grad():
        adapted = wrapped(input_ids=ids).logits
        with wrapped.disable_adapter():
            disabled = wrapped(input_ids=ids).logits
        merged = wrapped.merge_and_unload()(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3  # the update does something
    assert torch.equal(disabled, base)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert not any(type(m).__name__ == "WeGeFTLinear" for m in model.modules())


def test_trainable_parameters_are_two_r_d_in_per_module_type_and_only_they_get_gradients():
    model, tokenizer = _tiny()
    r = 4
    wrapped = WeGeFTModel(model, r=r, alpha=8)
    d_in = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "WeGeFTLinear":
            d_in[name.rsplit(".", 1)[-1]] = m.base_layer.in_features
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == sum(2 * r * d for d in d_in.values())
    assert wrapped.trainable_parameters() == sum(2 * r * d for d in d_in.values())
    _randomise(wrapped)  # phi starts at zero, where psi's gradient is zero too
    wrapped(input_ids=_ids(tokenizer)).logits.sum().backward()
    for name, p in wrapped.named_parameters():
        if name.startswith("pairs."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


class _TwoLayers(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(d, d, bias=False)}) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer["q_proj"](x))
        return x


def test_the_shared_pair_gets_the_gradient_of_every_layer():
    """Against a hand-built version with explicit ΔW = (α/r)·W·φᵀψ matrices in both layers."""
    torch.manual_seed(0)
    d, r, alpha = 6, 3, 6.0
    net = _TwoLayers(d)
    w1, w2 = (layer["q_proj"].weight.detach().clone() for layer in net.layers)
    wrapped = WeGeFTModel(net, r=r, alpha=alpha, targets=["q_proj"])
    _randomise(wrapped, seed=3)
    x = torch.randn(5, d)
    wrapped(x).square().sum().backward()
    pair = wrapped.pairs["q_proj"]
    phi, psi = pair.phi.detach().clone().requires_grad_(), pair.psi.detach().clone().requires_grad_()

    def by_hand(layers: tuple[bool, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        p, q = phi.detach().clone().requires_grad_(), psi.detach().clone().requires_grad_()
        h = x
        for w, adapted in zip((w1, w2), layers):
            delta = (alpha / r) * w @ p.T @ q if adapted else torch.zeros_like(w)
            h = torch.tanh(h @ (w + delta).T)
        h.square().sum().backward()
        return p.grad, q.grad

    both = by_hand((True, True))
    torch.testing.assert_close(pair.phi.grad, both[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pair.psi.grad, both[1], atol=1e-5, rtol=1e-4)
    first_only = by_hand((True, False))
    assert (pair.phi.grad - first_only[0]).abs().max() > 1e-4  # the second layer's share is in it


def test_save_and_load_give_the_same_outputs(tmp_path):
    model, tokenizer = _tiny()
    ids = _ids(tokenizer)
    wrapped = WeGeFTModel(model, r=8, alpha=16)
    _randomise(wrapped)
    with torch.no_grad():
        want = wrapped(input_ids=ids).logits
    wrapped.save_pretrained(tmp_path / "adapter")
    assert is_wegeft_dir(tmp_path / "adapter") and not is_wegeft_dir(tmp_path)
    fresh, _ = _tiny()
    loaded = load_wegeft(fresh, tmp_path / "adapter")
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.equal(got, want)
    # one copy of each pair in the file, not one per layer
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(f"pairs.{t}.{m}" for t in TYPES for m in ("phi", "psi"))


def test_defaults_and_refusals():
    assert (AdapterConfig(kind="wegeft").r, AdapterConfig(kind="wegeft").alpha) == (64, 128.0)
    assert (AdapterConfig(kind="lora", r=8).r, AdapterConfig(kind="lora", r=8).alpha) == (8, 32.0)  # LoRA's defaults as before
    with pytest.raises(ValueError, match="lora or dora, not wegeft"):
        AdapterConfig(kind="wegeft", quantize="4bit")
    model, _ = _tiny()
    with pytest.raises(ValueError, match="not linear layers"):
        WeGeFTModel(model, r=4, targets=["q_proj", "no_such_proj"])
    # psi is Kaiming-uniform, as nn.Linear's weight: bound sqrt(6 / ((1 + 5) * d_in)) = 1 / sqrt(d_in)
    psi = WeGeFTModel(model, r=4).pairs["q_proj"].psi
    assert psi.abs().max() <= 1 / math.sqrt(psi.shape[1]) + 1e-6 and psi.std() > 0


def test_a_wegeft_adapter_is_served_merged_with_the_tokens_of_the_adapted_model(tmp_path):
    from posttrain.config import ModelConfig
    from posttrain.generate import Engine, SamplingParams
    from posttrain.generate.served import Models
    from posttrain.models.load import load_model, load_tokenizer

    wrapped = WeGeFTModel(load_model(ModelConfig(name="tiny-llama"), torch.device("cpu")), r=8, alpha=16)
    _randomise(wrapped)
    wrapped.save_pretrained(tmp_path / "adapter")
    tokenizer = load_tokenizer("tiny-llama")
    tokenizer.save_pretrained(tmp_path / "adapter")
    params = SamplingParams(max_new_tokens=10)
    prompts = ["What color is the sky?", "Name a river."]
    engine = Engine(wrapped.eval(), tokenizer)
    want = [c[0].token_ids for c in engine.generate(prompts, params, progress=False)]
    with wrapped.disable_adapter():
        assert [c[0].token_ids for c in engine.generate(prompts, params, progress=False)] != want  # the adapter matters
    models = Models(dtype="float32", device="cpu", width=4)
    try:
        served = models.add("mine", str(tmp_path / "adapter"))
        got = [served.scheduler.generate(ids, params, timeout=60)[0].token_ids for ids in served.engine.encode(prompts)]
    finally:
        models.close()
    assert got == want
    assert not any(type(m).__name__ == "WeGeFTLinear" for m in served.engine.model.modules())  # merged: plain linears


def test_resume_from_a_checkpoint_repeats_the_uninterrupted_run(tmp_path):
    """A WeGeFT run resumed from its step-4 checkpoint takes steps 5-8 exactly as the run that went straight on."""
    import shutil

    from safetensors.torch import load_file
    from sft_fixtures import sft_config, torch_threads, write_color_data

    from posttrain.config import load_config
    from posttrain.train import loop
    from posttrain.train.sft import train

    data = write_color_data(tmp_path / "data.jsonl")
    cfg = sft_config(data, tmp_path / "run", adapter={"kind": "wegeft", "r": 8}, train={"max_steps": 8, "save_every": 4, "keep_last": 5, "lr": 5e-3})
    with torch_threads(1):
        straight = train(load_config(cfg)).losses
        want = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
        shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-8")
        shutil.rmtree(tmp_path / "run" / "final")
        resumed = train(load_config({**cfg, "resume": True})).losses
    assert loop.latest_checkpoint(tmp_path / "run").name == "step-8"
    assert resumed == straight[4:]
    got = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
