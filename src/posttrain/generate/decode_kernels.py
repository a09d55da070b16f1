"""The fast decoder's step on x86-64 CPUs: C kernels of our own, built on first use; bf16 where the CPU has
AVX512-BF16 (``decode_kernels.c``), float32 on any (``decode_kernels_f32.c``); and the projections' products in
both (``decode_matmul.c``, :func:`matmul`).

Why our own: a decode step's attention is, per row and key/value head, a few queries against that row's
cache (SmolLM2: 3 x 64 by 64 x columns), and torch's CPU ``bmm`` runs such products one small matrix at a
time, reading the cache at a fraction of the machine's bandwidth; its fused SDPA and a ``torch.compile``d
attention were slower still (docs/PERFORMANCE.md). The kernels do each (row, key/value head) in one pass
over its columns on buffers laid out for them (:class:`~posttrain.generate.kv_blocks.KVBlocks` layouts
``"keys"`` and ``"values"``: in bf16 for AVX512-BF16's pairwise dot products, in float32 16 columns side
by side), the softmax in float32 registers and the weighted sum of values, skipping masked columns (a
short prompt's left padding) without reading them. The rest of a layer's step between the projections is a
handful of small torch ops a layer (a norm is seven, the rotary embedding and the buffers' writes as many),
so the kernels also do, each in one pass: the RMS norm, the rotary embedding of q and k with the writes of k
and v into the buffers, and silu(gate) * up; all in float32, in bf16 rounded once (torch's ops round after
each). Last, ``sampling.pick``'s work over the logits, wherever the kernels load (fast decoder or not), for bf16
and float32 logits alike (in the float32 file's vector code, so any x86-64 build has them): greedy decoding's
argmax (:func:`argmax`; torch's CPU argmax took longer than a layer's attention), temperature-only draws
(:func:`sample`) and the tokens' log-probabilities (:func:`logprobs`), each a pass or two over a row. And the
projections W @ x themselves, most of a step: torch's BLAS ran them at 0.7-0.8 of the measured matmul peak at
64 rows and far less at 2-32; :func:`matmul` streams each weight once per 64 rows with x packed in the core's cache
(decode_matmul.c says how), a row's result the same whatever rows share the step. All run on
the OpenMP threads of torch's own runtime. The float32 file is written with GCC's vector extensions, so one
source becomes AVX-512 or AVX2 code, whichever the CPU has. Figures: docs/PERFORMANCE.md
(``benchmarks/decode_profile.py --kernels-only``: whole steps at 64 and 128 rows in 0.71-0.73 of torch's
ops' time in bf16, 0.79-0.84 in float32, machine G, before the projections' kernel; with it, at 64 rows, 0.51 and
0.55, and 0.82 and 0.71 of the same kernels with torch's products).

Built with the system's C compiler (``$CC``, else ``cc``) and ``-march=native`` into
``$POSTTRAIN_CACHE/kernels/`` the first time a decode needs it (a few seconds; the fast decoder starts the build
in the background before its prompts prefill, :func:`build_soon`), keyed by the sources, the
flags and the CPU, so a cache shared between machines never hands one a library built for another. Where
there is no compiler, the machine is not x86-64 Linux, the CPU lacks AVX512-BF16 (for bf16), the head size is
not 64 or 128 or more than 8 query heads share a key/value head, the decoder uses torch's ops
(:func:`posttrain.generate.kv_blocks.attend` and the rest in ``fast.py``), which compute the same step (in
bf16 with rounding in more places). ``POSTTRAIN_CPU_KERNELS=0`` turns the kernels off (benchmarks compare
the two that way).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from posttrain.cache_root import cache_dir
from posttrain.generate.kv_blocks import PAIRED, KVBlocks

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("decode_kernels.c", "decode_kernels_f32.c", "decode_matmul.c")]  # one library
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-Wno-psabi"]  # -shared only when linking
HEAD_DIMS = (64, 128)
MAX_GROUP = 8  # query heads a key/value head may serve
DTYPES = (torch.bfloat16, torch.float32)
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
SIGNATURES = {  # each kernel's result and argument types, the same in bf16 and float32
    "posttrain_attend": (ctypes.c_int, [_P] * 5 + [_I] * 6 + [_L] * 4 + [_I]),
    "posttrain_rms_norm": (None, [_P] * 2 + [_I] * 2 + [ctypes.c_float, _I]),
    "posttrain_silu_mul": (None, [_P] * 2 + [_L, _I]),
    "posttrain_rotary_write": (None, [_P] * 6 + [_I] * 5 + [_L] * 3 + [_I]),
    "posttrain_put_columns": (None, [_P] * 5 + [_I] * 5 + [_L] * 3 + [_I]),
    "posttrain_matmul": (ctypes.c_int, [_P] * 2 + [_L] * 2 + [_P] * 2 + [_L] + [_I] * 4),  # decode_matmul.c
}


# sampling.py's kernels (decode_kernels_f32.c, so every x86-64 build has them), each for bf16 and float32 logits alike:
# posttrain_<name>_bf16 and posttrain_<name>_f32
SAMPLING = {
    "argmax": (ctypes.c_int, [_P] * 2 + [_I, _L, _I]),
    "argmax_columns": (ctypes.c_int, [_P] * 2 + [_I, _L, _I]),
    "sample": (ctypes.c_int, [_P] * 2 + [_I, _L] + [_P] * 3 + [_I]),
    "logprob": (ctypes.c_int, [_P] * 2 + [_I, _L] + [_P] * 2 + [_I]),
}

_library: ctypes.CDLL | None = None
_loaded = False
_building: threading.Thread | None = None  # build_soon()'s compiler run
_failed: set[Path] = set()  # builds that failed in this process
_scratch = threading.local()  # matmul's packed copy of x, one per thread, grown as needed
use_matmul = True  # False: matmul declines, so the decoder multiplies with torch (benchmarks compare the two)


def _scope(name: str):
    """A named scope for torch's profiler while it records (so it counts the kernels' time), else nothing (a step
    makes 120 kernel calls, and a scope costs a few microseconds)."""
    return torch.profiler.record_function(name) if torch.autograd.profiler._is_profiler_enabled else contextlib.nullcontext()


def enabled() -> bool:
    """False when ``POSTTRAIN_CPU_KERNELS=0`` is set."""
    return os.environ.get("POSTTRAIN_CPU_KERNELS", "1") != "0"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _target() -> tuple[Path, str] | None:
    """Where this machine's build of the kernels goes in the cache, and the compiler that makes it; None where the
    kernels cannot run here (not Linux on x86-64) or no compiler is found."""
    flags = _cpu_flags()
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: the decode step uses torch's ops")
        return None
    sources = [path.read_bytes() for path in SOURCES]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS).encode(), compiler.encode(), flags.encode()])).hexdigest()[:16]
    return cache_dir() / "kernels" / f"decode-{key}.so", compiler


def _compile(compiler: str, built: Path) -> str | None:
    """Compile each source apart, side by side (the cores share the work: 3.0-3.3 s on 2 cores of machine G against
    6.6 s as one command, ad-hoc), then link them into ``built``; the compiler's complaint where it fails."""
    objects = [built.with_name(f"{source.stem}.o") for source in SOURCES]
    compile_flags = [f for f in FLAGS if f != "-shared"]
    try:
        running = [
            subprocess.Popen(
                [compiler, *compile_flags, "-c", str(source), "-o", str(obj)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for source, obj in zip(SOURCES, objects)
        ]
        failed = [err for proc in running if (err := proc.communicate()[1]) is not None and proc.returncode != 0]
        if failed:
            return "\n".join(failed)
        done = subprocess.run([compiler, *FLAGS, *map(str, objects), "-o", str(built), "-lm"], check=False, capture_output=True, text=True)
    except OSError as error:  # the compiler named by $CC cannot be run
        return str(error)
    return done.stderr if done.returncode != 0 else None


def _built() -> Path | None:
    """This machine's build of the library in the cache, compiled now if none is there; None where it cannot be built."""
    target = _target()
    if target is None:
        return None
    path, compiler = target
    if path in _failed:  # reported once (build_soon()'s thread, then library(), would try the same build)
        return None
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            complaint = _compile(compiler, built)
            if complaint is not None:
                _failed.add(path)
                log.warning("building the decode kernels failed (%s); the decode step uses torch's ops:\n%s", compiler, complaint[-2000:])
                return None
            os.replace(built, path)  # atomic: a process building at the same time finds a whole file or none
        log.info("built the decode kernels in %.1f s: %s", time.perf_counter() - start, path)
    return path


def _build() -> ctypes.CDLL | None:
    """The kernels' library, compiled now if no cached build matches; None where it cannot be built or run here."""
    if _building is not None:
        _building.join()  # build_soon()'s compiler: its file, not a second build beside it
    path = _built()
    if path is None:
        return None
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:  # a damaged or foreign file in the cache: say so, keep torch's ops
        log.warning("could not load %s (%s); the decode step uses torch's ops (delete the file to rebuild it)", path, error)
        return None
    names = [f"{name}_f32" for name in SIGNATURES]
    if library.posttrain_attention_available() == 1:  # bf16's functions exist where the CPU has AVX512-BF16
        names += list(SIGNATURES)
    for name in names:
        function = getattr(library, name)
        function.restype, function.argtypes = SIGNATURES[name.removesuffix("_f32")]
    for name, signature in SAMPLING.items():
        for dtype in DTYPES:
            function = getattr(library, _sampling_name(name, dtype))
            function.restype, function.argtypes = signature
    return library


def library() -> ctypes.CDLL | None:
    """The kernels' library (built on the first call, or taken from :func:`build_soon`'s build), or None where they
    are off or cannot be used here."""
    global _library, _loaded
    if not enabled():
        return None
    if not _loaded:
        _library, _loaded = _build(), True
    return _library


def build_soon() -> None:
    """Start compiling the kernels' library into the cache in a background thread, so that the compiler runs while a
    model loads and its prompts prefill, not after (a few seconds on a fresh cache); :func:`library` waits for it and
    loads the file. Nothing where the kernels are off, loaded or already started."""
    global _building
    if not enabled() or _loaded or _building is not None:
        return
    _building = threading.Thread(target=_built, name="posttrain-decode-kernels", daemon=True)
    _building.start()


def usable(dtype: torch.dtype, device: torch.device, group: int, head_dim: int) -> bool:
    """Whether the kernels serve a decode in ``dtype`` on ``device`` with these head sizes (building them if need be):
    float32 on any x86-64 CPU, bf16 where it has AVX512-BF16."""
    if dtype not in DTYPES or device.type != "cpu" or head_dim not in HEAD_DIMS or not 1 <= group <= MAX_GROUP:
        return False
    lib = library()
    return lib is not None and (dtype == torch.float32 or lib.posttrain_attention_available() == 1)


def _sampling_name(name: str, dtype: torch.dtype) -> str:
    """The library's name of sampling kernel ``name`` for logits of ``dtype``."""
    return f"posttrain_{name}_{'bf16' if dtype == torch.bfloat16 else 'f32'}"


def _sampling_kernel(name: str, logits: torch.Tensor):
    """Sampling kernel ``name`` for ``logits``, or None where the kernels do not take them here: not 2-D, not on the CPU,
    neither bf16 nor float32, or the kernels off or not built."""
    if logits.dim() != 2 or logits.device.type != "cpu" or logits.dtype not in DTYPES or library() is None:
        return None
    return getattr(_library, _sampling_name(name, logits.dtype))


def _kernel(name: str, dtype: torch.dtype):
    """The library's ``name`` for ``dtype``: decode_kernels.c's bf16 function or decode_kernels_f32.c's."""
    if dtype not in DTYPES:
        raise ValueError(f"the decode kernels take bf16 or float32, not {dtype}")
    return getattr(_library, name if dtype == torch.bfloat16 else f"{name}_f32")


def attend(q: torch.Tensor, keys: KVBlocks, values: KVBlocks, bias: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Attention of one query per row over columns ``[0, columns)`` of the cache, as :func:`kv_blocks.attend` computes it.

    ``keys`` and ``values`` in the kernel's layouts (``KVBlocks.empty(..., "keys")``, ``"values"``);
    ``q`` (rows x kv heads, group, head dim) in the buffers' dtype (bf16 or float32), already scaled; ``bias`` the
    decoder's whole float32 mask (capacity rows, buffer columns), of which the first ``rows`` rows and ``columns``
    columns count. Returns (rows, kv heads x group x head dim) in q's dtype. Only where :func:`usable` said so."""
    batch, group, d = q.shape
    kv = batch // rows
    q = q.contiguous()
    if (keys.layout, values.layout) != PAIRED or keys.data.stride()[:3] != values.data.stride()[:3] or bias.stride(1) != 1:
        raise ValueError("the attention kernel needs keys and values in its layouts (KVBlocks 'keys', 'values') and a row-major mask")
    if keys.data.dtype not in DTYPES or q.dtype != keys.data.dtype or bias.dtype != torch.float32:
        raise ValueError(
            f"the attention kernel takes bf16 or float32 queries and keys and a float32 mask, not {q.dtype}, {keys.data.dtype} and {bias.dtype}"
        )
    out = q.new_empty((rows, kv * group * d))
    with _scope("posttrain::attention"):
        function = _kernel("posttrain_attend", q.dtype)  # loaded: the decoder asked usable() when it started
        status = function(
            q.data_ptr(),
            keys.data.data_ptr(),
            values.data.data_ptr(),
            bias.data_ptr(),
            out.data_ptr(),
            rows,
            kv,
            group,
            d,
            keys.block,
            columns,
            *keys.data.stride()[:3],  # (rows, kv heads, blocks, tile): a row's, a head's and a block's strides
            bias.stride(0),
            torch.get_num_threads(),
        )
    if status != 0:
        raise ValueError(f"the attention kernel does not take {group} queries per key/value head of {d} features")
    return out


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight of ``x`` (features, rows) down its columns, as ``fast._normed`` computes it
    (float32 inside, rounded once to bf16 for bf16; the sum of squares in another order)."""
    features, rows = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    with _scope("posttrain::rms_norm"):
        _kernel("posttrain_rms_norm", x.dtype)(x.data_ptr(), out.data_ptr(), features, rows, eps, torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` (2 x intermediate, rows), gate its first half: (intermediate, rows), in
    float32 and, for bf16, rounded once (torch's ``act(gate).mul_(up)`` rounds after each)."""
    features, rows = gate_up.shape
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty((features // 2, rows))
    with _scope("posttrain::silu_mul"):
        _kernel("posttrain_silu_mul", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), features // 2 * rows, torch.get_num_threads())
    return out


def rotary_write(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, keys: KVBlocks, values: KVBlocks, t: int
) -> torch.Tensor:
    """The rotary embedding of q and k for ``qkv`` ((heads + 2 x kv heads) x head dim, rows) in the buffers' dtype, q
    first, then k, then v; ``cos`` and ``sin`` (rows, head dim) float32. Writes k and v at column ``t`` of ``keys``
    and ``values`` (the kernel's layouts) and returns q as (rows x kv heads, group, head dim), what :func:`attend`
    takes."""
    rows = qkv.shape[1]
    kv, d = keys.kv_heads, keys.head_dim
    if qkv.dtype != keys.data.dtype or cos.dtype != torch.float32 or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError(
            f"rotary_write takes qkv in the buffers' dtype ({keys.data.dtype}, not {qkv.dtype}) and contiguous float32 cos and sin"
        )
    qkv = qkv.contiguous()
    q = qkv.new_empty((rows * kv, heads // kv, d))
    with _scope("posttrain::rotary_write"):
        _kernel("posttrain_rotary_write", qkv.dtype)(
            qkv.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            q.data_ptr(),
            keys.data.data_ptr(),
            values.data.data_ptr(),
            rows,
            heads,
            kv,
            d,
            t,
            *keys.data.stride()[:3],
            torch.get_num_threads(),
        )
    return q


def put_columns(keys: KVBlocks, values: KVBlocks, k: torch.Tensor, v: torch.Tensor, start: int, rows: torch.Tensor | None = None) -> None:
    """Columns ``[start, start + k.shape[2])`` of ``keys`` and ``values`` (the kernels' layouts) set to a prefilled
    cache's ``k`` and ``v`` (rows, kv heads, columns, head dim), as :meth:`KVBlocks.write` sets them, in one pass:
    for row ``i`` of ``k``, buffer row ``rows[i]`` (None: row ``i``)."""
    if (keys.layout, values.layout) != PAIRED or keys.data.stride()[:3] != values.data.stride()[:3]:
        raise ValueError("put_columns needs keys and values in the kernels' layouts (KVBlocks 'keys', 'values')")
    dtype = keys.data.dtype
    if k.dtype != dtype or v.dtype != dtype or k.shape != v.shape or k.shape[1] != keys.kv_heads or k.shape[3] != keys.head_dim:
        raise ValueError(f"put_columns takes k and v of one shape (rows, {keys.kv_heads}, columns, {keys.head_dim}) in {dtype}")
    n, kv, width, d = k.shape
    if start < 0 or start + width > keys.data.shape[2] * keys.block:
        raise ValueError(f"columns {start}..{start + width} are outside the buffers' {keys.data.shape[2] * keys.block}")
    index = None if rows is None else rows.to(torch.int64).contiguous()
    if index is not None and (len(index) != n or int(index.min()) < 0 or int(index.max()) >= keys.rows):
        raise ValueError(f"put_columns: {len(index)} row numbers for {n} rows, each within the buffers' {keys.rows}")
    if index is None and n > keys.rows:
        raise ValueError(f"put_columns: {n} rows for buffers of {keys.rows}")
    k, v = k.contiguous(), v.contiguous()
    with _scope("posttrain::put_columns"):
        _kernel("posttrain_put_columns", dtype)(
            k.data_ptr(),
            v.data_ptr(),
            keys.data.data_ptr(),
            values.data.data_ptr(),
            None if index is None else index.data_ptr(),
            n,
            kv,
            width,
            d,
            start,
            *keys.data.stride()[:3],
            torch.get_num_threads(),
        )


def argmax(logits: torch.Tensor) -> torch.Tensor | None:
    """Each row's ``logits.argmax(-1)`` for ``logits`` (rows, vocabulary) in bf16 or float32 on the CPU, the first index
    where several tie, in one pass over them (torch's argmax: 2.6 ms over 64 rows of SmolLM2's 49k float32 logits,
    and a float32 copy first for bf16; ad-hoc timing, machine G); None where the kernels are off or do not take these
    logits here, or a row holds a NaN (torch's argmax decides those). ``logits`` may be the transpose of a contiguous
    (vocabulary, rows) product, as the fast decoder's vocabulary projection gives it: read in place, not copied."""
    rows, n = logits.shape if logits.dim() == 2 else (0, 0)
    columns = rows > 1 and not logits.is_contiguous() and logits.T.is_contiguous()
    function = _sampling_kernel("argmax_columns" if columns else "argmax", logits)
    if function is None:
        return None
    logits = logits if columns else logits.contiguous()
    out = torch.empty(rows, dtype=torch.int64)
    with _scope("posttrain::argmax"):
        status = function(logits.data_ptr(), out.data_ptr(), rows, n, torch.get_num_threads())
    return out if status == 0 else None


def sample(logits: torch.Tensor, rows: list[int], temperatures: list[float], uniforms: torch.Tensor) -> torch.Tensor | None:
    """The tokens ``sampling.choose`` draws for rows ``rows`` of ``logits`` (rows, vocabulary; bf16 or float32, CPU) at
    ``temperatures`` with no top-k or top-p, from ``uniforms`` (float64 in [0, 1), one a row): the first token whose
    running sum of ``e^(x / t - max)`` passes ``u`` times their total. The same distribution as torch's path, which
    normalises float32 probabilities and sums them in float64 (a draw within float rounding of a boundary may land
    on the neighbouring token); no float32 or float64 copy of the logits (torch's path took 48 ms for 128 rows of
    SmolLM2's 49k logits, this about 5; ad-hoc timings, machine G). None where the kernels are off here or a row holds
    a NaN, +inf or only -inf."""
    function = _sampling_kernel("sample", logits)
    if function is None:
        return None
    if len(temperatures) != len(rows) or uniforms.shape != (len(rows),) or any(t <= 0 for t in temperatures):
        raise ValueError(f"sample: one positive temperature and one uniform number for each of the {len(rows)} rows")
    logits = logits.contiguous()
    which = torch.tensor(rows, dtype=torch.int64)
    t = torch.tensor(temperatures, dtype=torch.float32)
    u = uniforms.to(torch.float64).contiguous()
    out = torch.empty(len(rows), dtype=torch.int64)
    with _scope("posttrain::sample"):
        status = function(
            logits.data_ptr(),
            which.data_ptr(),
            len(rows),
            logits.shape[1],
            t.data_ptr(),
            u.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
    return out if status == 0 else None


def logprobs(logits: torch.Tensor, rows: list[int], tokens: torch.Tensor) -> torch.Tensor | None:
    """The log-probability (float32) of ``tokens[i]`` under the softmax of row ``rows[i]`` of ``logits`` (bf16 or float32,
    CPU), as ``sampling.pick`` reports it (``logits.float().log_softmax(-1)`` at the token; here the exponentials are
    summed in float64), one pass over each row; None where the kernels are off here or a row holds a NaN, +inf or
    only -inf."""
    function = _sampling_kernel("logprob", logits)
    if function is None:
        return None
    if tokens.shape != (len(rows),):
        raise ValueError(f"logprobs: one token for each of the {len(rows)} rows, not {tuple(tokens.shape)}")
    logits = logits.contiguous()
    which = torch.tensor(rows, dtype=torch.int64)
    at = tokens.to(torch.int64).contiguous()
    if len(rows) and (int(at.min()) < 0 or int(at.max()) >= logits.shape[1]):
        raise ValueError(f"logprobs: tokens outside the vocabulary of {logits.shape[1]}")
    out = torch.empty(len(rows), dtype=torch.float32)
    with _scope("posttrain::logprobs"):
        status = function(
            logits.data_ptr(), which.data_ptr(), len(rows), logits.shape[1], at.data_ptr(), out.data_ptr(), torch.get_num_threads()
        )
    return out if status == 0 else None


def matmul(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``weight @ x`` for ``weight`` (n, k) and ``x`` (k, rows), both bf16 (on a CPU with AVX512-BF16) or both float32,
    into ``out`` (n, rows; its rows may be a slice of a wider tensor) if given (decode_matmul.c): float32 sums, for
    bf16 rounded once as torch's product rounds them, over k in an order that does not depend on the number of rows.
    None where the kernel does not take these here: the kernels off or not built, another dtype, bf16 without
    AVX512-BF16, an odd k in bf16, a weight that is not contiguous; the caller then uses torch's product. Faster than
    torch's at every row count measured, 1 to 128, so every decode step takes it: a step's 121 products of SmolLM2
    took 1/1.35 to 1/1.64 of torch.mm's time at 1-32 rows in bf16 and 1/1.12 to 1/1.20 at 64-128, in float32 1/1.27
    to 1/2.63 (``benchmarks/decode_profile.py --projections``, machine G in docs/PERFORMANCE.md)."""
    n, k = weight.shape
    rows = x.shape[1]
    dtype = x.dtype
    if (
        not use_matmul
        or dtype not in DTYPES
        or weight.dtype != dtype
        or (k % 2 and dtype == torch.bfloat16)
        or x.shape[0] != k
        or weight.device.type != "cpu"
        or x.device.type != "cpu"
        or not weight.is_contiguous()
        or library() is None
        or (dtype == torch.bfloat16 and _library.posttrain_attention_available() != 1)
    ):
        return None
    if out is None:
        out = weight.new_empty((n, rows))
    elif out.shape != (n, rows) or out.dtype != dtype or out.stride(1) != 1:
        raise ValueError(f"matmul: out must be {dtype} ({n}, {rows}) with its rows contiguous, not {out.dtype} {tuple(out.shape)}")
    need = k * ((rows + 15) // 16 * 16)
    scratch = getattr(_scratch, str(dtype), None)
    if scratch is None or scratch.numel() < need:
        scratch = torch.empty(need, dtype=dtype)
        setattr(_scratch, str(dtype), scratch)
    with _scope("posttrain::matmul"):
        status = _kernel("posttrain_matmul", dtype)(
            weight.data_ptr(),
            x.data_ptr(),
            x.stride(0),
            x.stride(1),
            scratch.data_ptr(),
            out.data_ptr(),
            out.stride(0),
            n,
            k,
            rows,
            torch.get_num_threads(),
        )
    return out if status == 0 else None
