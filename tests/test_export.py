"""A finished run's model: final/ loads with peft or plain transformers, ``posttrain export --merge`` writes a
plain transformers model, and all of them generate exactly what the trained model generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.config import load_config
from posttrain.models.adapters import apply_adapter
from posttrain.models.load import load_model, resolve
from posttrain.train import loop
from posttrain.train.sft import train
from sft_fixtures import PROMPTS, sft_config, torch_threads, write_color_data

runner = CliRunner()
NEW_TOKENS = 12


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def greedy(model, tokenizer) -> list[list[int]]:
    """Greedy continuations of PROMPTS, rendered with the tokenizer's chat template (new tokens only)."""
    model.eval()
    out = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(
                **ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        out.append(generated[0, ids["input_ids"].shape[1] :].tolist())
    return out


def trained_in_memory(cfg, run_dir: Path):
    """The model as train() left it: a fresh base (+ adapter) with the last checkpoint's trainable weights."""
    checkpoint = loop.latest_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint.name == f"step-{cfg.train.max_steps}"
    torch.manual_seed(123)  # the adapter's own init is overwritten below; any seed will do
    model = apply_adapter(load_model(cfg.model, torch.device("cpu")), cfg.adapter)
    weights = load_file(checkpoint / "trainable.safetensors")
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == set(weights)
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return model


def run(tmp_path: Path, kind: str) -> tuple:
    data = write_color_data(tmp_path / "data.jsonl")
    adapter = {"kind": kind, "r": 8} if kind != "full" else {"kind": "full"}
    lr = 2e-2 if kind != "full" else 1e-2
    train_section = {"max_steps": 24, "lr": lr, "micro_batch_size": 4, "grad_accum": 1}
    cfg = load_config(sft_config(data, tmp_path / "run", adapter=adapter, train=train_section))
    result = train(cfg)
    assert result.losses[-1] < result.losses[0] - 1.0, f"the run should learn: {result.losses}"
    return cfg, result


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_loads_with_peft_and_merged_export_with_transformers(tmp_path, kind):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, result = run(tmp_path, kind)
    final = result.final_dir
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists(), "final/ holds only the adapter"
    tokenizer = AutoTokenizer.from_pretrained(final)

    expected = greedy(trained_in_memory(cfg, result.run_dir), tokenizer)
    untrained = greedy(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")), tokenizer)
    assert expected != untrained, "the trained model should generate differently from the base model"

    # (a) final/ loads as an adapter: with AutoPeftModel (base found through adapter_config.json), and onto
    # an explicit base model with PeftModel.
    assert greedy(AutoPeftModelForCausalLM.from_pretrained(final), tokenizer) == expected
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")), final)
    assert greedy(on_base, tokenizer) == expected

    # (b) export --merge: a plain transformers directory, no peft files, the same generations.
    merged_dir = tmp_path / "merged"
    cli = runner.invoke(app, ["export", str(result.run_dir), "--merge", "-o", str(merged_dir)])
    assert cli.exit_code == 0, cli.output
    assert (merged_dir / "config.json").exists() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.state_dict().keys() == AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")).state_dict().keys()
    merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert merged_tokenizer.chat_template == tokenizer.chat_template
    assert greedy(merged, merged_tokenizer) == expected

    # Merging changes nothing but rounding: next-token logits agree with the adapter model's.
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        want = trained_in_memory(cfg, result.run_dir).eval()(**ids).logits
        got = merged(**ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()

    # --no-merge keeps the adapter directory as it is.
    adapter_dir = tmp_path / "adapter"
    cli = runner.invoke(app, ["export", str(result.run_dir), "--no-merge", "-o", str(adapter_dir)])
    assert cli.exit_code == 0, cli.output
    assert (adapter_dir / "adapter_config.json").exists()
    assert greedy(AutoPeftModelForCausalLM.from_pretrained(adapter_dir), tokenizer) == expected


def test_full_fine_tuning_final_and_export_load_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, result = run(tmp_path, "full")
    final = result.final_dir
    assert (final / "config.json").exists() and not (final / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(final)

    expected = greedy(trained_in_memory(cfg, result.run_dir), tokenizer)
    untrained = greedy(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")), tokenizer)
    assert expected != untrained, "the trained model should generate differently from the base model"

    assert greedy(AutoModelForCausalLM.from_pretrained(final), tokenizer) == expected

    exported = tmp_path / "exported"
    cli = runner.invoke(app, ["export", str(result.run_dir), "--merge", "-o", str(exported)])
    assert cli.exit_code == 0, cli.output
    assert greedy(AutoModelForCausalLM.from_pretrained(exported), AutoTokenizer.from_pretrained(exported)) == expected


def test_export_of_an_unfinished_run_fails_clearly(tmp_path):
    (tmp_path / "run").mkdir()
    cli = runner.invoke(app, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "out")])
    assert cli.exit_code == 1 and "final/" in cli.output and "Traceback" not in cli.output, cli.output


def test_wegeft_run_saves_its_pairs_and_exports_merged(tmp_path):
    """WeGeFT through `posttrain sft`: final/ holds the pairs (once each), loads onto the base, and export --merge
    writes a plain transformers model that generates what the trained model generates."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models.wegeft import load_wegeft

    cfg, result = run(tmp_path, "wegeft")
    final = result.final_dir
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["posttrain_adapter"] == "wegeft" and config["r"] == 8 and not (final / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(final)
    trained = trained_in_memory(cfg, result.run_dir)
    expected = greedy(trained, tokenizer)
    assert expected != greedy(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")), tokenizer)
    assert greedy(load_wegeft(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")), final), tokenizer) == expected

    merged_dir = tmp_path / "merged"
    cli = runner.invoke(app, ["export", str(result.run_dir), "--merge", "-o", str(merged_dir)])
    assert cli.exit_code == 0, cli.output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.state_dict().keys() == AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")).state_dict().keys()
    assert greedy(merged, AutoTokenizer.from_pretrained(merged_dir)) == expected
