"""benchmarks/gpu_check.sh on a CPU (--cpu): every check a CPU can run passes and prints its figure; the
CUDA-only ones say skip. On a machine without posttrain's dependencies and without the wheels folder it
stops at once, saying how to make the wheels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CHECKS = ("env", "sft-lora", "sft-full", "sft-bf16w", "sft-wegeft", "qlora", "dpo", "grpo", "judge", "demo", "decoders", "steer", "serve", "fsdp", "ddp-kto")


def test_gpu_check_runs_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "POSTTRAIN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("CHECK ")}
    assert sorted(lines) == sorted(CHECKS), proc.stdout
    assert lines["qlora"].split()[2] == "skip" and "CUDA" in lines["qlora"]
    assert all(lines[c].split()[2] == "ok" for c in CHECKS if c != "qlora"), proc.stdout
    assert "tokens/s" in lines["sft-lora"] and "pairs/s" in lines["dpo"] and "fp32 sequences identical" in lines["decoders"]
    assert "steered sequences identical on both paths" in lines["steer"]
    assert "all on cpu, same order on every rank" in lines["fsdp"]
    assert "base + adapter), 0 errors" in lines["serve"] and "tok/s aggregate" in lines["serve"]
    assert "4 turns judged" in lines["judge"] and "report written" in lines["judge"]
    assert (tmp_path / "out" / "gpu_check.txt").read_text().count("CHECK ") == len(CHECKS)


def test_without_dependencies_or_wheels_it_says_how_to_make_them(tmp_path):
    bare = tmp_path / "python"  # the interpreter without site-packages: posttrain and its dependencies do not import
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    copy = tmp_path / "repo"
    (copy / "benchmarks").mkdir(parents=True)
    (copy / "benchmarks" / "gpu_check.sh").write_text(SCRIPT.read_text())  # a checkout without benchmarks/wheels/
    proc = subprocess.run(["bash", str(copy / "benchmarks" / "gpu_check.sh")], env={**os.environ, "PYTHON": str(bare)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "benchmarks/gpu_wheels.sh" in proc.stderr, proc.stderr
