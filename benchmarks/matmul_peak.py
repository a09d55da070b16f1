"""This machine's matmul peak, fp32 and bf16: the denominator of model-FLOPs utilisation (MFU).

    python benchmarks/matmul_peak.py [--quick] [--threads N] [--seconds 0.25] [--repeats 5]

Times ``torch.matmul`` on square matrices (1024…3072) and on the shapes a training step of
``benchmarks/sft_vs_trl.py --model small`` runs (4,096 tokens = 8 rows of 512, hidden 512, MLP 1,376,
vocabulary 8,000; forward ``x @ Wᵀ``, input gradient ``dy @ W`` and weight gradient ``dyᵀ @ x``), in fp32
and in bf16 (both operands bf16, as autocast gives them). Each shape is warmed up, then timed
``--repeats`` times for at least ``--seconds`` each; its figure is the median of those repeats, 2·M·K·N
FLOPs per matmul. A dtype's peak is its best shape: the most this machine's matmul library (oneDNN /
MKL through torch) delivers, which is what an MFU figure should be measured against on a CPU, whose
datasheet peak is rarely reachable and depends on clocks the VM does not show.

``--quick`` (about 15 s): fewer shapes, 3 repeats of 0.15 s. The last line is ``bf16_peak_gflops=<n>``.
``measure`` is imported by sft_vs_trl.py, which measures the peak in the same invocation as its runs.
Not a test: run it by hand; under load from other processes the figures drop.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# (name, M, K, N, layout): C[M,N] = A[M,K] @ B[K,N]; "nt": B is stored [N,K] and used transposed (nn.Linear's
# forward, x @ Wᵀ); "nn": plain; "tn": A is stored [K,M] and used transposed (the weight gradient dyᵀ @ x).
SQUARE = [(f"square {n}", n, n, n, "nn") for n in (1024, 2048, 3072)]
TOKENS, HIDDEN, MLP, VOCAB = 4096, 512, 1376, 8000
TRAINING = [
    ("fwd qkvo x@Wᵀ", TOKENS, HIDDEN, HIDDEN, "nt"),
    ("fwd up/gate x@Wᵀ", TOKENS, HIDDEN, MLP, "nt"),
    ("fwd down x@Wᵀ", TOKENS, MLP, HIDDEN, "nt"),
    ("fwd lm head x@Wᵀ", TOKENS, HIDDEN, VOCAB, "nt"),
    ("dgrad up/gate dy@W", TOKENS, MLP, HIDDEN, "nn"),
    ("wgrad up/gate dyᵀ@x", MLP, TOKENS, HIDDEN, "tn"),
    ("wgrad down dyᵀ@x", HIDDEN, TOKENS, MLP, "tn"),
]
QUICK = [SQUARE[1], TRAINING[1], TRAINING[2], TRAINING[5]]


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _operands(m: int, k: int, n: int, layout: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(k, m, generator=g).to(dtype).t() if layout == "tn" else torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, k, generator=g).to(dtype).t() if layout == "nt" else torch.randn(k, n, generator=g).to(dtype)
    return a, b


def time_shape(m: int, k: int, n: int, layout: str, dtype: torch.dtype, *, seconds: float, repeats: int) -> float:
    """Median GFLOP/s of ``a @ b`` over ``repeats`` timed windows of at least ``seconds`` each (after warm-up)."""
    # A probe on a slice of the rows first: bf16 on a CPU without bf16 instructions can run some shapes at
    # < 1 GFLOP/s (a 2048³ call then takes a minute); such a shape is far from the peak, and the slice's
    # rate stands for it rather than minutes of warm-ups and timed windows.
    rows = max(64, m // 16)
    a, b = _operands(rows, k, n, layout, dtype)
    torch.matmul(a, b)
    t0 = time.perf_counter()
    torch.matmul(a, b)
    probe = time.perf_counter() - t0
    if probe * m / rows > 2 * seconds:
        return 2 * rows * k * n / probe / 1e9
    a, b = _operands(m, k, n, layout, dtype)
    out = torch.empty(m, n, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    rates = []
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            torch.matmul(a, b, out=out)
            calls += 1
        rates.append(2 * m * k * n * calls / elapsed / 1e9)
    return statistics.median(rates)


def measure(
    dtype: torch.dtype, *, quick: bool = False, threads: int | None = None, seconds: float | None = None, repeats: int | None = None
) -> dict:
    """``{"peak_gflops": best shape's median, "shape": its name, "shapes": {name: GFLOP/s}}`` for ``dtype``."""
    seconds = seconds if seconds is not None else (0.15 if quick else 0.25)
    repeats = repeats if repeats is not None else (3 if quick else 5)
    shapes = QUICK if quick else SQUARE + TRAINING
    with _threads(threads), torch.no_grad():
        rates = {name: time_shape(m, k, n, layout, dtype, seconds=seconds, repeats=repeats) for name, m, k, n, layout in shapes}
    best = max(rates, key=rates.get)
    return {"peak_gflops": rates[best], "shape": best, "shapes": rates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="about 15 s: 4 shapes, 3 repeats of 0.15 s")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--seconds", type=float, default=None, help="minimum length of one timed window")
    ap.add_argument("--repeats", type=int, default=None, help="timed windows per shape (the median is kept)")
    args = ap.parse_args()
    results = {
        name: measure(dtype, quick=args.quick, threads=args.threads, seconds=args.seconds, repeats=args.repeats)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(f"matmul GFLOP/s, torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, {args.threads} threads")
    print(f"{'shape':<22}{'M×K×N':>18}{'fp32':>9}{'bf16':>9}")
    for name, m, k, n, _ in QUICK if args.quick else SQUARE + TRAINING:
        print(f"{name:<22}{f'{m}×{k}×{n}':>18}{results['fp32']['shapes'][name]:>9,.0f}{results['bf16']['shapes'][name]:>9,.0f}")
    for name, r in results.items():
        print(f"{name} peak: {r['peak_gflops']:,.0f} GFLOP/s ({r['shape']})")
    print(f"fp32_peak_gflops={results['fp32']['peak_gflops']:.0f}")
    print(f"bf16_peak_gflops={results['bf16']['peak_gflops']:.0f}")


if __name__ == "__main__":
    main()
