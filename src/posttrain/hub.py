"""Hugging Face hub repositories: which names are repo ids, which commit a revision is, the cached snapshot.

A name is a hub repo id when it has a repo id's shape (``name`` or ``org/name``) and is not a path on
this machine. Everything else goes through ``huggingface_hub`` as it is meant to be used: its API for a
revision's commit, its cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) through
``snapshot_download(local_files_only=True)``, its offline switch (``HF_HUB_OFFLINE=1``). Its settings
are read from ``huggingface_hub.constants`` (set from the environment when it is imported), so this
module and the loaders that use the hub (transformers, datasets) always agree. Nothing here downloads
files: the loaders do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

RepoType = Literal["model", "dataset"]

#: Names ending in one of these are files (a missing one is a missing local file, never a hub id).
LOCAL_SUFFIXES = frozenset(
    {
        ".json", ".jsonl", ".ndjson", ".parquet", ".pq", ".arrow", ".csv", ".tsv", ".txt", ".md",
        ".yaml", ".yml", ".jinja", ".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt",
        ".gz", ".zip", ".tar", ".zst", ".xz", ".bz2",
    }
)  # fmt: skip

# The hub's own rule for a repo id (huggingface_hub's validate_repo_id): letters, digits, '.', '_', '-';
# at most one '/'; no '--' or '..'; not starting or ending with '.' or '-'; at most 96 characters.
_REPO_ID = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*/)?[A-Za-z0-9_][A-Za-z0-9._-]*")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a hub repo id rather than a local path.

    Local: a path that exists; a name written as a path (``./x``, ``/x``, ``~/x``, more than one ``/``);
    a name ending in a data or model file's suffix (``data.jsonl``, ``model.gguf``: a missing file).
    A hub id otherwise, when it is ``name`` or ``org/name`` of letters, digits, ``.``, ``_`` and ``-``,
    dots included (``Qwen/Qwen2.5-0.5B-Instruct``, ``org/colors.v2``, ``gpt2``). Zoo and fetched names
    (``tiny-llama``) have a repo id's shape too: callers resolve them first.
    """
    if not name or Path(name).exists():
        return False
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return False
    if Path(name).suffix.lower() in LOCAL_SUFFIXES:
        return False
    return len(name) <= 96 and bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name and not name.endswith((".", "-"))


def offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``): no request reaches the hub."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """The local hub cache: ``HF_HUB_CACHE``, or ``HF_HOME/hub``, default ``~/.cache/huggingface/hub``."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, *, repo_type: RepoType = "model", revision: str | None = None) -> Path | None:
    """The local cache's snapshot directory of ``repo_id`` at ``revision`` (default main), or None when not cached.

    ``.../snapshots/<commit>``: a branch or tag is looked up in the cache's ``refs/``, a commit is used as
    is. Never asks the hub.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:  # not cached (or cached in part, as a snapshot listing says)
        return None


def resolved_commit(repo_id: str, *, repo_type: RepoType = "model", revision: str | None = None) -> str | None:
    """The commit that ``revision`` (default main) of the hub repo ``repo_id`` is at, or None when it cannot be known.

    Online, the hub says (``model_info``/``dataset_info(...).sha``). Offline (``HF_HUB_OFFLINE=1``), or
    when the hub does not answer (no network, a private repo without a token), the local cache says: the
    commit of the snapshot its ``refs/<revision>`` names. None when neither knows it.
    """
    if not offline():
        from huggingface_hub import HfApi

        api = HfApi()
        info = api.model_info if repo_type == "model" else api.dataset_info
        try:
            sha = info(repo_id, revision=revision).sha
        except Exception:  # noqa: BLE001 - any failure to ask the hub leaves the cache to answer
            sha = None
        if sha:
            return sha
    snapshot = cached_snapshot(repo_id, repo_type=repo_type, revision=revision)
    return snapshot.name if snapshot is not None else None


def unreachable(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it was raised from) says the hub could not be asked and the cache had no copy.

    That is huggingface_hub's ``LocalEntryNotFoundError`` (what transformers' loaders raise from), or a
    ``ConnectionError`` (offline mode's ``OfflineModeIsEnabled``; ``datasets`` when it cannot reach the hub).
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (LocalEntryNotFoundError, ConnectionError)):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def unavailable(repo_id: str, *, repo_type: RepoType = "model", revision: str | None = None, error: BaseException | None = None) -> str | None:
    """Why ``repo_id`` cannot be had on this machine, in plain words, or None when that is not the reason.

    The reason is: no snapshot of it in the local hub cache, and the hub out of reach, either because
    offline mode is on or because ``error`` (from a loader) says it could not connect.
    """
    if cached_snapshot(repo_id, repo_type=repo_type, revision=revision) is not None:
        return None
    if offline():
        why = "HF_HUB_OFFLINE=1"
    elif unreachable(error):
        why = describe(error)
    else:
        return None
    what = f"{repo_id}@{revision}" if revision else repo_id
    command = "hf download " + ("--repo-type dataset " if repo_type == "dataset" else "") + repo_id + (f" --revision {revision}" if revision else "")
    return (
        f"{what} is not in the local hub cache ({cache_dir()}) and the hub cannot be reached ({why}): "
        f"download it once where the hub is reachable (`{command}`, into this cache), or name a local {'dataset' if repo_type == 'dataset' else 'model directory'}"
    )


def describe(error: BaseException) -> str:
    """``ClassName: first line of the message``, for an error quoted inside another message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
