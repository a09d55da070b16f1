"""A Hugging Face hub cache built by hand in a temporary directory, used offline (``HF_HUB_OFFLINE=1``).

The layout is the hub cache's own: ``models--Org--Name/`` and ``datasets--org--name/``, each with
``refs/<branch>`` holding a commit and ``snapshots/<commit>/`` holding the repo's files (plain files
here, where huggingface_hub links them to ``blobs/``; it reads both).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def offline_hub(root: Path, monkeypatch: Any) -> Path:
    """An empty hub cache under ``root``, offline, for this process and for subprocesses; returns the cache directory.

    Subprocesses get ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` from the environment.
    huggingface_hub and datasets read those once, when first imported (here possibly by an earlier
    test), so this process also gets them set where those libraries keep them.
    """
    import datasets.config
    from huggingface_hub import constants

    home = root / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for key, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def _repo(cache: Path, kind: str, repo_id: str) -> Path:
    return cache / f"{kind}--{repo_id.replace('/', '--')}"


def set_ref(cache: Path, kind: str, repo_id: str, commit: str, ref: str = "main") -> None:
    """Point ``refs/<ref>`` of a cached repo (``kind`` models or datasets) at ``commit``."""
    refs = _repo(cache, kind, repo_id) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / ref).write_text(commit)


def add_model(cache: Path, repo_id: str, commit: str = COMMIT_A, *, model: str = "tiny-llama") -> Path:
    """Cache hub model ``repo_id`` at ``commit`` (refs/main pointing at it) with a zoo model's files; returns the snapshot."""
    from posttrain.models.zoo import zoo_path

    snapshot = _repo(cache, "models", repo_id) / "snapshots" / commit
    shutil.copytree(zoo_path(model), snapshot)
    set_ref(cache, "models", repo_id, commit)
    return snapshot


def add_dataset(cache: Path, repo_id: str, files: dict[str, str], commit: str = COMMIT_A) -> Path:
    """Cache hub dataset ``repo_id`` at ``commit`` (refs/main pointing at it) with ``files`` (repo path -> text); returns the snapshot."""
    snapshot = _repo(cache, "datasets", repo_id) / "snapshots" / commit
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    set_ref(cache, "datasets", repo_id, commit)
    return snapshot
