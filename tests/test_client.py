"""The client backend (:class:`OpenAIEngine`) against a real `posttrain serve` process on 127.0.0.1.

It must give what the in-process engine gives (greedy text for text, seeded first copies draw for draw),
send only what its request cache lacks (after a finished call, a partial one, a torn cache line), retry
429 and 5xx answers (from a real HTTP proxy in front of the server) and raise other 4xx at once with the
server's words, load the models a pipeline trains by path, and be wired into `label`, `eval ifeval`
and the pipeline's config, whose stage keys must not hold settings that cannot change results.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from rich.console import Console
from serve_fixtures import served
from sft_fixtures import torch_threads
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.config import ConfigError
from posttrain.demo import pipeline
from posttrain.generate import Engine, SamplingParams
from posttrain.generate.client import EndpointError, OpenAIEngine
from posttrain.models.load import load_tokenizer, resolve

MODEL = "tiny-llama"
OTHER = "tiny-qwen2"  # a second model, loaded into the running server by path
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the server computes as the in-process engine does
PROMPTS = [
    "What color is the sky?",
    "Write a poem about the sea.",
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Give me three tips for staying healthy."}],
    [{"role": "user", "content": "Translate good morning into Spanish."}],
    {"key": 4, "prompt": "What is two plus two?", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"prompt": "Tell me about Paris.", "completion": ""},  # raw text: goes to /v1/completions, as the engine gives it to the model
    "Explain how photosynthesis works" + " please" * 6,
    "Summarize the meeting notes.",
]
GREEDY = SamplingParams(max_new_tokens=16)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _engine(name: str = MODEL) -> Engine:
    from transformers import AutoModelForCausalLM

    return Engine(AutoModelForCausalLM.from_pretrained(resolve(name)).eval(), load_tokenizer(name), batch_size=8)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    resolve(MODEL)  # build the zoo models once, here, so the server and the tests load the same files
    resolve(OTHER)
    with served(MODEL, "--dtype", "float32", "--batch-size", "8", "--allow-loading", env=ONE_THREAD) as url:
        yield url


@pytest.fixture(scope="module")
def engine() -> Engine:
    return _engine()


def client(url: str, cache: Path, **kw) -> OpenAIEngine:
    return OpenAIEngine(url, kw.pop("model", MODEL), cache_dir=cache, console=Console(record=True, width=300), timeout_s=120, **kw)


def logged(c: OpenAIEngine) -> str:
    return c.console.export_text()


def texts(outputs) -> list[list[str]]:
    return [[c.text for c in cs] for cs in outputs]


# -- what comes back ----------------------------------------------------------------------------


def test_greedy_through_the_endpoint_equals_the_engine(server, engine, tmp_path):
    want = engine.generate(PROMPTS, GREEDY, progress=False)
    c = client(server, tmp_path)
    got = c.generate(PROMPTS, GREEDY, progress=False)
    assert texts(got) == texts(want)
    assert [g[0].finish_reason for g in got] == [w[0].finish_reason for w in want]  # "eos" or "length", as the engine says
    assert [g[0].num_tokens for g in got] == [w[0].num_tokens for w in want]  # n == 1: the server's usage, exact
    assert all(g[0].token_ids == [] and g[0].prompt_token_ids == [] for g in got)
    assert c.last_counts == {"requests": 8, "cached": 0, "sent": 8, "retries": 0}
    assert "8 requests: 0 from the cache, 8 sent" in logged(c)


def test_raw_text_goes_to_the_completions_endpoint(server, engine, tmp_path):
    prompts = ["Once upon a time", "The weather today is"]
    want = engine.generate(prompts, GREEDY, apply_chat_template=False, progress=False)
    got = client(server, tmp_path).generate(prompts, GREEDY, apply_chat_template=False, progress=False)
    assert texts(got) == texts(want)
    with pytest.raises(TypeError, match="plain strings"):
        client(server, tmp_path).generate([[{"role": "user", "content": "hi"}]], GREEDY, apply_chat_template=False, progress=False)


def test_seeded_samples_are_the_engines_and_a_repeated_prompt_draws_anew(server, engine, tmp_path):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, n=3, seed=5)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]  # the third is a second copy of the first
    want = texts(engine.generate(prompts, params, progress=False))
    got = texts(client(server, tmp_path).generate(prompts, params, progress=False))
    # a first copy is sent seed=params.seed, which posttrain serve seeds as the engine does
    assert got[:2] == want[:2]
    assert len(set(got[0])) > 1, "three draws of a random model should not all agree"
    assert got[2] != got[0], "a second copy of a prompt gets its own seed, so new draws"


def test_logprobs_are_the_servers_and_match_the_engine(server, engine, tmp_path):
    params = SamplingParams(max_new_tokens=10, logprobs=True)
    (want,) = engine.generate([PROMPTS[3]], params, progress=False)[0]
    (got,) = client(server, tmp_path).generate([PROMPTS[3]], params, progress=False)[0]
    shown = want.num_tokens - (want.finish_reason == "eos")  # posttrain serve leaves the final end token out
    assert got.logprobs == pytest.approx(want.logprobs[:shown], abs=1e-4)
    with pytest.raises(ValueError, match="top_logprobs"):
        client(server, tmp_path).generate([PROMPTS[3]], SamplingParams(top_logprobs=2), progress=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        client(server, tmp_path).generate([PROMPTS[3]], SamplingParams(stop_token_ids=(3,)), progress=False)


def test_n_samples_share_the_servers_token_count(server, tmp_path):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=1)
    got = client(server, tmp_path).generate([PROMPTS[1]], params, progress=False)[0]
    total = httpx.post(
        f"{server}/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPTS[1]}],
            "max_tokens": 12,
            "temperature": 1.0,
            "n": 4,
            "seed": 1,
        },
        timeout=120,
    ).json()["usage"]["completion_tokens"]
    assert len(got) == 4 and sum(c.num_tokens for c in got) == total


# -- the request cache --------------------------------------------------------------------------


def test_the_cache_sends_only_what_is_missing(server, tmp_path):
    cache = tmp_path / "requests"
    first = client(server, cache)
    half = first.generate(PROMPTS[:4], GREEDY, progress=False)  # a run that got half way
    assert first.last_counts["sent"] == 4
    resumed = client(server, cache)
    full = resumed.generate(PROMPTS, GREEDY, progress=False)
    assert (resumed.last_counts["cached"], resumed.last_counts["sent"]) == (4, 4)
    assert "8 requests: 4 from the cache, 4 sent" in logged(resumed)
    assert texts(full[:4]) == texts(half)
    again = client(server, cache)
    assert texts(again.generate(PROMPTS, GREEDY, progress=False)) == texts(full)
    assert (again.last_counts["cached"], again.last_counts["sent"]) == (8, 0)

    # a run killed while writing: the last line cut in the middle
    (path,) = cache.glob("*.jsonl")
    data = path.read_bytes()
    assert data.count(b"\n") == 8
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1 + 40])
    torn = client(server, cache)
    assert texts(torn.generate(PROMPTS, GREEDY, progress=False)) == texts(full)
    assert (torn.last_counts["cached"], torn.last_counts["sent"]) == (7, 1)
    assert "1 unreadable cache line(s) ignored" in logged(torn)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 9 and json.loads(lines[-1])["choices"], "the torn line is closed and the new entry is whole on its own line"
    after = client(server, cache)
    after.generate(PROMPTS, GREEDY, progress=False)
    assert after.last_counts["sent"] == 0

    # the key covers what is asked: other parameters, another seed, or another model are other requests
    other = client(server, cache)
    other.generate(PROMPTS[:2], SamplingParams(max_new_tokens=8), progress=False)
    assert other.last_counts["sent"] == 2
    other.generate(PROMPTS[:2], SamplingParams(max_new_tokens=16, seed=1), progress=False)
    assert other.last_counts["sent"] == 2


def test_a_killed_run_resumes_from_its_cache(server, tmp_path):
    """A real SIGKILL mid-call: the requests that had finished are on disk, whole; the rerun sends only the rest."""
    import subprocess
    import sys

    cache = tmp_path / "requests"
    prompts = [f"Tell me about item {i}" for i in range(24)]
    script = (
        "import sys, json; from posttrain.generate.client import OpenAIEngine; from posttrain.generate import SamplingParams\n"
        f"e = OpenAIEngine({server!r}, {MODEL!r}, cache_dir={str(cache)!r}, concurrency=2)\n"
        f"e.generate({prompts!r}, SamplingParams(max_new_tokens=24), progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            files = list(cache.glob("*.jsonl"))
            if files and files[0].read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(15)
    (path,) = cache.glob("*.jsonl")
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    assert len(lines) >= 3
    whole = len(lines) - (not path.read_bytes().endswith(b"\n"))  # a line cut by the kill does not count
    c = client(server, cache)
    c.generate(prompts, SamplingParams(max_new_tokens=24), progress=False)
    assert c.last_counts == {"requests": 24, "cached": whole, "sent": 24 - whole, "retries": 0}


# -- retries ------------------------------------------------------------------------------------


class _Proxy(BaseHTTPRequestHandler):
    """Forwards to ``upstream``; the first generation requests get the scripted failures instead."""

    upstream = ""
    script: ClassVar[list[tuple[int, dict[str, str]]]] = []
    lock = threading.Lock()
    failed = 0
    forwarded = 0

    def log_message(self, *args) -> None:  # quiet
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        cls = type(self)
        with cls.lock:
            scripted = cls.script.pop(0) if cls.script and self.path.endswith("completions") else None
            if scripted:
                cls.failed += 1
            else:
                cls.forwarded += 1
        if scripted:
            status, headers = scripted
            payload = json.dumps({"error": {"message": f"scripted {status}", "type": "server_error", "param": None, "code": None}}).encode()
            self.send_response(status)
            for k, v in {**headers, "content-type": "application/json", "content-length": str(len(payload))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
            return
        skip = {"host", "content-length", "connection", "accept-encoding"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        r = httpx.request(self.command, cls.upstream + self.path, headers=headers, content=body, timeout=120)
        self.send_response(r.status_code)
        for k, v in {"content-type": r.headers.get("content-type", "application/json"), "content-length": str(len(r.content))}.items():
            self.send_header(k, v)
        for k in ("retry-after",):
            if k in r.headers:
                self.send_header(k, r.headers[k])
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = _forward


@contextmanager
def proxy(upstream: str, script: list[tuple[int, dict[str, str]]]) -> Iterator[tuple[str, type[_Proxy]]]:
    """A real HTTP server on 127.0.0.1 (a free port) in front of ``upstream`` (``http://HOST:PORT``)."""
    handler = type(
        "Proxy", (_Proxy,), {"upstream": upstream, "script": list(script), "lock": threading.Lock(), "failed": 0, "forwarded": 0}
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_429_and_5xx_are_retried_and_counted(server, engine, tmp_path):
    root = server.removesuffix("/v1")
    script = [(429, {"Retry-After": "0"}), (429, {"Retry-After": "0"}), (503, {})]  # the 503 waits our own backoff
    with proxy(root, script) as (url, seen):
        c = client(url, tmp_path, concurrency=2)
        got = c.generate(PROMPTS[:4], GREEDY, progress=False)
    assert texts(got) == texts(engine.generate(PROMPTS[:4], GREEDY, progress=False))
    assert c.last_counts == {"requests": 4, "cached": 0, "sent": 4, "retries": 3}
    assert seen.failed == 3 and seen.forwarded == 4
    assert "3 retried" in logged(c)
    # the cache is keyed by model name, not address: the server itself now answers nothing new
    direct = client(server, tmp_path)
    direct.generate(PROMPTS[:4], GREEDY, progress=False)
    assert direct.last_counts["sent"] == 0


def test_retries_are_bounded(server, tmp_path):
    root = server.removesuffix("/v1")
    with proxy(root, [(503, {"Retry-After": "0"})] * 10) as (url, seen):
        c = client(url, tmp_path, max_retries=2)
        with pytest.raises(EndpointError, match="failed 3 times.*503"):
            c.generate(PROMPTS[:1], GREEDY, progress=False)
    assert seen.failed == 3 and seen.forwarded == 0


def test_a_refused_connection_is_retried_then_raises(tmp_path):
    from sft_fixtures import free_port

    c = client(f"http://127.0.0.1:{free_port()}/v1", tmp_path, max_retries=1)
    with pytest.raises(EndpointError, match="failed 2 times.*Connection"):
        c.generate(PROMPTS[:1], GREEDY, progress=False)


def test_a_bad_request_raises_at_once_with_the_servers_message(server, tmp_path):
    root = server.removesuffix("/v1")
    with proxy(root, []) as (url, seen):
        c = client(url, tmp_path)
        with pytest.raises(EndpointError, match=r"answered 400: this model's context is \d+ tokens"):
            c.generate(PROMPTS[:1], SamplingParams(max_new_tokens=1_000_000), progress=False)
    assert seen.forwarded == 1, "a 400 is not tried again"
    with pytest.raises(EndpointError, match="answered 404: the model 'no-such-model' does not exist"):
        client(server, tmp_path, model="no-such-model").generate(PROMPTS[:1], GREEDY, progress=False)


# -- models a pipeline trains -------------------------------------------------------------------


def test_ensure_model_loads_a_directory_by_path(server, tmp_path):
    c = client(server, tmp_path, model="other")
    assert "other" not in c.served_models()
    assert c.ensure_model("other", resolve(OTHER)) == "other"
    assert "other" in c.served_models()
    c.ensure_model("other", resolve(OTHER))  # already there: nothing to do
    want = texts(_engine(OTHER).generate(PROMPTS[:3], GREEDY, progress=False))
    assert texts(c.generate(PROMPTS[:3], GREEDY, progress=False)) == want


def test_ensure_model_on_a_server_that_does_not_load_names_the_flag(tmp_path):
    with served(MODEL, "--dtype", "float32", env=ONE_THREAD) as url:
        c = client(url, tmp_path)
        c.ensure_model(MODEL, "/nowhere")  # served already: no load asked for
        with pytest.raises(EndpointError, match="--allow-loading") as info:
            c.ensure_model("other", resolve(OTHER))
    assert "403" in str(info.value) and url in str(info.value)


def test_the_pipeline_generates_from_a_trained_model_on_the_endpoint(server, tmp_path):
    out = tmp_path / "run"
    merged = out / "sft" / "merged"
    shutil.copytree(resolve(OTHER), merged)  # stands in for what the sft stage writes
    cfg = pipeline.load_pipeline(
        None,
        [f"output_dir={out}", "generation.backend=openai", f"generation.base_url={server}", "generation.concurrency=2"],
        base=pipeline.demo_config(quick=True),
    )
    logged_engine = pipeline._engine(str(merged), cfg)
    name = logged_engine.engine.model_name
    assert name.startswith("sft-") and name in logged_engine.engine.served_models()
    got = logged_engine.generate(PROMPTS[:2], GREEDY, progress=False)
    assert texts(got) == texts(_engine(OTHER).generate(PROMPTS[:2], GREEDY, progress=False))
    assert list((out / "requests").glob("sft-*.jsonl")), "the pipeline's request cache is under OUTPUT_DIR/requests"
    start = pipeline._engine(cfg.model, cfg)  # the starting model goes by the endpoint's name: generation.model, else model
    assert start.engine.model_name == cfg.model == "tiny-qwen2"
    (merged / "extra.txt").write_text("retrained")  # the stage ran again: other files, another name
    assert pipeline._served_name(str(merged)) != name


# -- config -------------------------------------------------------------------------------------


def test_backend_openai_needs_base_url_listed_with_every_other_problem():
    with pytest.raises(ConfigError) as info:
        pipeline.load_pipeline(None, ["generation.backend=openai", "generation.concurrency=0"], base=pipeline.demo_config(quick=True))
    message = str(info.value)
    assert "generation.base_url" in message and "backend openai" in message and "generation.concurrency" in message
    with pytest.raises(ConfigError, match="generation.backend"):
        pipeline.load_pipeline(None, ["generation.backend=remote"], base=pipeline.demo_config(quick=True))


def test_stage_keys_hold_what_changes_results_only():
    base = pipeline.demo_config(quick=True)
    engine_key = pipeline.load_pipeline(None, base=base).generation.stage_key()
    assert set(engine_key) == {"max_new_tokens", "batch_size", "bf16"}, "the engine backend's keys are what they were"
    remote = ["generation.backend=openai", "generation.base_url=http://127.0.0.1:9/v1"]
    key = pipeline.load_pipeline(None, remote, base=base).generation.stage_key()
    operational = [
        "generation.concurrency=3",
        "generation.timeout_s=5",
        "generation.max_retries=0",
        "generation.api_key_env=MY_KEY",
        "generation.cache_dir=/tmp/x",
    ]
    assert pipeline.load_pipeline(None, remote + operational, base=base).generation.stage_key() == key
    assert pipeline.load_pipeline(None, remote + ["generation.model=served-name"], base=base).generation.stage_key() != key
    assert key["backend"] == "openai" and key["base_url"] == "http://127.0.0.1:9/v1"


# -- the commands -------------------------------------------------------------------------------

IFEVAL = [
    {"key": 1, "prompt": "What color is the sky?", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 2, "prompt": "Write a poem about the sea.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 3, "prompt": "Tell me about Paris.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
]


def _ifeval_file(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in IFEVAL))
    return path


def test_label_samples_on_the_endpoint_and_resumes(server, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))  # the default request cache is under it
    data = _ifeval_file(tmp_path / "prompts.jsonl")
    args = ["label", "--base-url", server, "--model", MODEL, "--data", str(data), "--output", str(tmp_path / "pairs.jsonl")]
    args += ["--k", "3", "--max-new-tokens", "8", "--temperature", "1.0", "--concurrency", "2"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "3 requests: 0 from the cache, 3 sent" in first.output and "prompts × 3 samples" in first.output
    pairs = (tmp_path / "pairs.jsonl").read_text()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "3 requests: 3 from the cache, 0 sent" in again.output
    assert (tmp_path / "pairs.jsonl").read_text() == pairs
    refused = CliRunner().invoke(app, args + ["--reference-logps"])
    assert refused.exit_code == 1 and "--reference-logps" in refused.output and "posttrain dpo" in refused.output


def test_eval_ifeval_generates_on_the_endpoint(server, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    data = _ifeval_file(tmp_path / "ifeval.jsonl")
    per_item = tmp_path / "items.jsonl"
    args = ["eval", "ifeval", "--base-url", server, "--model", MODEL, "--data", str(data), "--max-new-tokens", "12"]
    result = CliRunner().invoke(app, args + ["--per-item", str(per_item), "--plot", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    want = [c[0].text for c in engine.generate([r["prompt"] for r in IFEVAL], SamplingParams(max_new_tokens=12), progress=False)]
    assert [json.loads(line)["response"] for line in per_item.read_text().splitlines()] == want
    bad = CliRunner().invoke(
        app, ["eval", "ifeval", "--base-url", server, "--model", "nope", "--data", str(data), "--plot", str(tmp_path / "d.png")]
    )
    assert bad.exit_code == 1 and "does not exist" in bad.output
