"""The OpenAI API's shapes: requests validated into :class:`SamplingParams`, completions into response objects, errors.

Requests are pydantic models (fields OpenAI documents; unknown fields are ignored, as OpenAI-compatible
servers do, but a known field we cannot honour, such as ``frequency_penalty``, is refused by name rather
than dropped). Every failure is an :class:`APIError` that the server writes as OpenAI's error object,
``{"error": {"message", "type", "param", "code"}}``, with its HTTP status.

Our extension, on both completion endpoints: ``steer``, ``steer_mode``, ``instaboost`` and ``instruction``
(steering and InstABoost per request, :func:`intervention`).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from posttrain.generate.intervene import MODES, Intervention
from posttrain.generate.params import MAX_TOP_LOGPROBS, Completion, SamplingParams

if TYPE_CHECKING:
    from posttrain.generate.served import Steerer


class APIError(Exception):
    """An error the client should see: HTTP ``status`` and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="vLLM's extension; 0 or -1 is off.")
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    user: str | None = None
    # posttrain's extension (OpenAI clients send these in extra_body), checked by intervention()
    steer: Any = None
    steer_mode: Any = None
    instaboost: Any = None
    instruction: Any = None

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server; leave it at 0", param=name, code="unsupported_parameter")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias", code="unsupported_parameter")
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of is not supported by this server (use n)", param="best_of", code="unsupported_parameter")

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format other than text is not supported by this server", param="response_format")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice other than none or auto is not supported by this server", param="tool_choice")

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages with text content (a content list's text parts joined); anything else is a 400 naming it."""
        out = []
        for i, m in enumerate(self.messages):
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise APIError(400, f"messages[{i}].role must be system, user, assistant or tool, not {role!r}", param=f"messages.{i}.role")
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content.{j}")
                    texts.append(part["text"])
                content = "".join(texts)
            elif content is None and not m.get("tool_calls"):
                raise APIError(400, f"messages[{i}].content is missing", param=f"messages.{i}.content")
            elif content is not None and not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param=f"messages.{i}.content")
            message = {"role": "system" if role == "developer" else role, "content": content or ""}
            for key in ("tool_calls", "tool_call_id", "name"):
                if key in m:
                    message[key] = m[key]
            out.append(message)
        return out


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported by this server", param="echo", code="unsupported_parameter")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported_parameter")


def parse(kind: type[_Request], body: Any) -> Any:
    """``body`` as a ``kind`` request, or a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = kind.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise APIError(400, f"invalid request: {problems}", param=where or None) from None
    request.refuse_unsupported()
    return request


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def intervention(request: _Request, steerer: Steerer | None) -> tuple[Intervention | None, str | None]:
    """The request's steering and InstABoost: (the intervention, None when it changes nothing; the instruction to boost, or None).

    * ``steer``: ``{type: weight}``, each type a direction of the server's steering file (``weight`` null:
      the file's default), all applied together;
    * ``steer_mode``: ``"adjust"`` (default: the projection on the direction set to ``weight`` times the
      fit's mean projection) or ``"add"`` (``weight`` times the fit's mean difference added);
    * ``instaboost``: the factor m >= 1 on attention to the instruction's tokens (1: off), or ``true``: the
      steering file's chosen factor;
    * ``instruction``: the instruction's text as it appears in the prompt (its last occurrence is boosted);
      needed when ``instaboost`` is not 1, ignored otherwise.

    Anything wrong is a 400 naming the field.
    """
    mode = "adjust" if request.steer_mode is None else request.steer_mode
    if mode not in MODES:
        raise APIError(400, f"steer_mode must be one of {', '.join(MODES)}, not {mode!r}", param="steer_mode")
    steerings = []
    if request.steer is not None:
        if steerer is None:
            raise APIError(400, "steer needs a steering file, and this server was started without one (posttrain serve --steer FILE)", param="steer", code="steering_unavailable")
        if not isinstance(request.steer, dict):
            raise APIError(400, 'steer must be an object mapping instruction type to weight, e.g. {"detectable_format:title": 1.0}', param="steer")
        for name, weight in request.steer.items():
            if name not in steerer.types:
                raise APIError(400, f"no steering direction for instruction type {name!r}; the steering file has {', '.join(steerer.types)}", param="steer")
            if weight is not None and not _number(weight):
                raise APIError(400, f"steer[{name!r}] must be a number (the weight) or null (the file's default), not {weight!r}", param="steer")
            try:
                steerings.append(steerer.resolve(name, mode, None if weight is None else float(weight)))
            except (KeyError, ValueError) as err:
                raise APIError(400, f"cannot steer {name!r}: {err}", param="steer") from None
    value = request.instaboost
    if value is True:
        if steerer is None:
            raise APIError(400, "instaboost: true means the steering file's factor, and this server has none (posttrain serve --steer FILE); give a number", param="instaboost")
        boost = steerer.boost
    elif value is None or value is False:
        boost = 1.0
    elif _number(value) and value >= 1:
        boost = float(value)
    else:
        raise APIError(400, f"instaboost must be a number >= 1 (1: off) or true (the steering file's factor), not {value!r}", param="instaboost")
    instruction = request.instruction
    if instruction is not None and not isinstance(instruction, str):
        raise APIError(400, f"instruction must be a string (the instruction's text as it appears in the prompt), not {type(instruction).__name__}", param="instruction")
    if boost == 1.0:
        instruction = None
    elif not instruction or not instruction.strip():
        raise APIError(400, "instaboost needs instruction: the instruction's text as it appears in the prompt (its tokens get the boost)", param="instruction")
    found = Intervention(tuple(steerings), boost)
    return (found if found.active else None), instruction


def sampling_params(request: _Request, max_tokens: int, *, seed: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=max(request.top_k, 0),
        n=request.n,
        seed=seed,
        stop=tuple(request.stops()),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


# -- responses ----------------------------------------------------------------------------------

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def reported_tokens(c: Completion) -> tuple[list[int], list[float] | None, list[list[tuple[int, float]]] | None]:
    """The tokens whose log-probs a response shows: the text's, without a final end or stop token."""
    n = c.num_tokens - (1 if c.finish_reason in ("eos", "stop") and c.token_ids else 0)
    top = c.top_logprobs[:n] if c.top_logprobs is not None else None
    return c.token_ids[:n], (c.logprobs[:n] if c.logprobs is not None else None), top


def chat_logprobs(tokenizer: Any, ids: list[int], logprobs: list[float], top: list[list[tuple[int, float]]] | None) -> dict[str, Any]:
    def entry(token: int, lp: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for k, (token, lp) in enumerate(zip(ids, logprobs)):
        item = entry(token, lp)
        item["top_logprobs"] = [entry(t, v) for t, v in top[k]] if top is not None else []
        content.append(item)
    return {"content": content}


def completion_logprobs(tokenizer: Any, ids: list[int], logprobs: list[float], top: list[list[tuple[int, float]]] | None) -> dict[str, Any]:
    tokens = [tokenizer.decode([t]) for t in ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": [{tokenizer.decode([t]): v for t, v in row} for row in top] if top is not None else None,
        "text_offset": offsets,
    }


def stop_reason(c: Completion, tokenizer: Any, params: SamplingParams) -> str | int | None:
    """vLLM's ``stop_reason``: the stop string (or stop token id) that ended a ``"stop"`` completion; None for an end token or the length limit."""
    if c.finish_reason != "stop" or not c.token_ids:
        return None
    text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
    hits = [(text.find(t), t) for t in params.stop if text.find(t) >= 0]
    if hits:
        return min(hits)[1]
    return c.token_ids[-1]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def response(
    kind: Literal["chat", "text"], model: str, completions: list[Completion], prompt_tokens: int, tokenizer: Any, logprobs: bool, params: SamplingParams
) -> dict[str, Any]:
    """A ``chat.completion`` (``kind`` "chat") or ``text_completion`` object: one choice per completion, in order."""
    choices = []
    for i, c in enumerate(completions):
        choice: dict[str, Any] = {"index": i, "finish_reason": FINISH[c.finish_reason], "stop_reason": stop_reason(c, tokenizer, params), "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        if logprobs:
            ids, lps, top = reported_tokens(c)
            choice["logprobs"] = (chat_logprobs if kind == "chat" else completion_logprobs)(tokenizer, ids, lps or [], top)
        choices.append(choice)
    return {
        "id": new_id("chatcmpl" if kind == "chat" else "cmpl"),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, sum(c.num_tokens for c in completions)),
    }


def chunk(kind: Literal["chat", "text"], rid: str, model: str, created: int, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }
