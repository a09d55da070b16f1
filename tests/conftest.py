import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Zoo models and tokenized data go to a per-run directory, never the user's cache."""
    os.environ["POSTTRAIN_CACHE"] = str(tmp_path_factory.mktemp("posttrain-cache"))
    yield


@pytest.fixture
def avx2_kernels(monkeypatch, tmp_path):
    """The decode kernels rebuilt as for an AVX2 CPU without AVX-512 (``-march=haswell``), in a cache of their own;
    skipped where that cannot build (not x86-64 Linux, no AVX2, no C compiler). Returns the module."""
    from posttrain.generate import decode_kernels

    if decode_kernels._target() is None or "avx2" not in decode_kernels._cpu_flags().split():
        pytest.skip("needs x86-64 Linux with AVX2 and a C compiler")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(decode_kernels, "_loaded", False)
    monkeypatch.setattr(decode_kernels, "_library", None)
    monkeypatch.setattr(decode_kernels, "_building", None)  # a build started earlier, for this machine's flags
    monkeypatch.setattr(decode_kernels, "_scratch", type(decode_kernels._scratch)())
    monkeypatch.setattr(decode_kernels, "FLAGS", ["-march=haswell" if f == "-march=native" else f for f in decode_kernels.FLAGS])
    return decode_kernels
