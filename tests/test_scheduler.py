"""The scheduler in process: requests submitted from many threads decode together and give what the engine gives alone.

Uses SmolLM2's chat template (its default system prompt is a 20-odd-token preamble every chat shares),
so the scheduler's prefix cache is exercised; seeds, cancellation and the bounded queue too.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from posttrain.generate import Engine, SamplingParams
from posttrain.generate.scheduler import QueueFull, Scheduler
from posttrain.models.zoo import build_tiny

TEMPLATE = (Path(__file__).parent / "templates" / "smollm2.jinja").read_text()
CHATS = [[{"role": "user", "content": f"question {i}" + " and more" * (i % 5)}] for i in range(12)]


@pytest.fixture(scope="module")
def engine():
    model, tokenizer = build_tiny("llama", chat_template=TEMPLATE)
    return Engine(model.eval(), tokenizer, batch_size=4)


def test_concurrent_requests_equal_the_engine_alone_and_share_the_preamble(engine):
    preamble = engine.prompts.preamble()
    assert len(preamble) >= 16, "SmolLM2's template starts every chat with its default system prompt"
    params = SamplingParams(max_new_tokens=10)
    want = [engine.generate([c], params, progress=False)[0][0].token_ids for c in CHATS]
    ids = engine.encode(CHATS)
    scheduler = Scheduler(engine, width=4)
    got: list = [None] * len(CHATS)

    def ask(i):
        time.sleep(0.003 * (i % 4))
        got[i] = scheduler.generate(ids[i], params, timeout=60)[0].token_ids

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(CHATS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == want
        assert scheduler._prefix is not None and scheduler._prefix._cached.get((0, None)) is not None, "the preamble's cache should have been used"
        sampled = SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=11)
        assert [c.token_ids for c in scheduler.generate(ids[0], sampled, timeout=60)] == [
            c.token_ids for c in engine.generate([CHATS[0]], sampled, progress=False)[0]
        ]
    finally:
        scheduler.stop()


def test_cancel_frees_rows_and_a_full_queue_refuses(engine):
    scheduler = Scheduler(engine, width=2, max_waiting=4)
    try:
        long = SamplingParams(max_new_tokens=600, temperature=1.0, seed=1)
        first = scheduler.submit(engine.encode(CHATS[:1])[0], long)
        second = scheduler.submit(engine.encode(CHATS[1:2])[0], SamplingParams(max_new_tokens=600, temperature=1.0, seed=2, n=3))
        with pytest.raises(QueueFull) as full:
            scheduler.submit(engine.encode(CHATS[2:3])[0], SamplingParams(max_new_tokens=4, n=3))  # at least 2 of 4 wait: 2 + 3 > 4
        assert full.value.retry_after >= 1
        first.cancel()
        second.cancel()
        assert first.done.wait(30) and second.done.wait(30)
        assert all(len(s.tokens) < 600 for s in first.seqs + second.seqs if s.finish == "length")
        assert scheduler.running == 0 and scheduler.queued == 0
        assert scheduler.generate(engine.encode(CHATS[3:4])[0], SamplingParams(max_new_tokens=4), timeout=30)[0].num_tokens >= 1
    finally:
        scheduler.stop()
