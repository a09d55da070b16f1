"""`posttrain serve` as a real process on 127.0.0.1 (a free port), for tests that drive it with real clients."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from sft_fixtures import free_port

STARTUP_S = 180  # loading a tiny model takes seconds; the bound is for a loaded machine


@contextmanager
def served(model: str, *args: str, api_key: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``posttrain serve MODEL ARGS`` and yield its base URL (``http://127.0.0.1:PORT/v1``) once /health answers.

    The server's output goes to a log file whose tail is shown if it fails to start. Stopped (terminate,
    then kill) on exit.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "posttrain.cli", "serve", model, "--port", str(port), "--log-level", "warning", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    log = Path(os.environ.get("POSTTRAIN_CACHE", "/tmp")) / f"serve-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + STARTUP_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"posttrain serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"posttrain serve did not answer /health within {STARTUP_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.25)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
