"""The memory options: bf16 weights for full fine-tuning (with gradient checkpointing), and QLoRA's 4-bit
base, which needs CUDA: refused with a clear error before anything loads where there is none."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from sft_fixtures import read_metrics, sft_config, torch_threads, write_color_data

from posttrain.config import ConfigError, DPOConfig, load_config
from posttrain.models.load import nf4_config, quantize_problem
from posttrain.train import loop
from posttrain.train.sft import train


def test_bf16_weights_train_with_bf16_optimizer_state_and_checkpointing(tmp_path):
    data = write_color_data(tmp_path / "data.jsonl", n=48, max_reps=4)
    cfg = sft_config(
        data, tmp_path / "run", model={"name": "tiny-llama", "dtype": "bfloat16", "gradient_checkpointing": True},
        train={"max_steps": 12, "lr": 3e-3, "bf16": True, "save_every": 12},
    )  # fmt: skip
    with torch_threads(1):
        train(load_config(cfg))
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 12 and all(r["loss"] == r["loss"] for r in rows)
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3]), "bf16 weights should still learn"
    weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    state = torch.load(loop.latest_checkpoint(tmp_path / "run") / "optimizer.pt", weights_only=False)["state"]
    moments = {v.dtype for s in state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}
    assert moments == {torch.bfloat16}, "AdamW's moments take the weights' dtype: 2 bytes each instead of 4"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_without_cuda_is_refused_before_anything_loads(tmp_path):
    data = write_color_data(tmp_path / "data.jsonl", n=8)
    raw = sft_config(data, tmp_path / "run", adapter={"kind": "lora", "quantize": "4bit"})
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert "adapter.quantize" in str(err.value) and "CUDA" in str(err.value), str(err.value)
    assert not (tmp_path / "run").exists()
    assert "CUDA" in quantize_problem("4bit", "cuda:0")


@pytest.mark.parametrize("changes, message", [
    ({"adapter": {"kind": "full", "quantize": "4bit"}}, "needs adapter.kind lora or dora"),
    ({"adapter": {"kind": "lora", "quantize": "4bit"}, "train": {"distributed": "fsdp"}}, "cannot be sharded by FSDP2"),
    ({"train": {"distributed": "fsdp", "compile": True}}, "train.compile is not supported with train.distributed fsdp"),
    ({"data": {"max_length": 256, "pack_length": 128}}, "pack_length (128) must be at least data.max_length (256)"),
])  # fmt: skip
def test_combinations_that_cannot_work_are_refused(tmp_path, changes, message):
    raw = sft_config(write_color_data(tmp_path / "data.jsonl", n=8), tmp_path / "run")
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert message in str(err.value), str(err.value)


def test_dpo_reference_model_is_refused_under_fsdp(tmp_path):
    raw = {"model": {"name": "tiny-llama"}, "data": {"path": str(tmp_path)}, "train": {"distributed": "fsdp"}, "dpo": {"reference": "model"}}
    with pytest.raises(ConfigError, match="dpo.reference model keeps a whole frozen copy"):
        load_config(raw, cls=DPOConfig)


def test_qlora_quantization_is_nf4_with_double_quantization_and_bf16_compute():
    c = nf4_config()
    assert (c.load_in_4bit, c.bnb_4bit_quant_type, c.bnb_4bit_use_double_quant, c.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)


def test_pack_length_sets_the_packed_row_width(tmp_path):
    import json

    data = write_color_data(tmp_path / "data.jsonl", n=40, max_reps=4)
    widths = {}
    for pack in (None, 512):
        cfg = sft_config(data, tmp_path / f"run-{pack}", data={"max_length": 128, "packing": True, "pack_length": pack}, train={"max_steps": 1, "micro_batch_size": 1, "grad_accum": 1, "bf16": False})
        with torch_threads(1):
            train(load_config(cfg))
        widths[pack] = json.loads((tmp_path / f"run-{pack}" / "data_stats.json").read_text())["rows"]
    assert widths[512] < widths[None], f"rows 4 times wider should hold the examples in fewer rows: {widths}"
