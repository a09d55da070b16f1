"""Memory per process of posttrain SFT on the zoo's ~40M model: full fine-tuning in fp32 and with bf16
weights, LoRA, and DDP vs FSDP over 2 processes.

    python benchmarks/memory.py [--steps 3] [--device cpu|cuda] [--variants fp32,bf16-weights,lora,ddp,fsdp] [--json OUT]

Each variant is a fresh process (``torchrun --nproc_per_node 2`` for ddp and fsdp) running posttrain's
own SFT loop (``posttrain.train.sft.train``) on ``small-llama`` (12 layers of width 512, 38.2M
parameters, tied embeddings) for ``--steps`` optimizer steps of 4 packed rows of 512 tokens (2 rows ×
grad_accum 2 in one process; 2 rows × 1 × 2 processes). At the first optimizer step it counts, on every
process, the bytes its tensors hold: parameters (its shards under FSDP), gradients (just before they
are freed) and the optimizer's state (after the step); and it records the process's peak memory: peak
resident set size on CPU (``ru_maxrss``, which includes the Python runtime and libraries, ~0.5 GB),
``torch.cuda.max_memory_allocated`` on CUDA. Reported per variant and process: those four figures and
the ratio of FSDP's parameter + optimizer bytes to DDP's (the target is ≤ 0.6 with 2 processes).

Not a test: run it by hand; docs/PERFORMANCE.md quotes its output. Runs on CPU (gloo) in ~2 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    # name: (processes, config changes)
    "fp32": (1, {"adapter": {"kind": "full"}}),
    "bf16-weights": (1, {"adapter": {"kind": "full"}, "model": {"dtype": "bfloat16"}}),
    "lora": (1, {"adapter": {"kind": "lora", "r": 16, "alpha": 32}}),
    "ddp": (2, {"adapter": {"kind": "full"}, "train": {"distributed": "ddp"}}),
    "fsdp": (2, {"adapter": {"kind": "full"}, "train": {"distributed": "fsdp"}}),
}
WORDS = "the quick brown fox jumps over a lazy dog while seven bright stars shine above quiet water".split()


def write_data(path: Path, n: int = 256, seed: int = 0) -> None:
    """Chat records of 80-240 words: enough text to fill 512-token rows."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 180)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")


def config(name: str, data: Path, out: Path, steps: int, device: str) -> dict:
    processes, changes = VARIANTS[name]
    cfg = {
        "model": {"name": "small-llama"},
        "data": {"path": str(data), "max_length": 512, "packing": True},
        "adapter": {"kind": "full"},
        "train": {"lr": 1e-4, "max_steps": steps, "micro_batch_size": 2, "grad_accum": 2 // processes, "bf16": False, "device": device, "log_every": 1},
        "output_dir": str(out / name),
    }
    if device == "cuda":
        cfg["train"].pop("device")  # cuda:LOCAL_RANK under torchrun
    for section, values in changes.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


# -- the worker: posttrain's SFT loop, with its first optimizer step measured -------------------


def local_bytes(t) -> int:
    """Bytes a tensor holds on this process (its shard, for an FSDP DTensor)."""
    if t is None:
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def worker(cfg_path: Path, result_dir: Path) -> None:
    import resource

    import torch

    from posttrain.config import SFTConfig, load_config
    from posttrain.train import loop, sft

    measured: dict[str, int] = {}
    real_step = loop.optimizer_step

    def measuring_step(model, optimizer, scheduler, loss, max_grad_norm, step, run_dir, rt=None):
        if not measured:
            params = [p for p in model.parameters()]
            measured["parameters"] = sum(local_bytes(p) for p in params)
            measured["trainable"] = sum(local_bytes(p) for p in params if p.requires_grad)
            measured["gradients"] = sum(local_bytes(p.grad) for p in params)
        out = real_step(model, optimizer, scheduler, loss, max_grad_norm, step, run_dir, rt)
        if "optimizer" not in measured:
            measured["optimizer"] = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        return out

    loop.optimizer_step = measuring_step
    cfg = load_config(str(cfg_path), cls=SFTConfig)
    sft.train(cfg)
    if torch.cuda.is_available() and cfg.train.device != "cpu":
        measured["peak"] = torch.cuda.max_memory_allocated()
        measured["peak_kind"] = "cuda max_memory_allocated"
    else:
        measured["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        measured["peak_kind"] = "peak RSS"
    rank = os.environ.get("RANK", "0")
    (result_dir / f"rank-{rank}.json").write_text(json.dumps(measured))


# -- the parent ---------------------------------------------------------------------------------


def run_variant(name: str, cfg: dict, work: Path) -> list[dict]:
    import yaml

    processes = VARIANTS[name][0]
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    result_dir = work / f"{name}-result"
    result_dir.mkdir(exist_ok=True)
    me = [str(Path(__file__).resolve()), "--worker", str(cfg_path), str(result_dir)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *me]  # fmt: skip
    else:
        command = [sys.executable, *me]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads((result_dir / f"rank-{r}.json").read_text()) for r in range(processes)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="posttrain-memory-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("POSTTRAIN_CACHE", str(work / "cache"))
        write_data(work / "data.jsonl")
        results = {name: run_variant(name, config(name, work / "data.jsonl", work, args.steps, args.device), work) for name in names}
    kind = next(iter(results.values()))[0]["peak_kind"]
    print(f"posttrain SFT on small-llama (38.2M parameters), {args.device}, {args.steps} steps of 4 packed rows x 512 tokens; MiB per process")
    print(f"| variant | processes | parameters | gradients | optimizer state | parameters + optimizer | {kind} |")
    print("|---|---|---|---|---|---|---|")
    for name, ranks in results.items():
        for r, m in enumerate(ranks):
            label = name if len(ranks) == 1 else f"{name} (rank {r})"
            print(f"| {label} | {len(ranks)} | {mib(m['parameters'])} | {mib(m['gradients'])} | {mib(m['optimizer'])} | {mib(m['parameters'] + m['optimizer'])} | {mib(m['peak'])} |")
    if "ddp" in results and "fsdp" in results:
        ddp = max(m["parameters"] + m["optimizer"] for m in results["ddp"])
        fsdp = max(m["parameters"] + m["optimizer"] for m in results["fsdp"])
        peak = max(m["peak"] for m in results["fsdp"]) / max(m["peak"] for m in results["ddp"])
        print(f"fsdp / ddp, parameters + optimizer per process: {fsdp / ddp:.3f} (target <= 0.6); {kind}: {peak:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
