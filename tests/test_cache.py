"""Tokenized data is cached under a content hash: unchanged inputs tokenize nothing, any change retokenizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from chat_fixtures import CONVERSATION, family_tokenizer
from test_packing import conversations

from posttrain.data import cache as cache_mod
from posttrain.data.cache import prepare
from posttrain.data.chat import ChatRenderer, RenderOptions


@pytest.fixture
def count_tokenize(monkeypatch):
    """Counts the texts that reach the tokenizer (a spy on the real method, which still runs)."""
    calls = {"texts": 0}
    real = ChatRenderer.tokenize

    def spy(self, rendered, stats=None):
        calls["texts"] += len(rendered)
        return real(self, rendered, stats)

    monkeypatch.setattr(ChatRenderer, "tokenize", spy)
    return calls


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_second_run_tokenizes_nothing_and_changes_retokenize(tmp_path, count_tokenize):
    data = tmp_path / "chat.jsonl"
    write(data, conversations(30) + [CONVERSATION])
    tok = family_tokenizer("chatml")
    store = tmp_path / "cache"

    first = prepare(data, tok, cache=store, num_proc=1)
    assert not first.from_cache and count_tokenize["texts"] == 31 and len(first) == 31

    second = prepare(data, tok, cache=store, num_proc=1)
    assert second.from_cache and count_tokenize["texts"] == 31, "an unchanged second run must tokenize nothing"
    assert np.array_equal(first.input_ids, second.input_ids) and np.array_equal(first.labels, second.labels)
    assert second.stats.to_dict() == first.stats.to_dict()

    prepare(data, tok, RenderOptions(template="chatml"), cache=store, num_proc=1)
    assert count_tokenize["texts"] == 62, "a different template must retokenize"

    prepare(data, tok, RenderOptions(train_on="last_assistant"), cache=store, num_proc=1)
    assert count_tokenize["texts"] == 93, "different options must retokenize"

    write(data, conversations(30, seed=5) + [CONVERSATION])
    changed = prepare(data, tok, cache=store, num_proc=1)
    assert not changed.from_cache and count_tokenize["texts"] == 124, "changed data must retokenize"

    prepare(data, family_tokenizer("smollm2"), cache=store, num_proc=1)
    assert count_tokenize["texts"] == 155, "a different tokenizer/template must retokenize"


def test_parallel_rendering_equals_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK", 16)  # several chunks, so the pool is used
    data = tmp_path / "chat.jsonl"
    write(data, conversations(100, seed=3))
    tok = family_tokenizer("llama3")
    serial = prepare(data, tok, cache=tmp_path / "a", num_proc=1)
    parallel = prepare(data, tok, cache=tmp_path / "b", num_proc=2)
    assert np.array_equal(serial.input_ids, parallel.input_ids)
    assert np.array_equal(serial.labels, parallel.labels)
    assert np.array_equal(serial.offsets, parallel.offsets)
    direct = ChatRenderer(tok).render_many(conversations(100, seed=3))
    assert [list(serial[i]["labels"]) for i in range(100)] == [d["labels"] for d in direct]


def test_a_half_written_cache_entry_is_not_used(tmp_path, count_tokenize):
    data = tmp_path / "chat.jsonl"
    write(data, conversations(5))
    tok = family_tokenizer("chatml")
    first = prepare(data, tok, cache=tmp_path / "c", num_proc=1)
    entry = tmp_path / "c" / first.key
    (entry / "stats.json").unlink()  # as if the writer died before finishing
    again = prepare(data, tok, cache=tmp_path / "c", num_proc=1)
    assert not again.from_cache and count_tokenize["texts"] == 10
    assert prepare(data, tok, cache=tmp_path / "c", num_proc=1).from_cache, "the incomplete entry was replaced"


def test_pool_equals_serial_with_cuts_drops_and_pairs(tmp_path, monkeypatch):
    """Pool workers cut, drop and keep-or-drop preference pairs exactly as one process does, stats included."""
    monkeypatch.setattr(cache_mod, "CHUNK", 8)
    convs = conversations(60, seed=7)
    records = [
        {"prompt": c["messages"][:1], "chosen": c["messages"][1:2], "rejected": [{"role": "assistant", "content": "no " * (1 + 40 * (i % 3))}]}
        for i, c in enumerate(convs)
    ]
    data = tmp_path / "pairs.jsonl"
    write(data, records)
    tok = family_tokenizer("chatml")
    whole = prepare(data, tok, cache=tmp_path / "whole", num_proc=1).lengths()
    # Long enough for every chosen answer and the shortest rejected ones: longer rejected ones drop their partner.
    limit = int(max(whole[0::2].max(), whole[1::2].min()))
    options = RenderOptions(max_length=limit, overlong="drop")
    serial = prepare(data, tok, options, cache=tmp_path / "a", num_proc=1)
    parallel = prepare(data, tok, options, cache=tmp_path / "b", num_proc=2)
    assert serial.stats.dropped_overlong > 0 and serial.stats.dropped_with_partner > 0 and len(serial) % 2 == 0
    assert serial.stats.to_dict() == parallel.stats.to_dict()
    for name in ("input_ids", "labels", "offsets"):
        assert np.array_equal(getattr(serial, name), getattr(parallel, name))
    assert serial.stats.kept == len(serial) and serial.stats.tokens == len(serial.input_ids)
    assert serial.stats.trained_tokens == int((serial.labels != -100).sum())

    cut = RenderOptions(max_length=limit)
    a = prepare(data, tok, cut, cache=tmp_path / "c", num_proc=1)
    b = prepare(data, tok, cut, cache=tmp_path / "d", num_proc=2)
    assert a.stats.truncated > 0 and a.stats.to_dict() == b.stats.to_dict() and np.array_equal(a.labels, b.labels)
    assert a.lengths().max() == limit and len(a) == 120
