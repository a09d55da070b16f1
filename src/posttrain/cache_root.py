"""posttrain's cache root: ``$POSTTRAIN_CACHE``, default ``~/.cache/posttrain``.

What posttrain makes once and keeps goes under it: tiny and fetched models (``models/``), tokenized data
(``data/cache.py``), reference log-probs (``train/reference.py``), endpoint requests
(``generate/client.py``). It sits in the lowest layer so that every layer can ask for it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$POSTTRAIN_CACHE``, or ``~/.cache/posttrain``; read on every call, so a changed environment counts."""
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))
