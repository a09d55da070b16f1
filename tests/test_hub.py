"""Hub ids with dots, hub datasets' splits and subsets, and what a hub model is at, against a real (hand-built) offline hub cache.

Every test works offline (``HF_HUB_OFFLINE=1``) on a hub cache in ``tmp_path`` laid out as the hub lays
it out (``tests/hub_fixtures.py``); nothing is mocked but where that cache is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hub_fixtures import COMMIT_A, COMMIT_B, add_dataset, add_model, offline_hub
from sft_fixtures import write_color_data

from posttrain import hub
from posttrain.config import ConfigError, ModelConfig, SFTConfig, load_config, model_problem

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "is_hub"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", True),
        ("meta-llama/Llama-3.1-8B-Instruct", True),
        ("mistralai/Mistral-7B-Instruct-v0.3", True),
        ("gpt2", True),
        ("org/colors.v2", True),
        ("./data.jsonl", False),
        ("data.jsonl", False),
        ("/abs/x", False),
        ("~/x", False),
        ("a/b/c", False),
        ("model.gguf", False),
        ("org/weights.safetensors", False),
    ],
)
def test_hub_id_or_local_path(name, is_hub):
    assert hub.is_hub_id(name) is is_hub


def test_an_existing_path_is_local_whatever_its_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "colors.v2").mkdir()
    assert not hub.is_hub_id("org/colors.v2")


def _colors(tmp_path: Path, name: str, n: int, seed: int) -> str:
    return write_color_data(tmp_path / f"{name}.jsonl", n=n, seed=seed).read_text()


@pytest.fixture
def colors_hub(tmp_path, monkeypatch):
    """An offline hub cache with model Org/Name-0.5B-Instruct and dataset org/colors.v2 (24 train, 6 test records)."""
    cache = offline_hub(tmp_path, monkeypatch)
    add_model(cache, "Org/Name-0.5B-Instruct")
    train, test = _colors(tmp_path, "train", 24, 0), _colors(tmp_path, "test", 6, 1)
    add_dataset(cache, "org/colors.v2", {"README.md": "# colors\n", "data/train.jsonl": train, "data/test.jsonl": test})
    return cache, train, test


def test_gpu_examples_pass_full_validation_against_a_hub_cache(tmp_path, monkeypatch):
    """Both GPU examples, resources checked, with Qwen/Qwen2.5-0.5B-Instruct in the (offline) hub cache."""
    from posttrain.demo.pipeline import load_pipeline

    cache = offline_hub(tmp_path, monkeypatch)
    monkeypatch.chdir(ROOT)  # the SFT example's data path is relative to the repository
    sft = ROOT / "examples" / "sft_qwen2.5_0.5b_lora.yaml"
    with pytest.raises(ConfigError, match="model.name: Qwen/Qwen2.5-0.5B-Instruct is not in the local hub cache"):
        load_config(sft, cls=SFTConfig)  # the model is checked, not skipped
    add_model(cache, "Qwen/Qwen2.5-0.5B-Instruct")
    cfg = load_config(sft, cls=SFTConfig)
    assert cfg.model.name == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.adapter.kind == "lora"
    # `posttrain run` validates a pipeline with its loader, then its model, before any stage.
    pipeline = load_pipeline(ROOT / "examples" / "pipeline_qwen2.5_0.5b.yaml")
    assert pipeline.model == "Qwen/Qwen2.5-0.5B-Instruct" and model_problem(pipeline.model) is None


def test_a_hub_id_not_cached_offline_says_so_by_name(colors_hub, tmp_path):
    from posttrain.models.load import load_tokenizer

    cache, _, _ = colors_hub
    bad = {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, "data": {"path": "org/missing.v1"}, "output_dir": str(tmp_path / "x")}
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    text = str(info.value)
    assert f"model.name: meta-llama/Llama-3.1-8B-Instruct is not in the local hub cache ({cache}) and the hub cannot be reached (HF_HUB_OFFLINE=1)" in text
    assert f"data.path: org/missing.v1 is not in the local hub cache ({cache}) and the hub cannot be reached (HF_HUB_OFFLINE=1)" in text
    assert "hf download meta-llama/Llama-3.1-8B-Instruct" in text and "hf download --repo-type dataset org/missing.v1" in text
    with pytest.raises(FileNotFoundError, match=r"meta-llama/Llama-3.1-8B-Instruct is not in the local hub cache"):
        load_tokenizer("meta-llama/Llama-3.1-8B-Instruct")
    # A revision is part of what must be cached: main is, this branch is not.
    assert model_problem({"name": "Org/Name-0.5B-Instruct"}) is None
    assert "Org/Name-0.5B-Instruct@dev is not in the local hub cache" in model_problem({"name": "Org/Name-0.5B-Instruct", "revision": "dev"})


def test_tokenizer_follows_the_model_config_revision(colors_hub):
    from posttrain.models.load import load_tokenizer

    cache, _, _ = colors_hub
    newer = add_model(cache, "Org/Name-0.5B-Instruct", COMMIT_B)  # main -> B, whose tokenizer says 1234 tokens at most
    config = json.loads((newer / "tokenizer_config.json").read_text())
    (newer / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 1234}))
    assert load_tokenizer(ModelConfig(name="Org/Name-0.5B-Instruct")).model_max_length == 1234
    assert load_tokenizer(ModelConfig(name="Org/Name-0.5B-Instruct", revision=COMMIT_A)).model_max_length != 1234
    assert load_tokenizer("Org/Name-0.5B-Instruct", revision=COMMIT_A).model_max_length != 1234
