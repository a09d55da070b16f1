"""Resolving a model name to files, and loading tokenizers.

A name is a zoo model (``tiny-llama``), a local directory, or a hub id; the first two never touch the
network. Loading goes through transformers' Auto classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.models import zoo


def resolve(name: str) -> str:
    """A path or hub id that transformers can load, building zoo models on first use."""
    if name in zoo.TINY:
        return str(zoo.zoo_path(name))
    return name


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    path = resolve(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        where = "directory" if Path(path).exists() else "model (a local directory, a zoo name such as tiny-llama, or a hub id)"
        raise FileNotFoundError(f"cannot load a tokenizer from {name!r}: not a usable {where} ({err.__class__.__name__}: {str(err).splitlines()[0]})") from err
