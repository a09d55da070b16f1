"""The LM head's log-probs on CPU: logits in cache-sized pieces against ``chunk`` rows at a time.

    python benchmarks/lm_head.py [--shapes 3268x512x8000,1024x576x49152] [--precisions bf16,fp32] [--rounds 5]

``posttrain.train.losses._LinearTargetLogps`` (every loop's log p of the trained tokens) forward and backward,
both ways on the same data, alternating, the fastest of ``--rounds``: *pieces* (CPU's default: the forward takes
rows and the backward vocabulary slices sized so each piece's fp32 logits are ``CPU_CHUNK_BYTES``) and *rows*
(``chunk`` = 2048 rows at a time both ways, what CUDA runs). A shape is trained positions x hidden x vocabulary:
the defaults are the SFT benchmark's ~40M model (8 packed rows of 512, 80% trained) and SmolLM2-135M with 1,024
trained positions (a DPO micro-batch of the demo). GFLOP/s counts the matmuls: 2·N·d·V forward, 3x that backward
(the logits again, then the gradients of h and W). bf16 runs under autocast, as training does, and only where
the CPU has native bf16. Not a test: run it by hand, with nothing else running.
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import torch

from posttrain.config import native_bf16
from posttrain.train import losses


def timed(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, bf16: bool) -> tuple[float, float, list[torch.Tensor]]:
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        start = time.perf_counter()
        out = losses._LinearTargetLogps.apply(h, w, None, y, 2048)
        middle = time.perf_counter()
    (out * torch.linspace(-1, 1, out.shape[0])).sum().backward()
    end = time.perf_counter()
    return middle - start, end - middle, [out.detach(), h.grad, w.grad]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="3268x512x8000,1024x576x49152", help="trained positions x hidden x vocabulary, comma-separated")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    precisions = [p for p in args.precisions.split(",") if p != "bf16" or native_bf16("cpu")]
    print(f"{torch.get_num_threads()} torch threads, CPU_CHUNK_BYTES {losses.CPU_CHUNK_BYTES >> 20} MiB; {date.today()}")
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        n, d, vocab = (int(x) for x in shape.split("x"))
        h = (torch.randn(n, d, generator=gen) * 2).requires_grad_()
        w = (torch.randn(vocab, d, generator=gen) * 0.05).requires_grad_()
        y = torch.randint(0, vocab, (n,), generator=gen)
        flops = 2 * n * d * vocab
        for precision in precisions:
            best = {name: [float("inf"), float("inf")] for name in ("pieces", "rows")}
            results = {}
            for _ in range(args.rounds):
                for name in best:
                    losses.CPU_PIECES = name == "pieces"
                    fwd, bwd, results[name] = timed(h, w, y, precision == "bf16")
                    best[name] = [min(best[name][0], fwd), min(best[name][1], bwd)]
            losses.CPU_PIECES = True
            tol = 2e-2 if precision == "bf16" else 1e-4
            same = all(torch.allclose(a, b, atol=tol, rtol=tol) for a, b in zip(results["pieces"], results["rows"]))
            cells = []
            for name, (fwd, bwd) in best.items():
                cells.append(
                    f"{name} fwd {fwd * 1e3:.0f} ms ({flops / fwd / 1e9:.0f} GFLOP/s), bwd {bwd * 1e3:.0f} ms ({3 * flops / bwd / 1e9:.0f})"
                )
            ratio = sum(best["rows"]) / sum(best["pieces"])
            print(f"  {precision} N={n} d={d} V={vocab}: {'; '.join(cells)}; rows/pieces {ratio:.2f}x; agree: {same}", flush=True)


if __name__ == "__main__":
    main()
