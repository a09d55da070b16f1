"""The models a server serves, by name: base models (each with its own engine and scheduler) and adapters over them.

A name given to :meth:`Models.add` may be a model (a zoo or fetched name, a local directory, a hub id),
a LoRA/DoRA adapter directory (its ``adapter_config.json`` names the base), or any run directory
posttrain writes (its ``final/`` is a model or an adapter; its ``config.yaml`` names the base model).
Adapters are loaded into their base's peft model and decoded in the same batch as the base's requests
(:class:`~posttrain.generate.fast.FastDecoder` adds each row's adapter update); an adapter whose base is
not served yet brings its base in too, under the base's name. A WeGeFT adapter (posttrain's own, not
peft's) is merged into its own copy of its base and served as a model.

:class:`Steerer` is what a server offers its requests for steering and InstABoost (``posttrain serve
--steer FILE``): the CLI wraps its steering file in one, since this layer cannot import
:mod:`posttrain.steer`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.generate.engine import Engine
from posttrain.generate.intervene import Steering
from posttrain.generate.scheduler import Scheduler


@dataclass(frozen=True)
class Served:
    """One name a request's ``model`` may give."""

    name: str
    scheduler: Scheduler
    adapter: str | None  # None: the base model itself
    base: str
    created: int
    max_context: int

    @property
    def engine(self) -> Engine:
        return self.scheduler.engine


@dataclass(frozen=True)
class Steerer:
    """The steering directions a server's requests may choose from, by instruction type (one steering file).

    ``resolve(type, mode, weight)``: the :class:`Steering` of that type ("add" or "adjust"; ``weight``
    None: the file's default), raising KeyError for an unknown type and ValueError for one it cannot
    steer. ``boost``: the InstABoost factor the file chose, what a request's ``instaboost: true`` means.
    """

    types: tuple[str, ...]
    resolve: Callable[[str, str, float | None], Steering]
    boost: float = 1.0
    source: str = ""  # the file, for messages


@dataclass(frozen=True)
class Source:
    kind: Literal["model", "adapter"]
    path: str
    base: str | None = None  # an adapter's base model


def describe(name: str) -> Source:
    """What ``name`` is: a model, or an adapter over a base (from a run directory, an adapter directory, or anything else)."""
    p = Path(name)
    if (p / "final").is_dir() and (p / "config.yaml").is_file():
        import yaml

        final = p / "final"
        if (final / "adapter_config.json").is_file():
            base = (yaml.safe_load((p / "config.yaml").read_text()).get("model") or {}).get("name")
            if not base:
                raise ValueError(f"{p / 'config.yaml'}: model.name is missing, so the adapter in {final} has no base")
            return Source("adapter", str(final), base)
        return Source("model", str(final))
    if (p / "adapter_config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{p / 'adapter_config.json'}: base_model_name_or_path is missing")
        return Source("adapter", str(p), base)
    return Source("model", name)


class Models:
    """Every served name; loading is serialised, and an adapter is attached while its base's engine is idle.

    ``dtype``: "auto" (bf16 where the device has native bf16, float32 elsewhere), "float32" or "bfloat16".
    ``width``: each base model's decode batch; ``max_waiting``: its queue, in sequences.
    """

    def __init__(
        self,
        *,
        dtype: str = "auto",
        device: str | None = None,
        width: int = 64,
        max_waiting: int = 1024,
        template: str | None = None,
        fast: bool = True,
    ):
        from posttrain.config import native_bf16

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype if dtype != "auto" else ("bfloat16" if native_bf16(self.device) else "float32")
        self.width, self.max_waiting, self.template, self.fast = width, max_waiting, template, fast
        self.names: dict[str, Served] = {}
        self._bases: dict[str, Served] = {}  # resolved path -> the base served from it
        self._lock = threading.Lock()

    def add(self, name: str, path: str | None = None) -> Served:
        """Serve ``path`` (default: ``name`` itself) as ``name``; returns what ``name`` now means."""
        with self._lock:
            if name in self.names:
                raise ValueError(f"model {name!r} is already served")
            source = describe(path or name)
            if source.kind == "model":
                return self._add_base(name, source.path)
            from posttrain.models.wegeft import is_wegeft_dir

            if is_wegeft_dir(source.path):  # merged into its own copy of the base: plain weights, the fast decoder
                return self._add_base(name, source.base, wegeft=source.path)  # type: ignore[arg-type]
            base = self._base_for(source.base)  # type: ignore[arg-type]
            return self._add_adapter(name, source.path, base)

    def get(self, name: str) -> Served | None:
        return self.names.get(name)

    def close(self) -> None:
        for served in self._bases.values():
            served.scheduler.stop()

    def _base_for(self, base: str) -> Served:
        from posttrain.models.load import resolve

        served = self._bases.get(resolve(base))
        if served is not None:
            return served
        return self._add_base(base, base)

    def _add_base(self, name: str, path: str, *, wegeft: str | None = None) -> Served:
        """Serve the model at ``path``; ``wegeft``: a WeGeFT adapter directory merged into it first."""
        from posttrain.config import ModelConfig
        from posttrain.models.load import load_model, load_tokenizer, resolve

        key = str(Path(wegeft).resolve()) if wegeft else resolve(path)
        if key in self._bases and self._bases[key].name in self.names:
            # the same weights twice: a second name for the same scheduler
            served = self._bases[key]
            alias = Served(name, served.scheduler, None, served.base, int(time.time()), served.max_context)
            self.names[name] = alias
            return alias
        model = load_model(ModelConfig(name=path, dtype=self.dtype), self.device)
        if wegeft:
            from posttrain.models.wegeft import load_wegeft

            model = load_wegeft(model, wegeft).merge_and_unload()
        model.config.use_cache = True
        tokenizer = load_tokenizer(wegeft or path)
        engine = Engine(model, tokenizer, batch_size=self.width, template=self.template, fast=self.fast)
        scheduler = Scheduler(engine, width=self.width, max_waiting=self.max_waiting)
        served = Served(name, scheduler, None, name, int(time.time()), _max_context(model.config, tokenizer))
        self._bases[key] = served
        self.names[name] = served
        return served

    def _add_adapter(self, name: str, path: str, base: Served) -> Served:
        engine = base.engine

        def attach() -> None:
            from peft import PeftModel

            if not engine.adapters:
                engine.model = PeftModel.from_pretrained(engine.model, path, adapter_name=name)
            else:
                engine.model.load_adapter(path, adapter_name=name)
            engine.model.eval()
            engine.adapters.append(name)

        base.scheduler.call(attach).result(timeout=600)
        served = Served(name, base.scheduler, name, base.name, int(time.time()), base.max_context)
        self.names[name] = served
        return served


def _max_context(config: Any, tokenizer: Any) -> int:
    """The longest prompt + completion the model takes: its position limit, else the tokenizer's."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048
