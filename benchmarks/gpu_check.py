"""The checks of ``benchmarks/gpu_check.sh``: posttrain's GPU-only code paths, run for real, one line each.

    python benchmarks/gpu_check.py [--cpu] [--out DIR] [--only NAME,...]

Each check runs posttrain the way a user does (its CLI, in a subprocess; torchrun for the distributed
ones) on the zoo's models: ``small-llama`` (38.2M parameters) on a GPU, ``tiny-llama`` with ``--cpu``,
with data the script writes itself (no hub, no network, nothing from ../shared). Printed per check:
``CHECK <name> ok|FAIL|skip  <figure>``, where the figure is read from the run's own ``metrics.jsonl``
or output. ``--cpu`` runs every check that a CPU can (the CUDA-only ones, QLoRA and the NCCL device
check, say ``skip``), small enough for CI. Exit status 1 if any check failed.

Checks:
  env           torch, CUDA device, bf16, posttrain's version
  sft-lora      LoRA SFT, bf16 autocast, packed rows           tokens/s, loss first → last, peak memory
  sft-full      full SFT, bf16 autocast                        tokens/s, loss, peak memory
  sft-bf16w     full SFT with bf16 weights (model.dtype)       tokens/s, loss, peak memory
  sft-wegeft    WeGeFT SFT (r 64), bf16 autocast               tokens/s, loss, peak memory
  qlora         LoRA on a 4-bit NF4 base (CUDA, bitsandbytes)  tokens/s, loss, peak memory
  dpo           DPO (LoRA), bf16                               pairs/s, accuracy, loss
  grpo          GRPO, verifier rewards                         s/step, mean reward
  demo          posttrain demo --quick                         seconds, stages
  decoders      greedy generation, fast decoder vs forward     tokens/s of each, sequences that agree
  steer         steering + InstABoost, fast decoder vs forward tokens/s of each, sequences that agree
  serve         posttrain serve (+ the sft-lora run as adapter) errors, aggregate tokens/s, latency; greedy vs the engine
  fsdp          SFT under torchrun, train.distributed fsdp     tokens/s, loss; every collective on the group's device
  ddp-kto       DPO (KTO) under torchrun, DDP                  loss; every collective on the group's device
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "collective_probe.py"
COLORS = {"apple": "red", "banana": "yellow", "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "plum": "purple", "lemon": "yellow"}


def write_chats(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            obj = rng.choice(sorted(COLORS))
            reps = rng.randint(1, 12)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join([f"What color is the {obj}?"] * reps)},
                {"role": "assistant", "content": " ".join([f"The {obj} is {COLORS[obj]}."] * reps)},
            ]}) + "\n")  # fmt: skip
    return path


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    colors = sorted(set(COLORS.values()))
    with path.open("w") as f:
        for _ in range(n):
            obj = rng.choice(sorted(COLORS))
            wrong = rng.choice([c for c in colors if c != COLORS[obj]])
            f.write(json.dumps({
                "prompt": [{"role": "user", "content": f"What color is the {obj}?"}],
                "chosen": [{"role": "assistant", "content": f"The {obj} is {COLORS[obj]}."}],
                "rejected": [{"role": "assistant", "content": f"The {obj} is {wrong}."}],
            }) + "\n")  # fmt: skip
    return path


def write_ifeval_prompts(path: Path, n: int) -> Path:
    queries = ["What color is the sky?", "Write a poem about the sea.", "Give me three tips for staying healthy.", "Tell me about Paris."]
    with path.open("w") as f:
        for key in range(n):
            kwargs = [{"letter": "e", "let_frequency": 2, "let_relation": "at least"}]
            f.write(json.dumps({"key": key, "prompt": f"{queries[key % 4]} Use the letter e at least twice.", "instruction_id_list": ["keywords:letter_frequency"], "kwargs": kwargs}) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Checks:
    def __init__(self, cpu: bool, work: Path, out: Path | None):
        self.cpu, self.work, self.out = cpu, work, out
        self.model = "tiny-llama" if cpu else "small-llama"
        self.bf16 = None if cpu else True  # on a CPU, bf16 only where it is native (emulated bf16 is 5-7x slower than fp32)
        self.failed: list[str] = []
        self.lines: list[str] = []

    # -- running -------------------------------------------------------------------------------

    def report(self, name: str, status: str, figure: str) -> None:
        line = f"CHECK {name:<10} {status:<4}  {figure}"
        print(line, flush=True)
        self.lines.append(line)
        if status == "FAIL":
            self.failed.append(name)

    def posttrain(self, name: str, *args: str, torchrun: int = 0, probe: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        entry = [str(PROBE)] if probe is not None else ["-m", "posttrain.cli"]
        if torchrun:
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(torchrun),
                       "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *entry, *args]  # fmt: skip
        else:
            command = [sys.executable, *entry, *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.cpu:
            env.setdefault("OMP_NUM_THREADS", "1")
        if probe is not None:
            probe.mkdir(parents=True, exist_ok=True)
            env["POSTTRAIN_PROBE_DIR"] = str(probe)
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        log = self.work / f"{name}.log"
        log.write_text(f"$ {' '.join(command)}\n{proc.stdout}\n{proc.stderr}")
        if self.out is not None:
            (self.out / f"{name}.log").write_text(log.read_text()[-200_000:])
        if proc.returncode != 0:
            raise RuntimeError(f"rc {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1][:300] if (proc.stderr or proc.stdout).strip() else ''}")
        return proc

    def run(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            figure = fn()
        except SkipCheck as skip:
            self.report(name, "skip", str(skip))
            return
        except Exception as err:  # noqa: BLE001 - every failure is reported, the next check still runs
            self.report(name, "FAIL", f"{type(err).__name__}: {str(err)[:400]}")
            return
        self.report(name, "ok", f"{figure}  [{time.perf_counter() - t0:.0f} s]")

    def config(self, name: str, sections: dict) -> Path:
        import yaml

        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"output_dir": str(self.work / name), **sections}))
        return path

    # -- the checks ----------------------------------------------------------------------------

    def env(self) -> str:
        from importlib.metadata import version

        import torch

        from posttrain.config import native_bf16

        where = f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s), capability {torch.cuda.get_device_capability(0)}" if torch.cuda.is_available() else "no CUDA"
        if not self.cpu and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: run with --cpu on a machine without a GPU")
        return f"torch {torch.__version__}, {where}, native bf16 {native_bf16()}, posttrain {version('posttrain')}, transformers {version('transformers')}, peft {version('peft')}"

    def sft(self, name: str, adapter: dict, model: dict | None = None, steps: int | None = None) -> str:
        data = write_chats(self.work / "chats.jsonl", 512 if not self.cpu else 48)
        steps = steps or (3 if self.cpu else 20)
        cfg = self.config(name, {
            "model": {"name": self.model, **(model or {})},
            "data": {"path": str(data), "max_length": 256 if self.cpu else 1024},
            "adapter": adapter,
            "train": {"lr": 2e-4, "max_steps": steps, "micro_batch_size": 2 if self.cpu else 8, "bf16": self.bf16, "warmup_steps": 0},
        })  # fmt: skip
        self.posttrain(name, "sft", "--config", str(cfg))
        return summary(self.work / name)

    def qlora(self) -> str:
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            raise SkipCheck("needs CUDA (the refusal without it is tested in tests/test_memory_options.py)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SkipCheck("bitsandbytes is not installed (pip install 'posttrain[qlora]', or carry its wheel)")
        return self.sft("qlora", {"kind": "lora", "r": 16, "alpha": 32, "quantize": "4bit"}, model={"gradient_checkpointing": True})

    def dpo(self) -> str:
        data = write_pairs(self.work / "pairs.jsonl", 256 if not self.cpu else 24)
        cfg = self.config("dpo", {
            "model": {"name": self.model},
            "data": {"path": str(data), "max_length": 128},
            "adapter": {"kind": "lora", "r": 16, "alpha": 32},
            "train": {"lr": 1e-3, "max_steps": 3 if self.cpu else 12, "micro_batch_size": 4 if self.cpu else 16, "bf16": self.bf16, "warmup_steps": 0},
        })  # fmt: skip
        self.posttrain("dpo", "dpo", "--config", str(cfg))
        rows = metrics(self.work / "dpo")
        return (
            f"{median(r['pairs_per_s'] for r in rows[1:] or rows):,.1f} pairs/s, accuracy {rows[0]['accuracy']:.2f} → {rows[-1]['accuracy']:.2f}, "
            f"loss {rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f}, peak {max(r['peak_memory_gb'] for r in rows):.2f} GB"
        )

    def grpo(self) -> str:
        data = write_ifeval_prompts(self.work / "ifeval.jsonl", 16)
        cfg = self.config("grpo", {
            "model": {"name": "tiny-llama"},
            "data": {"path": str(data)},
            "adapter": {"kind": "lora", "r": 8, "alpha": 16},
            "train": {"lr": 1e-3, "max_steps": 3, "micro_batch_size": 16, "bf16": self.bf16},
            "grpo": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 16, "reward": "verifiers:loose"},
        })  # fmt: skip
        self.posttrain("grpo", "grpo", "--config", str(cfg))
        rows = metrics(self.work / "grpo")
        return f"{median(r['seconds'] for r in rows):.2f} s/step ({median(r['generation_seconds'] for r in rows):.2f} generating), reward {rows[0]['reward_mean']:.3f} → {rows[-1]['reward_mean']:.3f}"

    def judge(self) -> str:
        """MT-Bench grading with the model as its own judge, verdicts read from its token probabilities on the device."""
        questions = self.work / "questions.jsonl"
        rows = [
            {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it about snow."]},
            {"question_id": 2, "category": "math", "turns": ["What is 12 times 7?", "And 12 times 8?"], "reference": ["84", "96"]},
        ]
        questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = self.work / "judge"
        self.posttrain("judge", "eval", "mt-bench", "-m", self.model, "-j", self.model, "--judge-mode", "probs", "--questions", str(questions),
                       "--max-new-tokens", "16", "-o", str(out), *(["--bf16"] if self.bf16 else []))  # fmt: skip
        result = json.loads((out / "results.json").read_text())["models"][self.model]
        unread = result["unparsable judgements"]
        return f"{int(unread['n'])} turns judged, {int(unread['value'])} unreadable, report {'written' if (out / 'report.html').is_file() else 'MISSING'}"

    def demo(self) -> str:
        t0 = time.perf_counter()
        self.posttrain("demo", "demo", "--quick", "--output-dir", str(self.work / "demo"), timeout=600)
        summary_json = json.loads((self.work / "demo" / "summary.json").read_text())
        return f"{time.perf_counter() - t0:.0f} s, stages {', '.join(summary_json['stages'])}"

    def decoders(self) -> str:
        script = ROOT / "benchmarks" / "gpu_check_decoders.py"
        proc = self.posttrain_python("decoders", script, self.model, "32" if self.cpu else "128", "16" if self.cpu else "64")
        return proc.stdout.strip().splitlines()[-1]

    def steer(self) -> str:
        script = ROOT / "benchmarks" / "gpu_check_steer.py"
        proc = self.posttrain_python("steer", script, self.model, "8" if self.cpu else "64", "12" if self.cpu else "48")
        return proc.stdout.strip().splitlines()[-1]

    def serve(self) -> str:
        script = ROOT / "benchmarks" / "gpu_check_serve.py"
        adapter = self.work / "sft-lora"
        extra = [str(adapter)] if (adapter / "final").is_dir() else []
        proc = self.posttrain_python("serve", script, self.model, "32" if self.cpu else "256", "16" if self.cpu else "64", *extra)
        return proc.stdout.strip().splitlines()[-1]

    def posttrain_python(self, name: str, script: Path, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
        (self.work / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if self.out is not None:
            (self.out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            said = (proc.stderr or proc.stdout).strip()
            raise RuntimeError(f"rc {proc.returncode}: {said.splitlines()[-1][:300] if said else ''}")
        return proc

    def processes(self) -> int:
        import torch

        return 2 if self.cpu else max(1, torch.cuda.device_count())

    def fsdp(self) -> str:
        data = write_chats(self.work / "chats.jsonl", 512 if not self.cpu else 48)
        n = self.processes()
        cfg = self.config("fsdp", {
            "model": {"name": self.model},
            "data": {"path": str(data), "max_length": 256 if self.cpu else 1024},
            "adapter": {"kind": "full"},
            "train": {"lr": 2e-4, "max_steps": 3 if self.cpu else 12, "micro_batch_size": 2 if self.cpu else 8, "bf16": self.bf16, "distributed": "fsdp", "save_every": 3 if self.cpu else 6},
        })  # fmt: skip
        self.posttrain("fsdp", "sft", "--config", str(cfg), torchrun=n, probe=self.work / "probe-fsdp")
        calls, device = probed(self.work / "probe-fsdp", n)
        return f"{n} process(es): {summary(self.work / 'fsdp')}; {len(calls)} collectives per rank, all on {device}, same order on every rank"

    def ddp_kto(self) -> str:
        data = write_pairs(self.work / "pairs-kto.jsonl", 30)
        n = self.processes()
        cfg = self.config("ddp-kto", {
            "model": {"name": "tiny-llama"},
            "data": {"path": str(data), "max_length": 128, "eval_fraction": 0.1},
            "train": {"lr": 1e-3, "max_steps": 7, "micro_batch_size": 1, "grad_accum": 2, "eval_every": 7, "bf16": False},
            "dpo": {"loss_type": "kto"},
        })  # fmt: skip
        self.posttrain("ddp-kto", "dpo", "--config", str(cfg), torchrun=n, probe=self.work / "probe-ddp")
        calls, device = probed(self.work / "probe-ddp", n)
        rows = metrics(self.work / "ddp-kto")
        return f"{n} process(es): loss {rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f}, z0 {rows[-1]['kto_z0']:.4f}; {len(calls)} collectives per rank, all on {device}"


class SkipCheck(Exception):
    pass


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise RuntimeError(f"{run}: no metrics")
    return rows


def median(values) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def summary(run: Path) -> str:
    rows = metrics(run)
    steady = rows[1:] or rows  # the first step includes warm-up (CUDA kernels, allocator)
    return (
        f"{median(r['tokens_per_s'] for r in steady):,.0f} tokens/s, loss {rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f}, "
        f"peak {max(r['peak_memory_gb'] for r in rows):.2f} GB, {len(rows)} steps"
    )


def probed(probe: Path, n: int) -> tuple[list, str]:
    ranks = [json.loads((probe / f"rank-{r}.json").read_text()) for r in range(n)]
    calls = [r["calls"] for r in ranks]
    if any(c != calls[0] for c in calls):
        raise RuntimeError("the ranks made different sequences of collectives")
    device = ranks[0]["group_device"]
    wrong = [c for c in calls[0] if c[1] is not None and c[1] != device]
    if wrong:
        raise RuntimeError(f"collectives with tensors off the group's device {device}: {wrong[:3]}")
    return calls[0], device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run what a CPU can, small (for CI)")
    ap.add_argument("--out", type=Path, help="also write the summary and each check's log here")
    ap.add_argument("--only", default="", help="comma-separated check names")
    args = ap.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="posttrain-gpu-check-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("POSTTRAIN_CACHE", str(work / "cache"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        c = Checks(args.cpu, work, args.out)
        plan = {
            "env": c.env,
            "sft-lora": lambda: c.sft("sft-lora", {"kind": "lora", "r": 16, "alpha": 32}),
            "sft-full": lambda: c.sft("sft-full", {"kind": "full"}),
            "sft-bf16w": lambda: c.sft("sft-bf16w", {"kind": "full"}, model={"dtype": "bfloat16", "gradient_checkpointing": True}),
            "sft-wegeft": lambda: c.sft("sft-wegeft", {"kind": "wegeft", "r": 64, "alpha": 128}),
            "qlora": c.qlora,
            "dpo": c.dpo,
            "grpo": c.grpo,
            "judge": c.judge,
            "demo": c.demo,
            "decoders": c.decoders,
            "steer": c.steer,
            "serve": c.serve,
            "fsdp": c.fsdp,
            "ddp-kto": c.ddp_kto,
        }
        only = [n for n in args.only.split(",") if n]
        for name, fn in plan.items():
            if not only or name in only:
                c.run(name, fn)
        if args.out:
            (args.out / "gpu_check.txt").write_text("\n".join(c.lines) + "\n")
    print(f"{len(c.lines) - len(c.failed)} of {len(c.lines)} checks ok or skipped" + (f"; failed: {', '.join(c.failed)}" if c.failed else ""))
    sys.exit(1 if c.failed else 0)


if __name__ == "__main__":
    main()
