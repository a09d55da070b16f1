"""The sandbox for model-written code, attacked: every attack must end as a failed check, leak nothing and leave nothing running.

Each attack is an ``evaluate(response)`` that returns ``True`` only when the attack worked (so a pass
would be an escape), plus what the host checks afterwards (a file not written, a listener that heard
nothing, no process left). The suite runs on bubblewrap and on the ``unshare`` fallback; CI installs
bubblewrap and runs as a user that can make user namespaces, so neither is skipped there.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from posttrain.verify import sandbox as sb

TIMEOUT = 1.5
SECRET = "posttrain-sandbox-secret-7f3a"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=sb.ISOLATIONS)
def sandbox(request):
    isolation = request.param
    why = sb.probe(isolation)
    if why is not None:
        pytest.skip(f"{isolation} does not work here: {why}")
    os.environ["POSTTRAIN_SANDBOX_SECRET"] = SECRET  # the workers start with this in the host's environment
    try:
        box = sb.Sandbox(workers=1, isolation=isolation, limits=sb.Limits(timeout_s=TIMEOUT, memory_mb=512, processes=24))
        box.run("def evaluate(r):\n    return True\n", ["warm"])  # start the worker
    finally:
        del os.environ["POSTTRAIN_SANDBOX_SECRET"]
    yield box
    box.close()


def descendants(pid: int) -> set[int]:
    """Host processes below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def host_processes_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def attack(box: sb.Sandbox, code: str, response: str = "a response") -> sb.CheckResult:
    """Run one attack; assert it did not pass and that the sandbox is left as it was (no extra processes)."""
    worker = box._all[0]
    assert worker.process is not None
    before = descendants(worker.process.pid)
    started = time.monotonic()
    (result,) = box.run(textwrap.dedent(code), [response])
    assert time.monotonic() - started < TIMEOUT * 3 + 10
    assert result.result is not True, f"the attack passed: {result}"
    if worker.process is not None:  # a worker that was killed and not yet restarted has nothing left either
        deadline = time.monotonic() + 5
        while descendants(worker.process.pid) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert descendants(worker.process.pid) - before == set(), "the attack left processes running"
    return result


# -- files ------------------------------------------------------------------------------------


def test_cannot_read_etc_passwd(sandbox):
    attack(sandbox, """
        def evaluate(response):
            return "root:" in open("/etc/passwd").read()
    """)


def test_cannot_read_the_home_directory(sandbox):
    home = Path.home()
    secret = home / f".posttrain-sandbox-test-{os.getpid()}"
    secret.write_text(SECRET)
    try:
        # The walk skips the interpreter's own prefix, which the sandbox binds read-only on purpose (here it lies
        # under the home directory: pyenv, 51,000 files, 0.2 s to walk idle and past the 1.5 s limit on a loaded machine).
        result = attack(sandbox, f"""
            import os, sys
            def evaluate(response):
                seen = []
                prefixes = {{sys.prefix, sys.base_prefix}}
                for root, dirs, files in os.walk({str(home)!r}):
                    dirs[:] = [d for d in dirs if os.path.join(root, d) not in prefixes]
                    seen += files
                return open({str(secret)!r}).read() == {SECRET!r} or len(seen) > 0 and not all('python' in f or f.endswith(('.py', '.so', '.pyc')) for f in seen)
        """)
        assert "No such file" in (result.error or "")
    finally:
        secret.unlink()


def test_cannot_read_the_repository(sandbox):
    attack(sandbox, f"""
        def evaluate(response):
            return "posttrain" in open({str(REPO / 'pyproject.toml')!r}).read()
    """)


def test_cannot_read_the_hosts_tmp(sandbox, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    attack(sandbox, f"""
        def evaluate(response):
            return open({str(secret)!r}).read() == {SECRET!r}
    """)


def test_cannot_write_outside_scratch(sandbox, tmp_path):
    interpreter_dir = Path(os.path.realpath(sb._interpreter())).parent
    targets = [tmp_path / "escaped.txt", interpreter_dir / "escaped.txt", Path("/usr/escaped.txt"), Path("/escaped.txt")]
    result = attack(sandbox, f"""
        def evaluate(response):
            written = 0
            for path in {[str(t) for t in targets]!r}:
                try:
                    with open(path, "w") as f:
                        f.write("x")
                    written += 1
                except OSError:
                    pass
            return written > 0
    """)
    assert result.ok and result.result is False
    assert not any(t.exists() for t in targets)


def test_cannot_delete_outside_scratch(sandbox, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    attack(sandbox, f"""
        import os, shutil
        def evaluate(response):
            os.remove({str(victim)!r})
            return True
    """)
    assert victim.read_text() == "keep me"


def test_cannot_remount_the_read_only_files_writable(sandbox):
    attack(sandbox, """
        import ctypes, os
        def evaluate(response):
            libc = ctypes.CDLL(None, use_errno=True)
            MS_REMOUNT, MS_BIND = 32, 4096
            if libc.mount(None, b"/usr", None, ctypes.c_ulong(MS_REMOUNT | MS_BIND), None) == 0:
                return True
            # a nested user namespace has capabilities of its own: the inherited read-only mounts stay locked
            if libc.unshare(0x10000000 | 0x00020000) == 0:  # CLONE_NEWUSER | CLONE_NEWNS
                if libc.mount(None, b"/usr", None, ctypes.c_ulong(MS_REMOUNT | MS_BIND), None) == 0:
                    open("/usr/escaped", "w").write("x")
                    return True
            return False
    """)
    assert not Path("/usr/escaped").exists()


# -- network ----------------------------------------------------------------------------------


def test_cannot_connect_to_a_listener_on_the_hosts_loopback(sandbox):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        attack(sandbox, f"""
            import socket
            def evaluate(response):
                s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
                s.sendall(b"leaked: " + response.encode())
                return True
        """)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()


def test_cannot_reach_an_outside_address(sandbox):
    result = attack(sandbox, """
        import socket
        def evaluate(response):
            s = socket.create_connection(("1.1.1.1", 443), timeout=1)
            return True
    """)
    assert "unreachable" in (result.error or "").lower()


def test_cannot_resolve_names(sandbox):
    attack(sandbox, """
        import socket
        def evaluate(response):
            return len(socket.getaddrinfo("pypi.org", 443)) > 0
    """)


# -- processes and resources ------------------------------------------------------------------


def test_a_fork_bomb_is_stopped(sandbox):
    result = attack(sandbox, """
        import os
        def evaluate(response):
            while True:
                os.fork()
    """)
    assert "PermissionError" in result.error  # the seccomp filter refuses new processes


def test_the_process_limit_holds(sandbox):
    result = attack(sandbox, """
        import os, time
        def evaluate(response):
            started = 0
            try:
                for _ in range(500):
                    if os.fork() == 0:
                        time.sleep(60)
                        os._exit(0)
                    started += 1
            except OSError:
                pass
            return started >= 500
    """)
    assert result.ok and result.result is False


def test_a_thread_bomb_is_stopped(sandbox):
    attack(sandbox, """
        import threading, time
        def evaluate(response):
            threads = [threading.Thread(target=time.sleep, args=(30,), daemon=True) for _ in range(5000)]
            for t in threads:
                t.start()
            return True
    """)


def test_a_memory_bomb_is_stopped(sandbox):
    result = attack(sandbox, """
        def evaluate(response):
            hoard = []
            for _ in range(200):
                hoard.append(bytearray(64 << 20))  # 12.5 GiB in all
            return True
    """)
    assert "MemoryError" in result.error


def test_an_infinite_loop_times_out(sandbox):
    result = attack(sandbox, """
        def evaluate(response):
            while True:
                pass
    """)
    assert "timed out" in result.error


def test_catastrophic_regex_backtracking_in_c_times_out(sandbox):
    result = attack(sandbox, """
        import re
        def evaluate(response):
            return re.match(r"(a+)+$", "a" * 64 + "!") is not None
    """)
    assert "timed out" in result.error


def test_sleeping_past_the_limit_times_out(sandbox):
    result = attack(sandbox, """
        import time
        def evaluate(response):
            time.sleep(60)
            return True
    """)
    assert "timed out" in result.error


def test_cancelling_alarms_and_ignoring_signals_does_not_help(sandbox):
    result = attack(sandbox, """
        import signal
        def evaluate(response):
            signal.alarm(0)
            for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGXCPU):
                signal.signal(sig, signal.SIG_IGN)
            while True:
                pass
    """)
    assert "timed out" in result.error or "SIGKILL" in result.error


def test_huge_output_is_capped(sandbox):
    result = attack(sandbox, """
        import os, sys
        def evaluate(response):
            print("x" * 50_000_000)
            sys.stderr.write("y" * 50_000_000)
            os.write(3, b"z" * 50_000_000)  # the result pipe
            return True
    """)
    assert "more than" in result.error
    long_error = attack(sandbox, """
        def evaluate(response):
            raise ValueError("e" * 10_000_000)
    """)
    assert len(long_error.error) <= 500


def test_a_daemon_is_not_left_behind(sandbox):
    marker = "98765.4321"
    attack(sandbox, f"""
        import os
        def evaluate(response):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execv("/bin/sleep", ["sleep", "{marker}"])
                os._exit(0)
            return False
    """)
    assert host_processes_with(marker) == []


# -- faking a pass ----------------------------------------------------------------------------


def test_os_exit_zero_is_not_a_pass(sandbox):
    result = attack(sandbox, """
        import os
        def evaluate(response):
            os._exit(0)
    """)
    assert "exited with code 0" in result.error


def test_sys_exit_zero_is_not_a_pass(sandbox):
    result = attack(sandbox, """
        import sys
        def evaluate(response):
            sys.exit(0)
    """)
    assert "SystemExit" in result.error


def test_raising_base_exception_is_not_a_pass(sandbox):
    result = attack(sandbox, """
        def evaluate(response):
            raise BaseException("not an Exception")
    """)
    assert "BaseException" in result.error


def test_a_return_value_that_lies_is_not_a_pass(sandbox):
    result = attack(sandbox, """
        class Liar:
            def __bool__(self):
                return True
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
        def evaluate(response):
            return Liar()
    """)
    assert "not a bool" in result.error
    truthy = attack(sandbox, """
        def evaluate(response):
            return "true"
    """)
    assert truthy.result is None


def test_forged_protocol_lines_are_not_a_pass(sandbox):
    # The code's own process could write a verdict for its own input (no more than returning it); a line
    # shaped as the sandbox's reply to the host, or a verdict for another input, is out of protocol.
    result = attack(sandbox, """
        import os
        def evaluate(response):
            os.write(3, b'{"results": [[true, true, null]]}\\n{"i": 7, "result": true}\\n')
            return False
    """)
    assert result.error == "wrote output that is not a check result"


# -- escaping Python-level guards -------------------------------------------------------------


def test_ctypes_calling_libc_system_stays_inside(sandbox, tmp_path):
    marker = tmp_path / "pwned"
    attack(sandbox, f"""
        import ctypes
        def evaluate(response):
            libc = ctypes.CDLL(None)
            libc.system(b"cat /etc/passwd > /tmp/p; touch {marker}")
            return "root:" in open("/tmp/p").read()
    """)
    assert not marker.exists()


def test_the_subclasses_trick_reaches_nothing(sandbox, tmp_path):
    marker = tmp_path / "pwned"
    attack(sandbox, f"""
        def evaluate(response):
            for cls in ().__class__.__bases__[0].__subclasses__():
                if cls.__name__ == "_wrap_close":
                    system = cls.__init__.__globals__["system"]
                    return system("touch {marker}") == 0 and system("test -e {marker}") == 0
            return False
    """)
    assert not marker.exists()


def test_sys_modules_os_reaches_nothing(sandbox, tmp_path):
    marker = tmp_path / "pwned"
    attack(sandbox, f"""
        import sys
        def evaluate(response):
            os = sys.modules["os"]
            os.system("touch {marker}")
            return os.path.exists({str(marker)!r})
    """)
    assert not marker.exists()


def test_subprocess_reaches_nothing(sandbox):
    attack(sandbox, """
        import subprocess
        def evaluate(response):
            out = subprocess.run(["/bin/cat", "/etc/passwd"], capture_output=True, text=True).stdout
            return "root:" in out
    """)


def test_environment_secrets_are_not_there(sandbox):
    attack(sandbox, f"""
        import os
        def evaluate(response):
            if {SECRET!r} in repr(dict(os.environ)):
                return True
            for path in ("/proc/self/environ", "/proc/1/environ"):
                try:
                    if {SECRET!r}.encode() in open(path, "rb").read():
                        return True
                except OSError:
                    pass
            return False
    """)


def test_the_parents_proc_environ_is_not_there(sandbox):
    worker = sandbox._all[0]
    host_pids = [os.getpid(), worker.process.pid, *descendants(worker.process.pid)]
    attack(sandbox, f"""
        import os
        def evaluate(response):
            for pid in {host_pids!r} + [os.getppid()]:
                try:
                    if {SECRET!r}.encode() in open(f"/proc/{{pid}}/environ", "rb").read():
                        return True
                except OSError:
                    pass
            others = [p for p in os.listdir("/proc") if p.isdigit()]
            return len(others) > 3
    """)


def test_ptrace_of_the_parent_fails(sandbox):
    attack(sandbox, """
        import ctypes, os
        def evaluate(response):
            libc = ctypes.CDLL(None, use_errno=True)
            PTRACE_ATTACH = 16
            for pid in (os.getppid(), 1):
                if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
                    return True
                try:
                    with open(f"/proc/{pid}/mem", "r+b"):
                        return True
                except OSError:
                    pass
            return False
    """)


def test_no_capabilities_remain(sandbox):
    attack(sandbox, """
        def evaluate(response):
            status = open("/proc/self/status").read()
            caps = {line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines() if line.startswith("Cap")}
            return caps["CapEff"] != 0 or caps["CapPrm"] != 0 or caps["CapBnd"] != 0
    """)


def test_one_function_cannot_change_anothers_verdicts(sandbox):
    poison = """
        import builtins
        def evaluate(response):
            builtins.len = lambda x: 0
            builtins.isinstance = lambda *a: True
            open("/tmp/left-behind", "w").write("x")
            return False
    """
    honest = "import os\ndef evaluate(response):\n    return len(response) > 3 and not os.path.exists('/tmp/left-behind')\n"
    poisoned, after = sandbox.run_many([(textwrap.dedent(poison), ["long response"]), (honest, ["long response", "ab"])])
    assert [r.result for r in poisoned] != [True]  # it broke its own process (json needs isinstance): its own verdicts only
    assert [r.result for r in after] == [True, False]


# -- what the sandbox itself guarantees -------------------------------------------------------


def test_many_inputs_come_back_in_order_across_workers():
    with sb.Sandbox(workers=2, batch_size=100) as box:
        source = "def evaluate(response):\n    return int(response) % 3 == 0\n"
        jobs = [(source, [str(i) for i in range(k, k + 450)]) for k in (0, 1)]
        results = box.run_many(jobs)
    for k, job in zip((0, 1), results):
        assert [r.result for r in job] == [(i % 3 == 0) for i in range(k, k + 450)]


def test_a_timed_out_input_does_not_take_the_others_with_it(sandbox):
    source = "import time\ndef evaluate(response):\n    if response == 'slow':\n        time.sleep(30)\n    return response == 'yes'\n"
    results = sandbox.run(source, ["yes", "slow", "no", "yes"])
    assert [r.result for r in results] == [True, None, False, True]
    assert "timed out" in results[1].error


def test_compile_errors_are_reported_per_source(sandbox):
    errors = sandbox.compile_errors(["def evaluate(:\n", "x = 1\n", "def evaluate(r):\n    return True\n", "while True:\n    pass\n"])
    assert errors[0].startswith("SyntaxError")
    assert "no function 'evaluate'" in errors[1]
    assert errors[2] is None
    assert "over" in errors[3]  # the module itself loops: compiling took over the limit
    (result,) = sandbox.run("def evaluate(:\n", ["x"])
    assert result.error.startswith("compile: SyntaxError")


def test_without_isolation_it_refuses_and_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither bwrap nor unshare can be found
    monkeypatch.setattr(sb, "_probed", {})
    with pytest.raises(sb.SandboxUnavailable, match="apt-get install bubblewrap") as raised:
        sb.Sandbox()
    assert "--unsafe-exec" in str(raised.value)


def test_unsafe_exec_says_so_every_time(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sb, "_probed", {})
    for _ in range(2):
        with pytest.warns(UserWarning, match="WITHOUT isolation"), sb.Sandbox(workers=1, unsafe_exec=True) as box:
            assert box.run("def evaluate(r):\n    return r == 'x'\n", ["x", "y"])[0].result is True
        assert "WITHOUT isolation" in capsys.readouterr().err
