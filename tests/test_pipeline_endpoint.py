"""The demo's pipeline with ``generation.backend: openai`` pointed at a real ``posttrain serve`` on 127.0.0.1.

At temperature 0 (every evaluation) the scores must equal the in-process engine's, stage for stage; the
sampling stage draws the same samples too (the server seeds a request as the engine seeds a first
copy). A run killed while it generates, then started again, re-sends only the requests that had not
finished, and says so.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from serve_fixtures import served
from sft_fixtures import subprocess_env

from posttrain.demo import pipeline

MODEL = "tiny-qwen2"


def config(out: Path, **generation) -> dict:
    cfg = pipeline.demo_config(quick=True)
    cfg["output_dir"] = str(out)
    cfg["prompts"] = {**cfg["prompts"], "n_train": 8, "n_heldout": 8, "n_ifeval": 4}
    cfg["generation"] = {**cfg["generation"], **generation}
    cfg["sft"] = {**cfg["sft"], "train": {**cfg["sft"]["train"], "max_steps": 2}}
    cfg["dpo"] = {**cfg["dpo"], "train": {**cfg["dpo"]["train"], "max_steps": 2}}
    assert cfg["model"] == MODEL
    return cfg


def run_cli(cfg: dict, path: Path, **popen) -> subprocess.Popen:
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(path)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(COLUMNS="200"), **popen)


def scores(out: Path) -> dict:
    """Each evaluation's scores and its responses, item by item."""
    stages = ("eval-start", "eval-sft", "eval-dpo")
    return {
        stage: {f.name: f.read_text() for f in sorted((out / stage).iterdir()) if f.suffix in (".json", ".jsonl") and f.name != "stage.json"}
        for stage in stages
    }


def test_the_pipeline_through_the_server_scores_as_in_process_and_resumes(tmp_path):
    local = tmp_path / "local"
    proc = run_cli(config(local), tmp_path / "local.yaml")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]

    with served(MODEL, "--allow-loading", "--dtype", "float32") as url:
        remote = tmp_path / "remote"
        # first a run killed as soon as some of its requests have finished (one at a time, so it is mid-stage)
        slow = config(remote, backend="openai", base_url=url, concurrency=1)
        proc = run_cli(slow, tmp_path / "remote.yaml", start_new_session=True)
        cache = remote / "requests"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            lines = sum(f.read_text().count("\n") for f in cache.glob("*.jsonl")) if cache.is_dir() else 0
            if lines >= 5:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run should still have been generating"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        cached = sum(f.read_text().count("\n") for f in cache.glob("*.jsonl"))
        assert cached >= 5

        proc = run_cli(config(remote, backend="openai", base_url=url), tmp_path / "remote.yaml")
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
    # the stage the kill interrupted says how much it took from the cache and how much it sent
    first = next(line for line in output.splitlines() if " from the cache, " in line)
    total, from_cache, sent = (int(x.replace(",", "")) for x in re.match(r".*?(\d[\d,]*) requests: (\d[\d,]*) from the cache, (\d[\d,]*) sent", first).groups())
    assert from_cache >= 5 and from_cache + sent == total and sent < total, first
    got, want = scores(remote), scores(local)
    assert all("scores.json" in files and "heldout.jsonl" in files for files in want.values()), want.keys()
    assert got == want
    local_kept = (local / "sample" / "kept.jsonl").read_text()
    assert (remote / "sample" / "kept.jsonl").read_text() == local_kept, "the seeded samples should be the engine's"
