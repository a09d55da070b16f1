"""Hub ids with dots, hub datasets' splits and subsets, and what a hub model is at, against a real (hand-built) offline hub cache.

Every test works offline (``HF_HUB_OFFLINE=1``) on a hub cache in ``tmp_path`` laid out as the hub lays
it out (``tests/hub_fixtures.py``); nothing is mocked but where that cache is.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from hub_fixtures import COMMIT_A, COMMIT_B, add_dataset, add_model, offline_hub, set_ref
from sft_fixtures import cli, read_metrics, sft_config, subprocess_env, write_color_data, write_yaml

from posttrain import hub
from posttrain.config import ConfigError, ModelConfig, SFTConfig, load_config, model_problem
from posttrain.data.cache import hash_source
from posttrain.data.formats import read_records
from posttrain.data.sources import read_raw

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
    # The 7B examples: FSDP full fine-tuning passes; QLoRA is refused here only for want of CUDA.
    add_model(cache, "Qwen/Qwen2.5-7B-Instruct")
    fsdp = load_config(ROOT / "examples" / "sft_qwen2.5_7b_fsdp.yaml", cls=SFTConfig)
    assert fsdp.train.distributed == "fsdp" and fsdp.data.row_width == 4096
    qlora = ROOT / "examples" / "sft_qwen2.5_7b_qlora.yaml"
    if torch.cuda.is_available():
        assert load_config(qlora, cls=SFTConfig).adapter.quantize == "4bit"
    else:
        with pytest.raises(ConfigError) as err:
            load_config(qlora, cls=SFTConfig)
        assert err.value.problems == [p for p in err.value.problems if p.startswith("adapter.quantize:") and "CUDA" in p] and err.value.problems
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


def test_sft_cli_trains_a_hub_model_on_a_hub_dataset_offline(colors_hub, tmp_path):
    """`posttrain sft` in a fresh process (the environment says where the cache is and that it is offline)."""
    run_dir = tmp_path / "run"
    cfg = sft_config(Path("unused"), run_dir, train={"max_steps": 3})
    cfg["model"] = {"name": "Org/Name-0.5B-Instruct"}
    cfg["data"]["path"] = "org/colors.v2"
    proc = subprocess.run(cli("sft", "--config", str(write_yaml(cfg, tmp_path / "sft.yaml"))), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert [row["step"] for row in read_metrics(run_dir) if "loss" in row] == [1, 2, 3]
    assert (run_dir / "final" / "config.json").exists() and (run_dir / "final" / "tokenizer.json").exists()
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["read"]["read"] == 24  # the train split, not the test one


def test_split_names_the_file_read(colors_hub):
    _, train, test = colors_hub
    as_records = lambda text: [json.loads(line) for line in text.splitlines()]  # noqa: E731
    assert read_records("org/colors.v2") == as_records(train)
    assert read_records("org/colors.v2", split="test") == as_records(test)
    first = next(iter(read_raw("org/colors.v2", split="test")))
    assert first.location.source.endswith(f"datasets--org--colors.v2/snapshots/{COMMIT_A}/data/test.jsonl") and first.location.line == 1
    with pytest.raises(FileNotFoundError, match=r"no split 'validation'; it has test, train"):
        read_records("org/colors.v2", split="validation")


def test_a_dataset_without_a_train_split_must_name_one(tmp_path, monkeypatch):
    cache = offline_hub(tmp_path, monkeypatch)
    add_dataset(cache, "org/only-test", {"test.jsonl": _colors(tmp_path, "t", 3, 0), "validation.jsonl": _colors(tmp_path, "v", 2, 1)})
    with pytest.raises(FileNotFoundError, match=r"org/only-test has no train split; name the split to read \(data.split, or --split\): it has test, validation"):
        read_records("org/only-test")
    assert len(read_records("org/only-test", split="test")) == 3


def test_subset_picks_a_readme_config_or_a_folder(tmp_path, monkeypatch):
    cache = offline_hub(tmp_path, monkeypatch)
    readme = (
        "---\nconfigs:\n"
        "- config_name: short\n  data_files:\n  - split: train\n    path: short/*.jsonl\n"
        "- config_name: long\n  data_files:\n  - split: train\n    path: long/*.jsonl\n"
        "---\n# two subsets\n"
    )
    short, long = _colors(tmp_path, "short", 2, 0), _colors(tmp_path, "long", 5, 1)
    add_dataset(cache, "org/colors.multi", {"README.md": readme, "short/part-0.jsonl": short, "long/part-0.jsonl": long})
    assert len(read_records("org/colors.multi", subset="long")) == 5
    assert len(read_records("org/colors.multi", subset="short")) == 2
    with pytest.raises(FileNotFoundError, match="has several subsets; name one \\(data.subset\\): long, short"):
        read_records("org/colors.multi")
    with pytest.raises(FileNotFoundError, match="no subset 'medium'; its README lists long, short"):
        read_records("org/colors.multi", subset="medium")
    # No configs: in the README: a subset is a top-level folder.
    add_dataset(cache, "org/colors.lang", {"en/train.jsonl": short, "fr/train.jsonl": long})
    assert len(read_records("org/colors.lang", subset="fr")) == 5
    with pytest.raises(FileNotFoundError, match="no subset 'de'.*folders: en, fr"):
        read_records("org/colors.lang", subset="de")
    # The data commands take the same choice.
    from typer.testing import CliRunner

    from posttrain.cli import app

    result = CliRunner().invoke(app, ["data", "validate", "org/colors.multi", "--subset", "long"])
    assert result.exit_code == 0 and "5 records read" in result.output, result.output
    result = CliRunner().invoke(app, ["data", "validate", "org/colors.lang", "--subset", "fr", "--revision", "main"])
    assert result.exit_code == 0 and "5 records read" in result.output, result.output


def test_revision_reads_that_commit(colors_hub, tmp_path):
    cache, train, _ = colors_hub
    add_dataset(cache, "org/colors.v2", {"data/train.jsonl": _colors(tmp_path, "newer", 4, 2)}, commit=COMMIT_B)  # refs/main -> B
    assert len(read_records("org/colors.v2")) == 4
    assert len(read_records("org/colors.v2", revision=COMMIT_A)) == 24


def test_hub_dataset_cache_key_is_its_commit(colors_hub, tmp_path):
    cache, _, _ = colors_hub
    before = hash_source("org/colors.v2")
    assert hash_source("org/colors.v2") == before
    assert len({before, hash_source("org/colors.v2", split="test"), hash_source("org/colors.v2", subset="x"), hash_source("org/colors.v2", revision=COMMIT_A)}) == 4
    add_dataset(cache, "org/colors.v2", {"data/train.jsonl": _colors(tmp_path, "newer", 4, 2)}, commit=COMMIT_B)
    assert hash_source("org/colors.v2") != before
    set_ref(cache, "datasets", "org/colors.v2", COMMIT_A)
    assert hash_source("org/colors.v2") == before


def test_reading_a_hub_dataset_not_cached_says_so_by_name(colors_hub):
    cache, _, _ = colors_hub
    message = rf"org/missing.v1 is not in the local hub cache \({cache}\) and the hub cannot be reached \(HF_HUB_OFFLINE=1\)"
    with pytest.raises(FileNotFoundError, match=message):
        read_records("org/missing.v1")
    with pytest.raises(FileNotFoundError, match=message):
        hash_source("org/missing.v1")  # the tokenized cache's key: it cannot be keyed by a name


def test_pipeline_fingerprint_is_the_hub_commit(colors_hub):
    from posttrain.demo.pipeline import model_fingerprint

    cache, _, _ = colors_hub
    assert model_fingerprint("Org/Name-0.5B-Instruct") == f"Org/Name-0.5B-Instruct@{COMMIT_A}"
    add_model(cache, "Org/Name-0.5B-Instruct", COMMIT_B)  # a new commit on main
    assert model_fingerprint("Org/Name-0.5B-Instruct") == f"Org/Name-0.5B-Instruct@{COMMIT_B}"
    assert hub.resolved_commit("Org/Name-0.5B-Instruct", revision=COMMIT_A) == COMMIT_A
    assert model_fingerprint("Org/Not-Cached") == "Org/Not-Cached"  # the commit cannot be known: the name alone
