"""``posttrain serve``: an OpenAI-compatible HTTP API over the engine's continuous batching.

FastAPI for the HTTP (routing, streaming responses), uvicorn to run it; the rest is ours: requests
are rendered with the model's own chat template by the same renderer as training
(:class:`~posttrain.generate.prompts.PromptEncoder`), and decoded by the :class:`Scheduler` of their
base model, together with every other request in flight (:mod:`posttrain.generate.scheduler`).

Endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``, and (with
``allow_loading``) vLLM's ``/v1/load_lora_adapter``, which here takes a model or run directory as well
as an adapter. Every error is OpenAI's error object with its status: 400 for a bad field (named in
``param``), 401 for a bad key, 404 for an unknown model, 413 for a body over the limit, 429 (with
``Retry-After``) when the queue is full, 503 while stopping. A request never takes the server down:
an unexpected failure is a 500 error object and the next request is served.

Steering and InstABoost per request (started with ``posttrain serve --steer FILE``, a file from ``posttrain
steer fit``): both completion endpoints take extra body fields (``extra_body=`` in OpenAI's clients).
``steer`` maps instruction types of the file to weights, e.g. ``{"detectable_format:title": 1.0}``, all
applied together; ``steer_mode`` is ``"adjust"`` (default) or ``"add"``; ``instaboost`` is the factor m >= 1
on attention to the instruction (1: off; ``true``: the file's chosen factor), which needs ``instruction``,
the instruction's text as it appears in the prompt (its last occurrence in the rendered chat, or in each
text prompt). :func:`api.intervention` checks them (a 400 naming the field); requests with equal
interventions share a batch, and a chat with tools cannot take instaboost.

Safety: the CLI binds 127.0.0.1 unless told otherwise, and refuses another address without an API key;
request bodies are bounded (``max_body_bytes``), and so is the work one request may ask for
(``n x max_tokens <= max_request_tokens``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.generate import api
from posttrain.generate.api import APIError
from posttrain.generate.intervene import Intervention
from posttrain.generate.scheduler import Handle, QueueFull, SchedulerStopped
from posttrain.generate.sequences import DecodeSequence
from posttrain.generate.served import Models, Served, Steerer

Span = tuple[int, int] | None  # an instruction's tokens in its prompt


@dataclass
class Limits:
    max_body_bytes: int = 4 * 2**20
    max_request_tokens: int = 65536  # n x max_tokens of one request
    default_max_tokens: int = 2048  # a chat request without max_tokens: this, or what fits in the context


def create_app(
    models: Models, *, api_key: str | None = None, limits: Limits | None = None, allow_loading: bool = False, steering: Steerer | None = None
) -> Any:
    """The FastAPI app serving ``models``; ``steering``: the directions requests may steer with (None: ``steer`` is refused)."""
    limits = limits or Limits()
    app = FastAPI(title="posttrain", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", type=kind))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"the request body is over {limits.max_body_bytes} bytes", code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limits.max_body_bytes:
                raise APIError(413, f"the request body is over {limits.max_body_bytes} bytes", code="request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None

    def served(name: str) -> Served:
        found = models.get(name)
        if found is None:
            raise APIError(404, f"the model {name!r} does not exist here; GET /v1/models lists what is served", param="model", code="model_not_found")
        return found

    def budget(s: Served, prompt_tokens: int, asked: int | None, n: int) -> int:
        room = s.max_context - prompt_tokens
        if asked is None:
            asked = min(limits.default_max_tokens, room)
            if asked < 1:
                raise APIError(400, f"the prompt is {prompt_tokens} tokens, the model's context is {s.max_context}", param="messages", code="context_length_exceeded")
        elif prompt_tokens + asked > s.max_context:
            raise APIError(
                400,
                f"this model's context is {s.max_context} tokens; the prompt is {prompt_tokens} and max_tokens asks for {asked} more",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if n * asked > limits.max_request_tokens:
            raise APIError(400, f"n x max_tokens = {n * asked} is over this server's {limits.max_request_tokens}", param="n")
        return asked

    def submit(s: Served, ids: list[int], params: Any, intervention: Intervention | None = None, instruction: Span = None, **kwargs: Any) -> Handle:
        if intervention is not None:
            try:
                s.engine.check_intervention(intervention, [instruction], [ids])
            except ValueError as err:  # a steering file for another model
                raise APIError(400, f"cannot steer {s.name}: {err}", param="steer") from None
        try:
            return s.scheduler.submit(ids, params, adapter=s.adapter, intervention=intervention, instruction=instruction, **kwargs)
        except QueueFull as err:
            error = APIError(429, str(err), type="rate_limit_error", code="rate_limit_exceeded")
            error.headers["Retry-After"] = str(int(err.retry_after + 0.999))
            raise error from None
        except SchedulerStopped as err:
            error = APIError(503, str(err), type="server_error", code="unavailable")
            error.headers["Retry-After"] = "5"
            raise error from None

    def marked(s: Served, prompts: list[Any], instruction: str, *, chat: bool) -> tuple[list[list[int]], list[Span]]:
        """The prompts' token ids and their instruction's tokens (for InstABoost), or a 400 naming ``instruction``."""
        try:
            return s.engine.prompts.encode_marked(prompts, [instruction] * len(prompts), apply_chat_template=chat)
        except ValueError as err:
            raise APIError(400, f"instruction: {err}", param="instruction") from None

    async def run(
        request: Request, s: Served, prompts: list[list[int]], params: Any, intervention: Intervention | None = None, spans: list[Span] | None = None
    ) -> list[Handle]:
        """Submit every prompt and wait until all are done; a client that goes away cancels them (their rows are freed)."""
        loop = asyncio.get_running_loop()
        events = [asyncio.Event() for _ in prompts]

        def notifier(event: asyncio.Event) -> Any:
            def done(handle: Handle) -> None:
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # the event loop has closed
                    pass

            return done

        handles: list[Handle] = []
        try:
            for ids, span, event in zip(prompts, spans or [None] * len(prompts), events):
                handles.append(submit(s, ids, params, intervention, span, on_done=notifier(event)))
            for event in events:
                while not event.is_set():
                    try:
                        await asyncio.wait_for(event.wait(), 1.0)
                    except TimeoutError:
                        if await request.is_disconnected():
                            raise asyncio.CancelledError from None
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        failed = next((h.error for h in handles if h.error is not None), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {type(failed).__name__}: {failed}", type="server_error")
        return handles

    def seed_of(request: api._Request) -> int:
        return request.seed if request.seed is not None else secrets.randbits(62)

    # -- routes ---------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and each model's sequences running and queued (no key needed: it shows no content)."""
        state = {
            name: {"running": s.scheduler.running, "queued": s.scheduler.queued, "generated_tokens": s.scheduler.tokens_generated}
            for name, s in models.names.items()
        }
        return {"status": "ok", "models": state}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        data = [
            {"id": s.name, "object": "model", "created": s.created, "owned_by": "posttrain", "root": s.name, "parent": s.base if s.adapter else None}
            for s in models.names.values()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> dict[str, Any]:
        authorize(request)
        if not allow_loading:
            raise APIError(403, "loading models is off on this server (start posttrain serve with --allow-loading)", code="loading_disabled")
        body = await read_json(request)
        name, path = (body or {}).get("lora_name"), (body or {}).get("lora_path")
        if not isinstance(name, str) or not name:
            raise APIError(400, "lora_name must be a non-empty string", param="lora_name")
        if not isinstance(path, str) or not path:
            raise APIError(400, "lora_path must be a non-empty string", param="lora_path")
        if models.get(name) is not None:
            return {"status": "ok", "model": name, "loaded": False}
        try:
            await asyncio.get_running_loop().run_in_executor(None, models.add, name, path)
        except (OSError, ValueError) as err:
            raise APIError(400, f"cannot load {path!r}: {err}", param="lora_path") from None
        return {"status": "ok", "model": name, "loaded": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        authorize(request)
        req = api.parse(api.ChatRequest, await read_json(request))
        s = served(req.model)
        engine = s.engine
        intervention, instruction = api.intervention(req, steering)
        messages, tools = req.chat_messages(), req.tools if req.tool_choice != "none" else None
        try:
            text = engine.prompts.renderer.render_prompt(messages, tools)
        except APIError:
            raise
        except Exception as err:  # noqa: BLE001 — the template's own complaint (roles out of order, ...)
            raise APIError(400, f"the chat template cannot render these messages: {err}", param="messages") from None
        ids, span = engine.tokenizer(text, add_special_tokens=False)["input_ids"], None
        if instruction is not None:
            if tools:
                raise APIError(400, "instaboost with tools is not supported by this server", param="instaboost", code="unsupported_parameter")
            (ids,), (span,) = marked(s, [messages], instruction, chat=True)
        asked = req.max_completion_tokens or req.max_tokens
        max_tokens = budget(s, len(ids), asked, req.n)
        params = api.sampling_params(req, max_tokens, seed=seed_of(req), logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0)
        if req.stream:
            opened = open_stream(s, ids, params, intervention, span)
            return StreamingResponse(stream(s, opened, ids, params, "chat", req.include_usage), media_type="text/event-stream")
        (handle,) = await run(request, s, [ids], params, intervention, [span])
        completions = [engine.completion(q) for q in handle.seqs]
        return api.response("chat", req.model, completions, len(ids), engine.tokenizer, req.logprobs, params)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        authorize(request)
        req = api.parse(api.CompletionRequest, await read_json(request))
        s = served(req.model)
        engine = s.engine
        intervention, instruction = api.intervention(req, steering)
        prompts = _prompt_list(req.prompt)
        spans: list[Span] = [None] * len(prompts)
        if instruction is None:
            ids = [p if isinstance(p, list) else engine.prompts.encode([p], apply_chat_template=False)[0] for p in prompts]
        elif any(not isinstance(p, str) for p in prompts):
            raise APIError(400, "instaboost needs the prompt as text (to find the instruction in), not token ids", param="instaboost")
        else:
            ids, spans = marked(s, prompts, instruction, chat=False)
        vocab = len(engine.tokenizer)
        for i, p in enumerate(ids):
            if not p:
                raise APIError(400, f"prompt {i} is empty", param="prompt")
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in p):
                raise APIError(400, f"prompt {i} has token ids outside the vocabulary (0..{vocab - 1})", param="prompt")
        max_tokens = min(budget(s, len(p), req.max_tokens, req.n * len(ids)) for p in ids)
        top = req.logprobs or 0
        params = api.sampling_params(req, max_tokens, seed=seed_of(req), logprobs=req.logprobs is not None, top_logprobs=top)
        if req.stream:
            if len(ids) != 1:
                raise APIError(400, "stream takes one prompt", param="prompt")
            opened = open_stream(s, ids[0], params, intervention, spans[0])
            return StreamingResponse(stream(s, opened, ids[0], params, "text", req.include_usage), media_type="text/event-stream")
        handles = await run(request, s, ids, params, intervention, spans)
        done = [engine.completion(q) for h in handles for q in h.seqs]
        return api.response("text", req.model, done, sum(map(len, ids)), engine.tokenizer, req.logprobs is not None, params)

    # -- streaming ------------------------------------------------------------------------------

    def open_stream(
        s: Served, ids: list[int], params: Any, intervention: Intervention | None = None, instruction: Span = None
    ) -> tuple[Handle, asyncio.Queue]:
        """Submit a streamed request: its sequences post news of each token to the returned queue (None: all done).

        Called before the response starts, so a full queue is a real 429, not an error inside a 200 stream.
        """
        loop = asyncio.get_running_loop()
        news: asyncio.Queue[DecodeSequence | None] = asyncio.Queue()

        def post(item: DecodeSequence | None) -> None:
            try:
                loop.call_soon_threadsafe(news.put_nowait, item)
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        return submit(s, ids, params, intervention, instruction, listener=post, on_done=lambda h: post(None)), news

    async def stream(s: Served, opened: tuple[Handle, asyncio.Queue], ids: list[int], params: Any, kind: str, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per new piece of text a sample has, its finish reason, usage, ``[DONE]``."""
        handle, news = opened
        engine = s.engine
        rid, created = api.new_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())
        index = {id(q): i for i, q in enumerate(handle.seqs)}
        sent = [""] * len(handle.seqs)
        reported = [0] * len(handle.seqs)  # tokens whose log-probs have gone out
        closed = [False] * len(handle.seqs)
        hold = max((len(t) for t in params.stop), default=1) - 1
        try:
            if kind == "chat":
                first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for i in range(len(sent))]
                yield _event(api.chunk("chat", rid, s.name, created, first))
            while not all(closed):
                item = await news.get()
                touched = {} if item is None else {id(item): item}
                while not news.empty():
                    more = news.get_nowait()
                    if more is not None:
                        touched[id(more)] = more
                    else:
                        item = None
                if item is None:
                    touched = {id(q): q for q in handle.seqs}
                if handle.error is not None:
                    yield _event(APIError(500, f"generation failed: {handle.error}", type="server_error").body())
                    break
                choices = []
                for key, q in touched.items():
                    i = index[key]
                    if closed[i]:
                        continue
                    finish = q.finish
                    if finish is None:
                        text = engine.tokenizer.decode(list(q.tokens), skip_special_tokens=True)
                        text = text[: len(text) - hold] if hold else text
                        text = text.rstrip("\ufffd")  # a character whose bytes are still coming
                    else:
                        text = engine.text(q)
                    delta = text[len(sent[i]) :] if text.startswith(sent[i]) else ""
                    if not delta and finish is None:
                        continue
                    sent[i] += delta
                    choice = _delta_choice(kind, i, delta)
                    if params.logprobs:
                        n_tokens = len(q.tokens) if finish is None else len(api.reported_tokens(engine.completion(q))[0])
                        lps = q.logprobs[reported[i] : n_tokens]
                        top = q.top_logprobs[reported[i] : n_tokens] if params.top_logprobs else None
                        chosen = q.tokens[reported[i] : n_tokens]
                        shape = api.chat_logprobs if kind == "chat" else api.completion_logprobs
                        choice["logprobs"] = shape(engine.tokenizer, chosen, lps, top)
                        reported[i] = n_tokens
                    if finish is not None:
                        choice["finish_reason"] = api.FINISH[finish]
                        choice["stop_reason"] = api.stop_reason(engine.completion(q), engine.tokenizer, params)
                        closed[i] = True
                    choices.append(choice)
                if choices:
                    yield _event(api.chunk(kind, rid, s.name, created, choices))  # type: ignore[arg-type]
            if include_usage and handle.error is None:
                used = api.usage(len(ids), sum(len(q.tokens) for q in handle.seqs))
                yield _event(api.chunk(kind, rid, s.name, created, [], usage=used))  # type: ignore[arg-type]
            yield "data: [DONE]\n\n"
        finally:
            if not handle.done.is_set():
                handle.cancel()

    return app


def _delta_choice(kind: str, i: int, text: str) -> dict[str, Any]:
    if kind == "chat":
        return {"index": i, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": None}
    return {"index": i, "text": text, "logprobs": None, "finish_reason": None}


def _event(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


def serve(
    models: Models,
    *,
    host: str,
    port: int,
    api_key: str | None,
    limits: Limits,
    allow_loading: bool,
    log_level: str = "info",
    steering: Steerer | None = None,
) -> None:
    """Run the server until interrupted, then stop every scheduler."""
    import uvicorn

    app = create_app(models, api_key=api_key, limits=limits, allow_loading=allow_loading, steering=steering)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        models.close()
