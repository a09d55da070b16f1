"""A teacher for synthesis stages: any generation backend, asked in chats, every finished request cached on disk.

The backend is an in-process :class:`~posttrain.generate.engine.Engine` (``--teacher MODEL``) or any
OpenAI-compatible endpoint (:class:`~posttrain.generate.client.OpenAIEngine`, ``--base-url``), through
the one ``generate`` interface they share. What this adds is what makes a synthesis run resumable
whatever the backend: each prompt's replies are appended to ``CACHE/<model>-<hash>.jsonl`` under a
content hash of (model name, prompt, n, temperature, top_p, max_new_tokens, seed) as soon as its chunk
of ``chunk`` prompts comes back, so a run killed mid-stage asks again only for what is missing, and each
call says how many came from the cache (:attr:`Teacher.counts`). The file format and its repair of a torn
last line are the client backend's (:class:`~posttrain.generate.client.RequestCache`).

The cache key holds the model's *name*: a name that comes to mean other weights needs another cache
directory (a fresh output directory has its own).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from posttrain.generate.client import RequestCache
from posttrain.generate.params import SamplingParams


T = TypeVar("T")


@dataclass(frozen=True)
class Reply:
    text: str
    truncated: bool  # cut at max_new_tokens


@dataclass
class Teacher:
    """``ask(prompts, ...) -> [[reply, ...], ...]``: ``n`` replies per prompt (one user message each), cached."""

    engine: Any
    name: str
    cache_dir: Path
    bf16: bool = False
    chunk: int = 32
    console: Any = None
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = RequestCache(self.cache_dir)

    def ask(
        self,
        prompts: Sequence[str],
        *,
        what: str,
        n: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        seed: int = 0,
        top_p: float = 1.0,
        stop: tuple[str, ...] = (),
    ) -> list[list[Reply]]:
        """Replies to each prompt (``what`` names the call in the log line and in :attr:`counts`)."""
        settings: dict[str, Any] = {"n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
        if stop:
            settings["stop"] = list(stop)
        keys = [self.key(prompt, settings) for prompt in prompts]
        cached, _ = self.cache.load(self.name)
        replies: dict[str, list[Reply]] = {k: _replies(cached[k]) for k in keys if k in cached}
        missing = list(dict.fromkeys(k for k in keys if k not in replies))
        by_key = dict(zip(keys, prompts))
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, stop=stop, bf16=self.bf16)
        for start in range(0, len(missing), self.chunk):
            batch = missing[start : start + self.chunk]
            outputs = self.engine.generate([by_key[k] for k in batch], params, progress=True)
            for key, completions in zip(batch, outputs):
                entry = {"key": key, "replies": [c.text for c in completions], "truncated": [c.finish_reason == "length" for c in completions]}
                self.cache.append(self.name, entry)
                replies[key] = _replies(entry)
        self.counts[what] = self.counts.get(what, 0) + len(missing)
        if self.console is not None:
            self.console.print(f"{what}: {len(keys)} requests to {self.name}: {len(keys) - len(missing)} from the cache, {len(missing)} generated", highlight=False)
        return [replies[k] for k in keys]

    def ask_parsed(
        self, prompts: Sequence[str], parse: Callable[[Reply], T | None], *, what: str, attempts: int = 3, **settings: Any
    ) -> list[tuple[T | None, Reply]]:
        """One reply per prompt, parsed; a reply that does not parse is asked again (sampled at temperature >= 0.7, a new seed each
        time) up to ``attempts`` times in all. Returns (parsed value or None, the last reply) per prompt; retries are counted in
        :attr:`counts` under ``what + " retries"``."""
        results: list[tuple[T | None, Reply] | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        for attempt in range(attempts):
            if not todo:
                break
            if attempt:
                self.counts[f"{what} retries"] = self.counts.get(f"{what} retries", 0) + len(todo)
                settings = {**settings, "temperature": max(settings.get("temperature", 0.0), 0.7), "seed": settings.get("seed", 0) + 1}
            replies = self.ask([prompts[i] for i in todo], what=what if not attempt else f"{what} (retry {attempt})", **settings)
            failed = []
            for i, reply in zip(todo, replies):
                value = parse(reply[0])
                results[i] = (value, reply[0])
                if value is None:
                    failed.append(i)
            todo = failed
        return results  # type: ignore[return-value]

    def key(self, prompt: str, settings: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps([self.name, prompt, settings], sort_keys=True).encode()).hexdigest()


def _replies(entry: dict[str, Any]) -> list[Reply]:
    return [Reply(text, bool(cut)) for text, cut in zip(entry["replies"], entry["truncated"])]
