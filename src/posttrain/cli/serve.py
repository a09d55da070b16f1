"""`posttrain serve` (an OpenAI-compatible server) and `posttrain chat` (a terminal chat): parse, validate, call."""

from __future__ import annotations

import ipaddress
import os
import queue
from typing import Annotated, Any

import typer
from rich.markup import escape

from posttrain.cli.common import TemplateOpt, err, fail, out, user_errors

DTYPES = ("auto", "float32", "bfloat16")
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weights: auto (bf16 where the device has native bf16, else float32), float32 or bfloat16.")]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _adapters(pairs: list[str]) -> list[tuple[str, str]]:
    out_pairs = []
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            fail(f"--adapter takes NAME=PATH, not {pair!r}")
        out_pairs.append((name, path))
    return out_pairs


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("chat")(chat)


def serve(
    model: Annotated[str, typer.Argument(help="What to serve: a model (zoo or fetched name, local directory, hub id), an adapter directory, or any posttrain run directory. Requests name it in `model`.")],
    adapter: Annotated[list[str] | None, typer.Option("--adapter", help="NAME=PATH: also serve this LoRA/DoRA adapter (or adapter run) as NAME, decoded in the same batches as its base. Repeatable.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind. Anything but a loopback address needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.", min=0, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", help="Require `Authorization: Bearer KEY` \\[default: $POSTTRAIN_API_KEY; none on loopback].")] = None,
    served_name: Annotated[str | None, typer.Option("--served-name", help="The name requests use for MODEL \\[default: MODEL as given].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences decoded together (continuous batching: requests join and leave mid-decode).", min=1)] = 64,
    max_waiting: Annotated[int, typer.Option("--max-waiting", help="Sequences queued beyond the batch before requests get 429 with Retry-After.", min=1)] = 1024,
    max_tokens_per_request: Annotated[int, typer.Option("--max-request-tokens", help="Most n x max_tokens one request may ask for.", min=1)] = 65536,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body, in MiB.", min=0.001)] = 4.0,
    dtype: DtypeOpt = "auto",
    device: Annotated[str | None, typer.Option("--device", help="cuda, cpu, ... \\[default: cuda when there is one].")] = None,
    template: TemplateOpt = None,
    allow_loading: Annotated[bool, typer.Option("--allow-loading", help="Let clients load more models and adapters from this machine's disk (POST /v1/load_lora_adapter, vLLM's API).")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn's log level: critical, error, warning, info, debug.")] = "info",
    steer: Annotated[
        str | None,
        typer.Option(
            "--steer",
            help="A steering file from `posttrain steer fit` for MODEL: requests may then steer with its instruction types and boost attention to "
            'their instruction, chosen per request in extra body fields: `steer` ({"TYPE": weight, ...}), `steer_mode` (adjust \\[default] or add), '
            "`instaboost` (a factor m >= 1, or true: the file's chosen factor) and `instruction` (the instruction's text as it appears in the prompt; "
            "needed with instaboost). Without it, instaboost takes a number and steer is refused.",
        ),
    ] = None,
) -> None:
    """Serve MODEL over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models, /health.

    Every request is rendered with the model's own chat template (the renderer training uses) and decoded
    with every other request in flight. Use it from the `openai` package with base_url http://HOST:PORT/v1.
    """
    from posttrain.generate.served import Models
    from posttrain.generate.server import Limits
    from posttrain.generate.server import serve as run_server

    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    api_key = api_key or os.environ.get("POSTTRAIN_API_KEY") or None
    if not _loopback(host) and not api_key:
        fail(f"refusing to bind {host} without an API key: anyone who can reach it could use this machine. Give --api-key (or $POSTTRAIN_API_KEY), or bind 127.0.0.1")
    with user_errors():
        models = Models(dtype=dtype, device=device, width=batch_size, max_waiting=max_waiting, template=template)
        name = served_name or model
        err.print(f"loading {escape(model)} ({models.dtype} on {models.device}) ...", highlight=False)
        models.add(name, model)
        for adapter_name, path in _adapters(adapter or []):
            err.print(f"loading adapter {escape(adapter_name)} from {escape(path)} ...", highlight=False)
            models.add(adapter_name, path)
        steering = _steering(steer, models.names[name].engine.model.config) if steer else None
    err.print(f"serving {', '.join(sorted(models.names))} on http://{host}:{port}/v1" + (" (API key required)" if api_key else ""), highlight=False)
    if steering is not None:
        boost = f"; instaboost: true is {steering.boost:g}" if steering.boost != 1 else ""
        err.print(f"steering types ({escape(steer or '')}): {escape(', '.join(steering.types))}{boost}", highlight=False)
    limits = Limits(max_body_bytes=int(max_body_mb * 2**20), max_request_tokens=max_tokens_per_request)
    run_server(models, host=host, port=port, api_key=api_key, limits=limits, allow_loading=allow_loading, log_level=log_level, steering=steering)


def _steering(path: str, config: Any) -> Any:
    """The steering file at ``path`` as the server's :class:`~posttrain.generate.served.Steerer`, checked against the model's shape."""
    from posttrain.generate.served import Steerer
    from posttrain.steer.vectors import SteeringSet

    vectors = SteeringSet.load(path)
    if not vectors.directions:
        raise ValueError(f"{path}: the steering file has no instruction types")
    layers, hidden = config.num_hidden_layers, config.hidden_size
    for type_name, d in vectors.directions.items():
        if tuple(d.u.shape) != (layers, hidden):
            raise ValueError(
                f"{path}: {type_name}'s directions are {tuple(d.u.shape)} (layers, features), the model has {layers} layers of {hidden}: "
                f"a steering file for another model (it was fit on {vectors.model!r})"
            )

    def resolve(type_name: str, mode: str, weight: float | None) -> Any:
        return vectors.steering(type_name, mode=mode, weight=weight)  # type: ignore[arg-type]

    return Steerer(tuple(sorted(vectors.directions)), resolve, vectors.boost, path)


def chat(
    model: Annotated[str, typer.Argument(help="The model to talk to: a model, adapter or run directory (loaded here), or the endpoint's model name with --base-url.")],
    system: Annotated[str | None, typer.Option("--system", help="A system message to start with.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens per reply.", min=1)] = 512,
    temperature: Annotated[float, typer.Option("--temperature", help="0 is greedy.", min=0)] = 0.7,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first reply's draws (each reply adds one).")] = 0,
    base_url: Annotated[str | None, typer.Option("--base-url", help="Talk to an OpenAI-compatible server instead (e.g. http://127.0.0.1:8000/v1).")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="With --base-url: the environment variable holding the API key.")] = "OPENAI_API_KEY",
    dtype: DtypeOpt = "auto",
    template: TemplateOpt = None,
) -> None:
    """Chat with MODEL in the terminal, replies streamed as they are decoded.

    Type a message and press Enter. /system TEXT sets the system message (and starts over), /reset starts
    over, /exit (or Ctrl-D) leaves. The whole history is rendered by the model's chat template each turn.
    """
    from rich.prompt import Prompt

    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    with user_errors():
        reply = _remote(base_url, model, os.environ.get(api_key_env) or "EMPTY") if base_url else _local(model, dtype, template)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    out.print("[dim]/system TEXT, /reset, /exit[/]")
    turn = 0
    while True:
        try:
            line = Prompt.ask("[bold cyan]you[/]")
        except (EOFError, KeyboardInterrupt):
            out.print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = [m for m in history if m["role"] == "system"]
            out.print("[dim]history cleared[/]")
            continue
        if text.startswith("/system"):
            content = text[len("/system") :].strip()
            history = [{"role": "system", "content": content}] if content else []
            out.print(f"[dim]system message {'set' if content else 'removed'}; history cleared[/]")
            continue
        history.append({"role": "user", "content": text})
        out.print("[bold green]assistant[/] ", end="")
        pieces = []
        try:
            for piece in reply(history, max_tokens, temperature, seed + turn):
                pieces.append(piece)
                out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            out.print("[dim] (stopped)[/]", end="")
        out.print()
        history.append({"role": "assistant", "content": "".join(pieces)})
        turn += 1


def _local(model: str, dtype: str, template: str | None) -> Any:
    """A reply function over this process's engine: the scheduler streams each new piece of text."""
    from posttrain.generate.params import SamplingParams
    from posttrain.generate.served import Models

    models = Models(dtype=dtype, width=1, template=template)
    err.print(f"loading {escape(model)} ({models.dtype} on {models.device}) ...", highlight=False)
    served = models.add(model)
    engine = served.engine

    def reply(history: list[dict[str, str]], max_tokens: int, temperature: float, seed: int) -> Any:
        ids = engine.prompts.encode([history])[0]
        room = served.max_context - len(ids)
        if room < 1:
            yield "[the conversation is longer than the model's context; /reset to start over]"
            return
        news: queue.Queue = queue.Queue()
        params = SamplingParams(max_new_tokens=min(max_tokens, room), temperature=temperature, seed=seed)
        handle = served.scheduler.submit(ids, params, adapter=served.adapter, listener=news.put, on_done=lambda h: news.put(None))
        sent = ""
        try:
            while True:
                seq = news.get()
                done = seq is None
                seq = handle.seqs[0]
                text = engine.text(seq) if (done or seq.finish is not None) else engine.tokenizer.decode(list(seq.tokens), skip_special_tokens=True).rstrip("\ufffd")
                if text.startswith(sent) and len(text) > len(sent):
                    yield text[len(sent) :]
                    sent = text
                if done:
                    return
        finally:
            handle.cancel()

    return reply


def _remote(base_url: str, model: str, api_key: str) -> Any:
    """A reply function over an OpenAI-compatible endpoint, streamed."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key)

    def reply(history: list[dict[str, str]], max_tokens: int, temperature: float, seed: int) -> Any:
        stream = client.chat.completions.create(model=model, messages=history, max_tokens=max_tokens, temperature=temperature, seed=seed, stream=True)
        for event in stream:
            for choice in event.choices:
                if choice.delta.content:
                    yield choice.delta.content

    return reply

