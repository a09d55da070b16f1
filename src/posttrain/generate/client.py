"""The client backend: :class:`OpenAIEngine`, the :class:`~posttrain.generate.engine.Engine` interface on any OpenAI-compatible endpoint.

``posttrain serve``, vLLM's server or a hosted API generate; this process only sends chats and collects
completions, so every generating stage (``posttrain label``, ``posttrain eval ifeval``, the pipeline's
sample, label and eval stages) can run against a server on a GPU machine.

What comes from the ``openai`` package: the HTTP client, the request and response shapes, its error
classes (:class:`openai.APIStatusError` and its kin). Its own retries are switched off
(``max_retries=0``), because two things here are ours:

* **The retry policy.** A 429 or 5xx answer, a refused connection or a timeout is tried again, at most
  ``max_retries`` times per request, after the server's ``Retry-After`` (seconds, milliseconds or an
  HTTP date; at most :data:`MAX_RETRY_AFTER_S`) or else an exponential backoff with jitter
  (``BACKOFF_S * 2**attempt``, capped at :data:`MAX_BACKOFF_S`, times a random factor in [0.5, 1)) so
  that ``concurrency`` workers told to wait do not all come back in the same instant. Any other 4xx
  (a bad request, a bad key, an unknown model) would fail again the same way: it raises at once,
  with the server's own message. Retries are counted (``last_counts["retries"]``).
* **The request cache, which makes a run resumable.** Each finished request is appended to a JSON Lines
  file (one per model name, under ``cache_dir``) under a content hash of what was asked: the model
  name, the messages (or prompt text) and tools, every request parameter sent (the seed included), and
  which copy of a repeated prompt it is. One line is written and flushed per request as it finishes, so a
  killed run loses only the requests in flight; a torn last line is ignored and the file repaired. The
  next call sends only what is missing and says so in one line (``N requests: K from the cache, M
  sent``; the counts are also on ``engine.last_counts``). The key holds the model *name*, not the
  server's address: the same name on another server is trusted to be the same weights, so a name that
  comes to mean other weights needs another name (the pipeline names its trained models after their
  files) or another ``cache_dir``.

How a call maps onto the API
----------------------------
A chat prompt (a string is one user message, a list of messages, or a canonical record, read by
:func:`~posttrain.data.chat.generation_prompt` as the in-process engine reads it) is one request to
``/v1/chat/completions`` with ``messages`` (and the record's ``tools``); the server renders its chat
template. A raw-text prompt (``apply_chat_template=False``, or a prompt/completion record's text
prompt) goes to ``/v1/completions``; such a server tokenizes it with the tokenizer's special tokens (a
BOS, where it has one), as ``apply_chat_template=False`` does in process. One request per prompt,
``n`` samples in it. :class:`SamplingParams` become ``max_tokens``, ``temperature``, ``top_p``, ``n``,
``stop``, ``seed``, ``logprobs`` and, when non-zero, ``top_k`` (vLLM's extension, in the body).
``stop_token_ids`` and ``top_logprobs`` are refused (a client without the tokenizer has no token ids
to give or read back); ``bf16`` is not sent (the server's dtype decides) and ``batch_size`` is ignored
(the server batches; ``concurrency`` is how many requests are in flight). ``adapter``: the name the
endpoint serves an adapter under (it becomes the request's ``model``).

What comes back, and what is exact
----------------------------------
``text`` is the server's. ``finish_reason``: ``"length"`` as the server says; the server's ``"stop"``
(which means an end token *or* a stop) is ``"stop"`` only when it says which stop string matched
(vLLM's ``stop_reason``, which ``posttrain serve`` reports too) and that string is one of
``params.stop``; otherwise ``"eos"``. So with stop strings, on a server that does not report
``stop_reason``, a completion cut at a stop string says ``"eos"``: both mean it ended on its own, not
at ``max_new_tokens``.
``token_ids`` and ``prompt_token_ids`` are ``[]`` (the API gives token texts, not ids).
``num_tokens``: the server's ``usage.completion_tokens``, exact for ``n == 1``; for ``n > 1`` that total
is shared out over the choices in proportion to their log-prob counts (or evenly without log-probs),
so the sum is exact and each share approximate. ``logprobs`` (when asked): the log-probs the server
reports for the completion's tokens (``posttrain serve`` leaves out the final end token, whose
log-prob its ``num_tokens`` counts).

Seeds
-----
The in-process engine seeds each sample from (seed, the prompt's tokens, which copy of an identical
prompt this is within the call, the sample's index). Here the first copy of a prompt is sent
``seed=params.seed`` and a later identical copy a seed derived from (seed, copy), so repeated prompts
get new draws, as in process. What a seed draws is the endpoint's own random stream: ``posttrain
serve`` on the same model, device and dtype draws what the engine draws for a first copy; other
servers draw other samples, and some ignore the seed.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from posttrain.generate.params import Completion, FinishReason, SamplingParams

BACKOFF_S = 0.5  # the first retry's wait, without a Retry-After
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 120.0  # a longer Retry-After is waited this long, then tried (and counted) again
CACHE_VERSION = 1  # part of every key: a change in what a request means starts a fresh cache

T = TypeVar("T")


class EndpointError(RuntimeError):
    """A request the endpoint refused (a 4xx other than 429), or that still failed after every retry."""


@dataclass(frozen=True)
class _Request:
    """One HTTP request of a call: a prompt (and which copy of it), with what is sent besides the model."""

    index: int  # the prompt's place in the call
    endpoint: str  # "chat" or "text"
    body: dict[str, Any]  # messages/tools or prompt, and the sampling parameters
    key: str


class RequestCache:
    """Finished requests on disk: ``DIR/<model>-<hash>.jsonl``, one ``{"key", "model", "choices", "completion_tokens"}`` a line.

    Appends are one ``write`` each on a file opened for appending, so lines of concurrent workers (or of
    two processes) do not interleave; a line cut short by a kill is skipped on reading, and a newline is
    written after it before anything is appended.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        self._lock = threading.Lock()

    def path(self, model: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._")[:80] or "model"
        return self.directory / f"{slug}-{hashlib.sha256(model.encode()).hexdigest()[:8]}.jsonl"

    def load(self, model: str) -> tuple[dict[str, dict[str, Any]], int]:
        """(entries by key, lines that could not be read). Repairs a torn last line so appends start on a new line."""
        path = self.path(model)
        if not path.is_file():
            return {}, 0
        entries, unreadable = {}, 0
        data = path.read_bytes()
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries[entry["key"]] = entry
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                unreadable += 1
        if data and not data.endswith(b"\n"):
            self._write(path, b"\n")
        return entries, unreadable

    def append(self, model: str, entry: dict[str, Any]) -> None:
        path = self.path(model)
        self._write(path, (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode())

    def _write(self, path: Path, data: bytes) -> None:
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)


def default_cache_dir() -> Path:
    """``$POSTTRAIN_CACHE/requests`` (``~/.cache/posttrain/requests``): for callers that give no run directory."""
    from posttrain.models.zoo import cache_dir

    return cache_dir() / "requests"


def copy_seed(seed: int, copy: int) -> int:
    """The seed sent for the ``copy``-th identical copy of a prompt in one call: ``seed`` itself for the first."""
    if copy == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:copy:{copy}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def retry_after(headers: Any) -> float | None:
    """Seconds the server asks us to wait (``retry-after-ms``, ``Retry-After`` in seconds or as an HTTP date), or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())
    return None


def _backoff(attempt: int) -> float:
    return min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt) * random.uniform(0.5, 1.0)


def _server_message(err: Any) -> str:
    """The server's own words for an error status: OpenAI's ``error.message``, else the body, else the client's text."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return str(err)


class OpenAIEngine:
    """Generation on an OpenAI-compatible endpoint, with :class:`Engine`'s ``generate``; see the module docstring.

    ``base_url``: the API root (``http://HOST:PORT/v1``). ``model``: the endpoint's name for the model (``model_name``).
    ``api_key``: the key itself; else the environment variable ``api_key_env`` (empty or unset: ``"EMPTY"``,
    what keyless servers accept). ``concurrency``: requests in flight. ``timeout_s``: per request;
    ``max_retries``: extra tries per request. ``cache_dir``: the request cache (default
    :func:`default_cache_dir`). ``console``: where the one line per call goes (a rich console; default
    stderr).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 600.0,
        max_retries: int = 5,
        cache_dir: str | Path | None = None,
        console: Any = None,
    ):
        from openai import OpenAI

        problems = []
        if not base_url:
            problems.append("base_url is empty")
        if not model:
            problems.append("model is empty")
        if concurrency < 1:
            problems.append(f"concurrency must be at least 1, not {concurrency}")
        if timeout_s <= 0:
            problems.append(f"timeout_s must be positive, not {timeout_s}")
        if max_retries < 0:
            problems.append(f"max_retries must be >= 0, not {max_retries}")
        if problems:
            raise ValueError("invalid OpenAI endpoint settings: " + "; ".join(problems))
        self.base_url = base_url.rstrip("/")
        self.model_name = model  # not `model`: on Engine that is the loaded module, which callers test for
        self.concurrency = concurrency
        self.max_retries = max_retries
        key = api_key or (os.environ.get(api_key_env) if api_key_env else None) or "EMPTY"
        self.client = OpenAI(base_url=self.base_url, api_key=key, timeout=timeout_s, max_retries=0)
        self.cache = RequestCache(cache_dir if cache_dir is not None else default_cache_dir())
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console
        self.last_counts: dict[str, int] = {"requests": 0, "cached": 0, "sent": 0, "retries": 0}
        self._retries = 0
        self._retries_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIEngine({self.base_url!r}, model={self.model_name!r})"

    # -- models -----------------------------------------------------------------------------------

    def served_models(self) -> list[str]:
        """The names ``/v1/models`` lists."""
        return [m.id for m in self._call(lambda: self.client.models.list(), what="GET /models").data]

    def ensure_model(self, name: str, path: str | Path) -> str:
        """Make ``name`` servable: if ``/v1/models`` lacks it, ask the server to load ``path`` as ``name``; returns ``name``.

        Loading is vLLM's runtime API (``POST /v1/load_lora_adapter`` with ``lora_name`` and
        ``lora_path``), which ``posttrain serve --allow-loading`` also takes for a full model or run
        directory, and vLLM for LoRA adapters when started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.
        ``path`` is read by the server, so it must be a path on the server's machine. A server that
        refuses raises :class:`EndpointError` naming it and the setting that allows loading.
        """
        if name in self.served_models():
            return name
        import httpx

        path = str(Path(path).resolve())
        what = f"POST {self.base_url}/load_lora_adapter"
        try:
            self._call(
                lambda: self.client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": path}, cast_to=httpx.Response),
                what=what,
            )
        except EndpointError as err:
            raise EndpointError(
                f"{self.base_url} would not load {path} as {name!r} ({err}). Generating from a model trained in this run needs a "
                "server that loads models at run time: posttrain serve --allow-loading, or vLLM started with "
                "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (adapters only), on a machine that sees this path"
            ) from None
        if name not in self.served_models():
            raise EndpointError(f"{self.base_url} accepted loading {path} as {name!r} but /v1/models does not list it")
        return name

    # -- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Any],
        params: SamplingParams | None = None,
        *,
        apply_chat_template: bool = True,
        progress: bool = True,
        batch_size: int | None = None,
        adapter: str | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in the prompts' order; finished requests come from the cache.

        As :meth:`Engine.generate`, with the differences the module docstring lists. ``batch_size`` is
        ignored; ``adapter`` is the endpoint's name for it (sent as ``model``).
        """
        params = params or SamplingParams()
        model = adapter or self.model_name
        requests = self._plan(prompts, params, apply_chat_template, model)
        cached, unreadable = self.cache.load(model)
        results: dict[int, dict[str, Any]] = {r.index: cached[r.key] for r in requests if r.key in cached}
        missing = [r for r in requests if r.index not in results]
        with self._retries_lock:
            self._retries = 0
        bar = _progress_bar(progress, len(requests), len(results))
        with bar or nullcontext():
            self._send(missing, model, results, bar)
        self.last_counts = {
            "requests": len(requests),
            "cached": len(requests) - len(missing),
            "sent": len(missing),
            "retries": self._retries,
        }
        notes = [f"{self._retries} retried"] if self._retries else []
        notes += [f"{unreadable} unreadable cache line(s) ignored"] if unreadable else []
        self.console.print(
            f"{model} at {self.base_url}: {len(requests)} requests: {len(requests) - len(missing)} from the cache, {len(missing)} sent"
            + (f" ({', '.join(notes)})" if notes else ""),
            highlight=False,
            soft_wrap=True,
        )
        return [_completions(results[r.index], params) for r in requests]

    def _plan(self, prompts: Sequence[Any], params: SamplingParams, apply_chat_template: bool, model: str) -> list[_Request]:
        from posttrain.data.chat import generation_prompt

        if params.stop_token_ids:
            raise ValueError(
                "stop_token_ids cannot be sent to an OpenAI-compatible endpoint (the client has no tokenizer); give stop strings"
            )
        if params.top_logprobs:
            raise ValueError(
                "top_logprobs is not supported by the OpenAI client backend (the API gives token texts, not ids); use logprobs"
            )
        sampling: dict[str, Any] = {
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
        }
        if params.stop:
            sampling["stop"] = list(params.stop)
        copies: dict[str, int] = {}
        requests = []
        for i, prompt in enumerate(prompts):
            if apply_chat_template:
                content, tools = generation_prompt(prompt)
            elif isinstance(prompt, str):
                content, tools = prompt, None
            else:
                raise TypeError(f"apply_chat_template=False takes plain strings; prompt {i} is {type(prompt).__name__}")
            if isinstance(content, str):
                endpoint, body = "text", {"prompt": content}
                if not content:
                    raise ValueError(f"prompt {i} is empty: nothing to condition on")
            else:
                endpoint, body = "chat", {"messages": content}
                if tools:
                    body["tools"] = tools
            identity = json.dumps([endpoint, body], sort_keys=True, ensure_ascii=False)
            copy = copies.get(identity, 0)
            copies[identity] = copy + 1
            body = {**body, **sampling, "seed": copy_seed(params.seed, copy)}
            if params.logprobs:
                body["logprobs"] = True if endpoint == "chat" else 0  # /completions takes how many alternatives besides the token
            if params.top_k:
                body["top_k"] = params.top_k
            key = hashlib.sha256(
                json.dumps(
                    {"v": CACHE_VERSION, "model": model, "endpoint": endpoint, "body": body, "copy": copy},
                    sort_keys=True,
                    ensure_ascii=False,
                ).encode()
            ).hexdigest()
            requests.append(_Request(i, endpoint, body, key))
        return requests

    def _send(self, requests: list[_Request], model: str, results: dict[int, dict[str, Any]], bar: Any) -> None:
        """Send ``requests`` ``concurrency`` at a time; each finished one goes to the cache and ``results`` as it lands.

        The first request that fails for good stops the rest: those not started are cancelled, those in
        flight finish (and are cached), and its error is raised.
        """
        if not requests:
            return
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)), thread_name_prefix="openai-engine")
        try:
            futures: dict[Future[dict[str, Any]], _Request] = {pool.submit(self._one, r, model): r for r in requests}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()  # type: ignore[misc]
                    results[futures[future].index] = future.result()
                    if bar is not None:
                        bar.update(bar.task_ids[0], advance=1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _one(self, request: _Request, model: str) -> dict[str, Any]:
        """Send one request (with retries), cache what came back, and return the cache entry."""
        body = dict(request.body)
        extra = {"top_k": body.pop("top_k")} if "top_k" in body else None
        if request.endpoint == "chat":
            response = self._call(
                lambda: self.client.chat.completions.create(model=model, extra_body=extra, **body), what="POST /chat/completions"
            )
            choices = [
                {
                    "text": c.message.content or "",
                    "finish_reason": c.finish_reason,
                    "stop_reason": getattr(c, "stop_reason", None),
                    "logprobs": [t.logprob for t in c.logprobs.content]
                    if c.logprobs is not None and c.logprobs.content is not None
                    else None,
                }
                for c in sorted(response.choices, key=lambda c: c.index)
            ]
        else:
            response = self._call(lambda: self.client.completions.create(model=model, extra_body=extra, **body), what="POST /completions")
            choices = [
                {
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "stop_reason": getattr(c, "stop_reason", None),
                    "logprobs": list(c.logprobs.token_logprobs)
                    if c.logprobs is not None and c.logprobs.token_logprobs is not None
                    else None,
                }
                for c in sorted(response.choices, key=lambda c: c.index)
            ]
        if len(choices) != body["n"]:
            raise EndpointError(f"{self.base_url}: asked for n={body['n']} completions, got {len(choices)}")
        tokens = response.usage.completion_tokens if response.usage is not None else None
        entry = {"key": request.key, "model": model, "choices": choices, "completion_tokens": tokens}
        self.cache.append(model, entry)
        return entry

    def _call(self, send: Callable[[], T], *, what: str) -> T:
        """``send()``, tried again on 429, 5xx, connection errors and timeouts, at most ``max_retries`` times."""
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                return send()
            except openai.APIStatusError as err:
                if err.status_code != 429 and err.status_code < 500:
                    raise EndpointError(f"{self.base_url}: {what} answered {err.status_code}: {_server_message(err)}") from None
                failure, wait_s = f"{err.status_code}: {_server_message(err)}", retry_after(err.response.headers)
            except openai.APIConnectionError as err:  # a timeout is one too
                failure, wait_s = f"{type(err).__name__}: {err}", None
            if attempt == self.max_retries:
                break
            with self._retries_lock:
                self._retries += 1
            time.sleep(min(wait_s, MAX_RETRY_AFTER_S) if wait_s is not None else _backoff(attempt))
        raise EndpointError(f"{self.base_url}: {what} failed {self.max_retries + 1} times; the last answer was {failure}")


def _completions(entry: dict[str, Any], params: SamplingParams) -> list[Completion]:
    """A cache entry as :class:`Completion` objects (see the module docstring for what is exact)."""
    choices = entry["choices"]
    total = entry.get("completion_tokens")
    counts = _share(total, [len(c["logprobs"]) if c.get("logprobs") is not None else None for c in choices])
    out = []
    for c, num_tokens in zip(choices, counts):
        finish: FinishReason
        if c["finish_reason"] == "length":
            finish = "length"
        elif isinstance(c.get("stop_reason"), str) and c["stop_reason"] in params.stop:
            finish = "stop"
        else:
            finish = "eos"
        out.append(Completion(c["text"], [], finish, num_tokens, [], c["logprobs"] if params.logprobs else None, None))
    return out


def _share(total: int | None, weights: list[int | None]) -> list[int]:
    """``total`` tokens over the choices: in proportion to ``weights`` (evenly where any is unknown), summing to ``total``."""
    n = len(weights)
    if not n:
        return []
    if total is None:
        return [w or 0 for w in weights]
    if n == 1:
        return [total]
    known = [w for w in weights if w is not None]
    base = weights if len(known) == n and sum(known) > 0 else [1] * n
    scale = total / sum(base)  # type: ignore[arg-type]
    shares = [int(w * scale) for w in base]  # type: ignore[operator]
    for k in range(total - sum(shares)):  # the rounding's remainder, one token each from the first
        shares[k % n] += 1
    return shares


def _progress_bar(enabled: bool, total: int, done: int) -> Any:
    if not enabled or done == total:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("requests"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    bar.add_task("requests", total=total, completed=done)
    return bar
