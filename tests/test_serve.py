"""`posttrain serve` as a real process on 127.0.0.1, driven by the official `openai` client (and raw HTTP for what it hides).

The server must give what the in-process engine gives (greedy token for token, seeded draws draw for
draw, log-probs equal to a forward pass), stream the same text it returns whole, serve adapters by
name in one batch with the base, and answer every bad request with OpenAI's error object and the
right status, staying up.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from peft import LoraConfig, get_peft_model
from serve_fixtures import served

from posttrain.generate import Engine, SamplingParams
from posttrain.models.load import load_tokenizer, resolve

KEY = "test-key"
MODEL = "tiny-llama"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHATS = [[{"role": "user", "content": f"Tell me about item {i}" + " please" * (i % 4)}] for i in range(6)]


def _base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve(MODEL)).eval()


def _adapter(path, *, dora: bool) -> None:
    torch.manual_seed(1 if dora else 0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora, init_lora_weights=False)
    get_peft_model(_base(), config).save_pretrained(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    resolve(MODEL)  # build the zoo model once, here, so the server and the test load the same files
    _adapter(root / "lora", dora=False)
    _adapter(root / "dora", dora=True)
    args = ["--adapter", f"lora={root / 'lora'}", "--adapter", f"dora={root / 'dora'}", "--batch-size", "4", "--max-waiting", "12"]
    args += ["--dtype", "float32", "--max-body-mb", "0.05"]
    with served(MODEL, *args, api_key=KEY) as url:
        yield {"url": url, "adapters": root}


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server["url"], api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine():
    return Engine(_base(), load_tokenizer(MODEL), batch_size=8)


def chat(client, messages, **kw):
    return client.chat.completions.create(model=kw.pop("model", MODEL), messages=messages, **kw)


def test_greedy_chat_equals_the_engine_token_for_token(client, engine):
    want = engine.generate(CHATS, SamplingParams(max_new_tokens=12), progress=False)
    for messages, (c,) in zip(CHATS, want):
        r = chat(client, messages, max_tokens=12, temperature=0, logprobs=True)
        choice = r.choices[0]
        assert choice.message.content == c.text
        shown = c.token_ids[:-1] if c.finish_reason == "eos" else c.token_ids
        assert [t.token for t in choice.logprobs.content] == [engine.tokenizer.decode([t]) for t in shown]
        assert r.usage.completion_tokens == c.num_tokens and r.usage.prompt_tokens == len(c.prompt_token_ids)
        assert choice.finish_reason == ("length" if c.finish_reason == "length" else "stop")


def test_logprobs_equal_the_models_forward_pass(client, engine):
    messages = CHATS[1]
    (c,) = engine.generate([messages], SamplingParams(max_new_tokens=10), progress=False)[0]
    r = chat(client, messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    ids = torch.tensor([c.prompt_token_ids + c.token_ids])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0].log_softmax(-1)
    start = len(c.prompt_token_ids)
    content = r.choices[0].logprobs.content
    for k, entry in enumerate(content):
        want = logits[start - 1 + k]
        assert entry.logprob == pytest.approx(want[c.token_ids[k]].item(), abs=1e-4)
        best = want.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [engine.tokenizer.decode([int(i)]) for i in best.indices]


def test_completions_endpoint_on_raw_text(client, engine):
    prompt = "Once upon a time"
    (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=8), apply_chat_template=False, progress=False)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == c.text and r.object == "text_completion"
    two = client.completions.create(model=MODEL, prompt=[prompt, "Hello"], max_tokens=4, temperature=0)
    assert len(two.choices) == 2 and two.choices[0].text == engine.generate([prompt], SamplingParams(max_new_tokens=4), apply_chat_template=False, progress=False)[0][0].text


def test_streaming_reassembles_to_the_whole_text(client):
    for messages in CHATS[:3]:
        whole = chat(client, messages, max_tokens=16, temperature=0, n=2)
        parts = {0: [], 1: []}
        reasons, usage, roles = {}, None, 0
        for event in chat(client, messages, max_tokens=16, temperature=0, n=2, stream=True, stream_options={"include_usage": True}):
            assert event.object == "chat.completion.chunk"
            if event.usage:
                usage = event.usage
            for choice in event.choices:
                roles += choice.delta.role == "assistant"
                parts[choice.index].append(choice.delta.content or "")
                if choice.finish_reason:
                    reasons[choice.index] = choice.finish_reason
        assert roles == 2
        assert ["".join(parts[i]) for i in (0, 1)] == [c.message.content for c in whole.choices]
        assert reasons == {c.index: c.finish_reason for c in whole.choices}
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_the_stream_ends_with_done(server):
    body = {"model": MODEL, "messages": CHATS[0], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server['url']}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_n_samples_and_seeds_are_the_engines(client, engine):
    messages = CHATS[2]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, n=4, seed=7)
    want = [c.text for c in engine.generate([messages], params, progress=False)[0]]
    r = chat(client, messages, max_tokens=10, temperature=1.0, n=4, seed=7, extra_body={"top_k": 40})
    assert [c.message.content for c in r.choices] == want
    assert len(set(want)) > 1, "four draws of a random model should not all agree"
    again = chat(client, messages, max_tokens=10, temperature=1.0, n=4, seed=7, extra_body={"top_k": 40})
    assert [c.message.content for c in again.choices] == want
    other = chat(client, messages, max_tokens=10, temperature=1.0, n=4, seed=8, extra_body={"top_k": 40})
    assert [c.message.content for c in other.choices] != want


def test_stop_strings_cut_the_text(client):
    full = chat(client, CHATS[3], max_tokens=16, temperature=0).choices[0].message.content
    cut_at = next(i for i in range(3, len(full)) if full[i] not in full[:i])  # a character first seen here
    stop = full[cut_at : cut_at + 2]
    r = chat(client, CHATS[3], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop  # vLLM's field: which stop ended it
    assert chat(client, CHATS[3], max_tokens=16, temperature=0).choices[0].model_extra["stop_reason"] is None


def test_adapters_by_name_in_one_batch_with_the_base(client, server, engine):
    from peft import PeftModel

    want = {}
    for name in ("lora", "dora"):
        peft = PeftModel.from_pretrained(_base(), str(server["adapters"] / name)).eval()
        want[name] = [c[0].text for c in Engine(peft, engine.tokenizer, fast=False).generate(CHATS[:3], SamplingParams(max_new_tokens=10), progress=False)]
    want[MODEL] = [c[0].text for c in engine.generate(CHATS[:3], SamplingParams(max_new_tokens=10), progress=False)]
    assert want["lora"] != want[MODEL] and want["dora"] != want[MODEL]
    got: dict[str, list] = {name: [None] * 3 for name in want}

    def ask(name, i):
        got[name][i] = chat(client, CHATS[i], model=name, max_tokens=10, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(name, i)) for name in want for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {MODEL, "lora", "dora"}


def _error(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


def test_errors_are_openai_error_objects(client, server):
    status, body = _error(lambda: chat(client, CHATS[0], model="no-such-model", max_tokens=4))
    assert status == 404 and body["param"] == "model" and body["code"] == "model_not_found"
    status, body = _error(lambda: chat(client, CHATS[0], max_tokens=4, temperature=5))
    assert status == 400 and body["param"] == "temperature" and body["type"] == "invalid_request_error"
    status, body = _error(lambda: chat(client, [{"role": "wizard", "content": "hi"}], max_tokens=4))
    assert status == 400 and body["param"] == "messages.0.role"
    status, body = _error(lambda: chat(client, CHATS[0], max_tokens=100_000))
    assert status == 400 and body["param"] == "max_tokens" and body["code"] == "context_length_exceeded"
    status, body = _error(lambda: chat(client, CHATS[0], max_tokens=4, frequency_penalty=1.0))
    assert status == 400 and body["param"] == "frequency_penalty"
    status, body = _error(lambda: client.completions.create(model=MODEL, prompt=[[10**7]], max_tokens=4))
    assert status == 400 and body["param"] == "prompt"
    bad_key = OpenAI(base_url=server["url"], api_key="wrong", max_retries=0)
    status, body = _error(lambda: chat(bad_key, CHATS[0], max_tokens=4))
    assert status == 401 and body["code"] == "invalid_api_key"
    status, body = _error(lambda: chat(client, [{"role": "user", "content": "x" * 60_000}], max_tokens=4))
    assert status == 413
    r = httpx.post(f"{server['url']}/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "loading_disabled"


def test_malformed_bodies_are_400s_and_the_server_stays_up(server, client):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", json.dumps({"model": MODEL}).encode(), json.dumps({"model": MODEL, "messages": "hi"}).encode()):
        r = httpx.post(f"{server['url']}/chat/completions", content=body, headers=headers, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{server['url']}/no/such/route", headers=headers, timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    assert chat(client, CHATS[0], max_tokens=2, temperature=0).choices[0].message.content is not None


def test_a_full_queue_answers_429_with_retry_after(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": CHATS[0], "max_tokens": 200, "temperature": 1.0, "n": 4}
    statuses, retry = [], []

    def ask(stream: bool):
        # a streamed request is refused before its stream starts: a real 429, not an error inside a 200
        r = httpx.post(f"{server['url']}/chat/completions", json={**body, "stream": stream}, headers=headers, timeout=300)
        statuses.append(r.status_code)
        if r.status_code == 429:
            retry.append(r.headers.get("retry-after"))
            assert r.json()["error"]["code"] == "rate_limit_exceeded"

    threads = [threading.Thread(target=ask, args=(i % 2 == 1,)) for i in range(8)]  # 32 sequences for 4 rows and 12 queued
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
    assert all(r is not None and int(r) >= 1 for r in retry)


def test_a_client_that_goes_away_frees_its_rows(server, engine):
    """A stream closed after a few chunks: its sequences stop at once (far fewer tokens than asked) and leave the batch."""
    messages = next(m for m in CHATS if engine.generate([m], SamplingParams(max_new_tokens=900), progress=False)[0][0].finish_reason == "length")
    health = f"{server['url'].removesuffix('/v1')}/health"
    before = httpx.get(health, timeout=10).json()["models"][MODEL]["generated_tokens"]
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": messages, "max_tokens": 900, "temperature": 0, "n": 4, "stream": True}
    with httpx.stream("POST", f"{server['url']}/chat/completions", json=body, headers=headers, timeout=60) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += bool(line)
            if chunks >= 3:
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = httpx.get(health, timeout=10).json()["models"][MODEL]
        if state["running"] == 0 and state["queued"] == 0:
            break
        time.sleep(0.05)
    assert (state["running"], state["queued"]) == (0, 0), "the disconnected stream's sequences should have left the batch"
    generated = state["generated_tokens"] - before
    assert 0 < generated < 4 * 900 // 2, f"{generated} tokens: the cancelled samples should have stopped early"


def test_serve_refuses_another_address_without_a_key():
    from typer.testing import CliRunner

    from posttrain.cli import app

    result = CliRunner().invoke(app, ["serve", MODEL, "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "without an API key" in result.output


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_any_run_directory_can_be_served(tmp_path, kind):
    """A posttrain run (its final/ an adapter over config.yaml's base, or a whole model) served by name."""
    from peft import PeftModel
    from sft_fixtures import sft_config, write_color_data

    from posttrain.config import SFTConfig
    from posttrain.generate.served import Models
    from posttrain.train.sft import train

    adapter = {"kind": "lora", "r": 4, "alpha": 8} if kind == "lora" else {"kind": "full"}
    cfg = sft_config(write_color_data(tmp_path / "data.jsonl", n=8), tmp_path / "run", adapter=adapter, train={"max_steps": 2})
    train(SFTConfig(**cfg))
    run = tmp_path / "run"
    models = Models(dtype="float32", width=4)
    try:
        served_run = models.add("run", str(run))
        assert (served_run.adapter is not None) == (kind == "lora")
        if kind == "lora":
            assert served_run.base == MODEL and set(models.names) == {MODEL, "run"}
            reference = PeftModel.from_pretrained(_base(), str(run / "final")).eval()
        else:
            from transformers import AutoModelForCausalLM

            reference = AutoModelForCausalLM.from_pretrained(run / "final").eval()
        engine = served_run.engine
        params = SamplingParams(max_new_tokens=8)
        ids = engine.encode(CHATS[:2])
        got = [served_run.scheduler.generate(p, params, adapter=served_run.adapter, timeout=60)[0].token_ids for p in ids]
        want = [c[0].token_ids for c in Engine(reference, engine.tokenizer, fast=False).generate(CHATS[:2], params, progress=False)]
        assert got == want
    finally:
        models.close()


def test_terminal_chat_streams_replies_and_keeps_history():
    import subprocess
    import sys

    from sft_fixtures import subprocess_env

    engine = Engine(_base(), load_tokenizer(MODEL))
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    want = engine.generate([first], SamplingParams(max_new_tokens=12), progress=False)[0][0].text
    script = "hello\n/reset\n/system\nhi again\n/exit\n"
    cmd = [sys.executable, "-m", "posttrain.cli", "chat", MODEL, "--system", "Be brief.", "--temperature", "0", "--max-tokens", "12", "--dtype", "float32"]
    done = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=180, env=subprocess_env(COLUMNS="400"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("assistant") == 2 and "history cleared" in done.stdout and "system message removed" in done.stdout
    assert want.strip() and want in done.stdout
