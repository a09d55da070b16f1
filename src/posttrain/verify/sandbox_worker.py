"""The process that runs inside the sandbox: it forks one child per batch of checks and runs untrusted code only there.

This file is not imported by posttrain: :mod:`posttrain.verify.sandbox` sends its source to the sandboxed
interpreter (``python -I -S -B -c SOURCE MODE CONFIG``), so it uses the standard library only and must
not import anything of the repository (which the sandbox cannot see).

Roles (the untrusted code never runs in this process):

* **this process** (pid 1 of the sandbox's own pid namespace, so no process inside can kill it; made
  non-dumpable, so none can ptrace it or read its memory or file descriptors through /proc) reads
  requests from stdin, one JSON line each: ``{"source", "entry", "inputs", "timeout"}``, and answers
  one JSON line: ``{"compile_error": ..., "results": [[ok, result, error], ...]}``;
* **a child per request** (forked from here, in its own session, stdin/stdout/stderr on /dev/null,
  rlimits on CPU seconds, address space, processes, open files, file size and core dumps) compiles the
  source once, then calls ``entry(input)`` on each input and writes one short line per input to a pipe
  (batched; see the child's section). Only a result that *is* ``True`` or ``False`` is a verdict; anything else (a lying ``__bool__``, the
  string ``"true"``) is an error. Every exception, ``SystemExit`` and ``KeyboardInterrupt`` included,
  is an error for that input alone.

This process gives each input ``timeout`` seconds of wall-clock time (the child's CPU rlimit backs it
up): past it, or when the child dies, or writes anything but the next expected line, the child's
session is killed, the input that was running gets its error, and a new child takes the rest (the
inputs whose results had not come back yet included). After every child, every
other process in the namespace is killed (daemons and fork bombs included) and the scratch directory
emptied, so nothing one check leaves behind meets the next.

``MODE`` ``confine`` (the ``unshare`` fallback; bubblewrap does the same from outside) first builds the
file system: a new root with the interpreter's prefix and the system libraries read-only, /dev's
harmless devices, a procfs of the new pid namespace, a size-limited tmpfs at /tmp; then chroots into it
and drops every capability for good (bounding set, ambient, effective/permitted, no_new_privs).
"""

import ctypes
import json
import mmap
import os
import resource
import select
import signal
import struct
import sys
import time

PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 4, 24, 28, 38, 47
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_NOATIME, MS_NODIRATIME = 1, 2, 4, 8, 32, 1024, 2048
MS_BIND, MS_REC, MS_RELATIME = 4096, 16384, 1 << 21
ERROR_CHARS = 400  # an error message is cut to this many characters
RESULT_FD = 3  # the child's results go to this descriptor

_libc = ctypes.CDLL(None, use_errno=True)


def _check(code, what):
    if code != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


# -- confinement (the unshare fallback) ---------------------------------------------------------


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _locked_flags(path):
    """The mount flags of ``path`` that a remount inside a user namespace must keep."""
    st = os.statvfs(path).f_flag
    flags = 0
    for st_bit, ms_bit in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
                           (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):  # fmt: skip
        if st & st_bit:
            flags |= ms_bit
    return flags


def _bind(source, target, read_only=True):
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(source))


def _drop_capabilities():
    # SECBIT_NOROOT(_LOCKED), NO_SETUID_FIXUP(_LOCKED), KEEP_CAPS_LOCKED: uid 0 gains nothing by exec
    _check(_libc.prctl(PR_SET_SECUREBITS, 0x2F, 0, 0, 0), "securebits")
    for cap in range(64):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # past the last capability the kernel knows: EINVAL, fine
    _libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3, all sets empty
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    with open("/proc/self/status") as status:
        effective = next(line.split()[1] for line in status if line.startswith("CapEff:"))
    if int(effective, 16) != 0:
        raise OSError(f"capabilities remain after dropping them: CapEff {effective}")


def confine(config):
    """Build the sandbox's file system, chroot into it and drop every capability (runs as root of a new user namespace)."""
    root = "/tmp"  # this mount namespace's own tmpfs over /tmp becomes the new root's skeleton
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path in config["read_only"]:
        _bind(path, root + path)
    for path, target in config["symlinks"].items():
        os.symlink(target, root + path)
    for name in ("null", "zero", "full", "random", "urandom"):
        _bind("/dev/" + name, root + "/dev/" + name, read_only=False)
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + "/tmp")
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={config['scratch_mb']}m,mode=1777")
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    os.chroot(".")
    os.chdir("/tmp")
    _drop_capabilities()


# -- the child's seccomp filter -----------------------------------------------------------------

# Root outside the sandbox is exempt from RLIMIT_NPROC (the kernel checks the real uid of the user
# namespace's owner), so processes are refused by a seccomp filter too: no new processes (threads are
# allowed, bounded by the address-space limit), no ptrace, no new namespaces or mounts, no kernel
# keyring, BPF or perf. Syscall numbers per architecture; elsewhere the rlimits alone apply.
_ARCH = {  # machine: (AUDIT_ARCH, clone, clone3, denied syscalls)
    "x86_64": (0xC000003E, 56, 435, (57, 58, 101, 310, 311, 272, 308, 165, 166, 155, 161, 321, 298, 250, 248, 249, 323, 425, 246, 320)),
    "aarch64": (0xC00000B7, 220, 435, (117, 270, 271, 97, 268, 40, 39, 41, 51, 280, 241, 219, 217, 218, 282, 425, 104, 294)),
}
CLONE_THREAD, EPERM, ENOSYS = 0x10000, 1, 38
RET_ALLOW, RET_ERRNO, RET_KILL = 0x7FFF0000, 0x00050000, 0x80000000


def _seccomp_program():
    """The filter as (code, jt, jf, k) rows, or None on an architecture without a table."""
    machine = os.uname().machine
    if machine not in _ARCH:
        return None
    arch, clone, clone3, denied = _ARCH[machine]
    rows, jumps = [], []  # jumps: (row index, label if true, label if false)

    def op(code, k, true=None, false=None):
        jumps.append((len(rows), true, false))
        rows.append([code, 0, 0, k])

    op(0x20, 4)  # load the architecture
    op(0x15, arch, None, "kill")
    op(0x20, 0)  # load the syscall number
    if machine == "x86_64":
        op(0x35, 0x40000000, "deny")  # the x32 ABI's numbers
    for number in denied:
        op(0x15, number, "deny")
    op(0x15, clone3, "nosys")  # glibc then falls back to clone, whose flags can be read
    op(0x15, clone, "clone")
    labels = {}
    op(0x06, RET_ALLOW)
    labels["clone"] = len(rows)
    op(0x20, 16)  # low word of clone's flags
    op(0x45, CLONE_THREAD, "allow", "deny")
    labels["allow"] = len(rows)
    op(0x06, RET_ALLOW)
    labels["deny"] = len(rows)
    op(0x06, RET_ERRNO | EPERM)
    labels["nosys"] = len(rows)
    op(0x06, RET_ERRNO | ENOSYS)
    labels["kill"] = len(rows)
    op(0x06, RET_KILL)
    for index, true, false in jumps:
        if true is not None:
            rows[index][1] = labels[true] - index - 1
        if false is not None:
            rows[index][2] = labels[false] - index - 1
    return rows


def _install_seccomp():
    rows = _seccomp_program()
    if rows is None:
        return

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(rows))(*[Filter(*row) for row in rows])
    program = Program(len(rows), filters)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.prctl(22, 2, ctypes.byref(program), 0, 0), "seccomp")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


# -- the child: untrusted code ------------------------------------------------------------------

# The child writes one line per input, in the order given: b"T" (returned True), b"F" (False) or b"E" and
# a JSON string (the error); before that one line, b"R" (compiled) or b"C" and a JSON string (why not).
# Lines are written in batches (every FLUSH_EVERY results or FLUSH_S seconds), so a check costs no
# system call of its own; which input is running, and since when, the child keeps in a page shared with
# this process (PROGRESS), so a timeout or a crash is charged to the input that caused it and the
# inputs whose results were still in the child's buffer are run again.
FLUSH_EVERY, FLUSH_S = 512, 0.01
PROGRESS = struct.Struct("<qd")  # the index of the input being checked (-1: compiling), and when it started


def _describe(error):
    try:
        name = type(error).__name__
        text = str(error)
    except BaseException:  # a lying __str__ or __name__
        return "an exception that cannot be shown"
    text = f"{name}: {text}" if text else name
    return text[:ERROR_CHARS]


def _child(source, entry, inputs, indices, progress, limits, seccomp):
    """Compile ``source`` and check ``inputs[i]`` for each of ``indices``; never returns."""
    try:
        os.setsid()
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(RESULT_FD + 1, 4096)
        for kind, value in limits.items():
            resource.setrlimit(getattr(resource, kind), (value, value))
        if seccomp:
            _install_seccomp()
        write, dumps, now, pack, true, false = os.write, json.dumps, time.monotonic, PROGRESS.pack_into, True, False
        namespace = {"__name__": "__sandboxed__"}
        try:
            exec(compile(source, "<function>", "exec"), namespace)
            function = namespace.get(entry)
            if not callable(function):
                raise NameError(f"the code defines no function {entry!r}")
        except BaseException as error:
            write(RESULT_FD, b"C" + dumps(_describe(error)).encode() + b"\n")
            return
        write(RESULT_FD, b"R\n")
        out, flushed = [], now()
        for index in indices:
            started = now()
            if out and (len(out) >= FLUSH_EVERY or started - flushed >= FLUSH_S):
                write(RESULT_FD, b"\n".join(out) + b"\n")
                out, flushed = [], started
            pack(progress, 0, index, started)
            try:
                value = function(inputs[index])
                if value is true:
                    out.append(b"T")
                elif value is false:
                    out.append(b"F")
                else:
                    out.append(b"E" + dumps(f"{entry} returned {_describe_type(value)}, not a bool").encode())
            except BaseException as error:
                out.append(b"E" + dumps(_describe(error)).encode())
        if out:
            write(RESULT_FD, b"\n".join(out) + b"\n")
    finally:
        os._exit(0)


def _describe_type(value):
    try:
        return type(value).__name__[:80]
    except BaseException:
        return "an object"


# -- this process -------------------------------------------------------------------------------


class _Lines:
    """Lines from a pipe, within deadlines and under a size cap per line."""

    def __init__(self, fd, cap):
        self.fd, self.cap, self.partial, self.ready = fd, cap, b"", []

    def wait(self, seconds):
        """Read what has come within ``seconds``: ``"lines"`` (some are ready), ``"quiet"``, ``"eof"`` or ``"too long"``."""
        if self.ready:
            return "lines"
        if not select.select([self.fd], [], [], max(seconds, 0))[0]:
            return "quiet"
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            return "eof"
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        if len(self.partial) > self.cap or any(len(line) > self.cap for line in lines):
            return "too long"
        self.ready.extend(lines)
        return "lines" if lines else "quiet"

    def take(self):
        lines, self.ready = self.ready, []
        return lines


def _now():
    return time.monotonic()


def _clean_up(child, own_namespace):
    """Kill the child's session and, in the sandbox's own pid namespace, every other process; reap; empty the scratch directory."""
    try:
        os.killpg(child, signal.SIGKILL)
    except OSError:
        pass
    if own_namespace:
        for _ in range(100):
            others = [int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) != 1]
            if not others:
                break
            for pid in others:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            _reap(block=True)
        _empty("/tmp")
    else:
        try:
            os.waitpid(child, 0)
        except ChildProcessError:
            pass


def _reap(block):
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _empty(directory):
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                _empty(path)
                os.rmdir(path)
            else:
                os.unlink(path)
        except OSError:
            pass


def _exit_reason(child):
    """Why the child closed its output: how it ended (waited for up to a second; one still running is killed)."""
    deadline = _now() + 1.0
    while True:
        try:
            pid, status = os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            return "the check's process is gone"
        if pid:
            break
        if _now() > deadline:
            return "closed its output and kept running"
        time.sleep(0.001)
    if status and os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)} before returning"
    return "exited before returning"


def _result(line):
    """A result line as ``[ok, result, error]``, or None when it is not one."""
    if line == b"T":
        return [True, True, None]
    if line == b"F":
        return [True, False, None]
    if line[:1] == b"E":
        try:
            error = json.loads(line[1:])
        except ValueError:
            return None
        return [False, None, error[:ERROR_CHARS]] if isinstance(error, str) else None
    return None


def _run_child(request, config, own_namespace, indices, progress, results):
    """Fork a child for ``indices``; fill ``results``; return (the indices still to run, a compile error or None)."""
    source, entry, inputs, timeout = request["source"], request.get("entry", "evaluate"), request["inputs"], float(request["timeout"])
    limits = dict(config["rlimits"], RLIMIT_CPU=int(timeout * (len(indices) + 1)) + 1)
    PROGRESS.pack_into(progress, 0, -1, _now())
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        os.dup2(write, RESULT_FD)
        _child(source, entry, inputs, indices, progress, limits, config.get("seccomp", True))
    os.close(write)
    lines, done, compiled, failure, culprit = _Lines(read, config["line_bytes"]), 0, False, None, None
    try:
        while done < len(indices) or not compiled:
            running, started = PROGRESS.unpack_from(progress, 0)
            state = lines.wait(started + timeout - _now())
            if state == "quiet":
                running_now, started_now = PROGRESS.unpack_from(progress, 0)
                if (running_now, started_now) == (running, started) and _now() >= started + timeout:
                    failure = f"timed out after {timeout:g} s" if compiled else f"compiling took over {timeout:g} s"
                    culprit = running if compiled else None
                    break
                continue
            if state in ("eof", "too long"):
                failure = _exit_reason(child) if state == "eof" else f"wrote more than {config['line_bytes']} bytes of output"
                culprit = PROGRESS.unpack_from(progress, 0)[0] if compiled else None
                break
            for line in lines.take():
                if not compiled:
                    if line == b"R":
                        compiled = True
                        continue
                    try:
                        error = json.loads(line[1:]) if line[:1] == b"C" else None
                    except ValueError:
                        error = None
                    return [], (error[:ERROR_CHARS] if isinstance(error, str) else "wrote output that is not a check result")
                result = _result(line) if done < len(indices) else None
                if result is None:
                    failure, culprit = "wrote output that is not a check result", indices[min(done, len(indices) - 1)]
                    break
                results[indices[done]] = result
                done += 1
            if failure:
                break
    finally:
        os.close(read)
        _clean_up(child, own_namespace)
    if failure is None:
        return [], None
    if not compiled:
        return [], failure
    if culprit not in indices[done:]:  # a forged progress page: charge the next input without a result
        culprit = indices[done] if done < len(indices) else None
    if culprit is not None:
        results[culprit] = [False, None, failure]
    return [i for i in indices[done:] if i != culprit], None


def handle(request, config, own_namespace, progress):
    inputs = request["inputs"]
    results = [None] * len(inputs)
    pending, compile_error = list(range(len(inputs))), None
    while True:
        pending, compile_error = _run_child(request, config, own_namespace, pending, progress, results)
        if compile_error is not None or not pending:
            break
    if compile_error is not None:
        results = [[False, None, "compile: " + compile_error] if r is None else r for r in results]
    return {"compile_error": compile_error, "results": results}


def main():
    mode, config = sys.argv[1], json.loads(sys.argv[2])
    if mode == "confine":
        confine(config)
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
    own_namespace = os.getpid() == 1  # only then may every other process be killed: they are all the checks'
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    progress = mmap.mmap(-1, PROGRESS.size)  # anonymous and shared: the children write it, this process reads it
    stdout.write(b'{"ready": true}\n')
    stdout.flush()
    for line in stdin:
        reply = handle(json.loads(line), config, own_namespace, progress)
        stdout.write(json.dumps(reply).encode() + b"\n")
        stdout.flush()
        _reap(block=False)


if __name__ == "__main__":
    main()
