"""The ``serve`` check of gpu_check.sh: ``posttrain serve`` on this machine's device, loaded with concurrent requests.

    python benchmarks/gpu_check_serve.py MODEL REQUESTS MAX_TOKENS [ADAPTER_DIR]

Starts the server (127.0.0.1, a free port; ``--dtype auto``: bf16 on a GPU) with ADAPTER_DIR served as
``lora`` when given; checks that its greedy answers to 8 chats equal the in-process engine's (same
device and dtype; in bf16 a batch of another shape may round a near-tie the other way, so the count
is reported, and only none equal is a failure); then sends REQUESTS chat requests at once
(half to the adapter when there is one) and prints one line: errors, aggregate tokens/s, p50 and
p99 latency.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time

import httpx

CHATS = [[{"role": "user", "content": f"Write a short note about topic {i}." + " Keep it simple." * (i % 3)}] for i in range(256)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    model, requests, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    adapter = sys.argv[4] if len(sys.argv) > 4 else None
    port = free_port()
    cmd = [sys.executable, "-m", "posttrain.cli", "serve", model, "--port", str(port), "--batch-size", "64", "--log-level", "warning"]
    if adapter:
        cmd += ["--adapter", f"lora={adapter}"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"posttrain serve exited with {server.returncode}: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("posttrain serve did not come up within 300 s")
            time.sleep(0.5)

        def ask(i: int, name: str) -> tuple[float, int, str | None, str]:
            t0 = time.perf_counter()
            body = {"model": name, "messages": CHATS[i % len(CHATS)], "max_tokens": max_tokens, "temperature": 0}
            try:
                r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600)
            except httpx.HTTPError as err:
                return time.perf_counter() - t0, 0, f"{type(err).__name__}: {err}", ""
            if r.status_code != 200:
                return time.perf_counter() - t0, 0, f"{r.status_code}: {r.text[:200]}", ""
            out = r.json()
            return time.perf_counter() - t0, out["usage"]["completion_tokens"], None, out["choices"][0]["message"]["content"]

        from posttrain.generate import Engine, SamplingParams

        served = [ask(i, model)[3] for i in range(8)]
        import torch

        from posttrain.config import native_bf16

        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = Engine.from_name(model, dtype="bfloat16" if native_bf16(torch.device(device)) else "float32", device=device)
        want = [c[0].text for c in engine.generate(CHATS[:8], SamplingParams(max_new_tokens=max_tokens), progress=False)]
        equal = sum(a == b for a, b in zip(served, want))
        del engine
        names = [model, "lora"] if adapter else [model]
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(requests, 256)) as pool:
            results = list(pool.map(lambda i: ask(i, names[i % len(names)]), range(requests)))
        wall = time.perf_counter() - t0
        errors = [r[2] for r in results if r[2]]
        latencies = sorted(r[0] for r in results)
        tokens = sum(r[1] for r in results)
        p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
        line = (
            f"{requests} requests ({'base + adapter' if adapter else 'base'}), {len(errors)} errors, {tokens / wall:,.0f} tok/s aggregate, "
            f"p50 {p(0.5):.2f} s, p99 {p(0.99):.2f} s; greedy equal to the engine {equal}/8"
        )
        print(line)
        if errors:
            raise SystemExit(f"first error: {errors[0]}")
        if equal == 0:
            raise SystemExit("no greedy answer equals the in-process engine's: the server renders or decodes differently")
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
