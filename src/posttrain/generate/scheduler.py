"""Continuous batching across requests: one thread feeds the engine's decode loop requests as they arrive.

Our own, because it is the engine's own loop (:meth:`Engine.run`) that decodes them: a request's
sequences join the batch at the next step a row is free, each with its own :class:`SamplingParams`,
stop strings, adapter and random stream, and leave it when they finish or their caller goes away, while
the other rows go on. So a greedy request gives the same tokens through the server as
:meth:`Engine.generate` gives for it alone, and a seeded one the same draws (the seeds are the engine's:
:func:`~posttrain.generate.prompts.sample_seed` of the request's seed, its prompt and the sample's index).

Models the fast decoder does not cover (other architectures, sliding-window attention) step through
their own forward, which cannot take rows mid-decode: their requests are decoded in waves of up to
``width`` sequences, a wave running to its end while newcomers wait.

Threads: :meth:`Scheduler.submit` may be called from any thread (the server's event loop); the decode
loop runs in the scheduler's own thread, which alone touches the model. A sequence's ``listener`` and
the handle's ``on_done`` are called in that thread, and must only hand the news on (the server posts it
to its event loop). The queue is bounded in sequences: :class:`QueueFull` when it is full, so that a
server answers 429 instead of taking work it cannot do in time.

Chats that start with the template's preamble (its default system prompt) share its prefilled keys
and values (:class:`~posttrain.generate.engine.PrefixCache`), as the engine shares a call's common prefix.

Work that needs the model to itself (loading an adapter) is queued with :meth:`Scheduler.call`: new
sequences wait, the running ones finish, the work runs, and decoding resumes with a new decoder.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from posttrain.generate.engine import Engine
from posttrain.generate.intervene import Intervention
from posttrain.generate.params import Completion, SamplingParams
from posttrain.generate.prefill import PrefixCache
from posttrain.generate.prompts import sample_seed
from posttrain.generate.sequences import DecodeSequence


class QueueFull(RuntimeError):
    """The scheduler has as many sequences waiting as it takes; ``retry_after`` is a guess in seconds."""

    def __init__(self, waiting: int, retry_after: float):
        super().__init__(f"{waiting} sequences are waiting, the most this server queues; try again in {retry_after:.0f} s")
        self.retry_after = retry_after


class SchedulerStopped(RuntimeError):
    """The scheduler is stopping (or its decode loop failed) and takes no new work."""


@dataclass(eq=False)
class Handle:
    """One request's sequences (its ``n`` samples), in sample order.

    ``done`` is set when every sequence has finished (or failed: ``error``); ``on_done`` is called then,
    in the scheduler's thread. :meth:`cancel` ends them at the next step and frees their rows.
    """

    seqs: list[DecodeSequence]
    on_done: Callable[[Handle], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    submitted: float = field(default_factory=time.perf_counter)
    left: int = 0

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancelled = True

    @property
    def cancelled(self) -> bool:
        return any(s.cancelled for s in self.seqs)


class Scheduler:
    """Requests in, completions out, decoded together by one :class:`Engine` in a thread of its own.

    ``width``: rows of the decode batch (sequences decoded together); ``max_waiting``: sequences queued
    beyond them before :meth:`submit` refuses with :class:`QueueFull`; ``bf16``: the engine's bf16 cast,
    held while the scheduler runs.
    """

    def __init__(self, engine: Engine, *, width: int = 64, max_waiting: int = 1024, bf16: bool = False):
        if width < 1 or max_waiting < 1:
            raise ValueError(f"width and max_waiting must be at least 1, not {width} and {max_waiting}")
        self.engine, self.width, self.max_waiting, self.bf16 = engine, width, max_waiting, bf16
        self._queue: collections.deque[tuple[DecodeSequence, Handle]] = collections.deque()
        self._handles: dict[int, Handle] = {}  # id(sequence) -> its handle, while it is queued or running
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._running = 0  # sequences in the decode batch
        self.last_error: BaseException | None = None  # the decode loop's last failure (its requests failed with it)
        self.tokens_generated = 0
        self._prefix = PrefixCache(engine, engine.prompts.preamble()) if engine._plain_cache() else None
        self._thread = threading.Thread(target=self._loop, name="posttrain-scheduler", daemon=True)
        self._thread.start()

    # -- called from other threads --------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        adapter: str | None = None,
        intervention: Intervention | None = None,
        instruction: tuple[int, int] | None = None,
        listener: Callable[[DecodeSequence], None] | None = None,
        on_done: Callable[[Handle], None] | None = None,
    ) -> Handle:
        """Queue ``params.n`` samples of ``prompt_ids``; raises :class:`QueueFull` or :class:`SchedulerStopped`.

        ``intervention``: steering and InstABoost for this request; ``instruction``: its instruction's tokens
        in ``prompt_ids`` (which InstABoost boosts)."""
        if not prompt_ids:
            raise ValueError("empty prompt: nothing to condition on")
        index = self.engine.adapter_index(adapter)
        stops = self.engine.stops(params)
        intervention = self.engine.check_intervention(intervention, [instruction], [prompt_ids])
        seqs = [
            DecodeSequence(
                0, j, list(prompt_ids), sample_seed(params.seed, prompt_ids, 0, j), params, stops, index, intervention, instruction, listener=listener
            )
            for j in range(params.n)
        ]
        handle = Handle(seqs, on_done, left=len(seqs))
        with self._lock:
            if self._stopping:
                raise SchedulerStopped("the server is stopping")
            waiting = len(self._queue)
            if waiting + len(seqs) > self.max_waiting:
                raise QueueFull(waiting, self.retry_after())
            for s in seqs:
                self._queue.append((s, handle))
                self._handles[id(s)] = handle
            self._lock.notify_all()
        return handle

    def call(self, work: Callable[[], Any]) -> Future:
        """Run ``work()`` in the scheduler's thread once the running sequences have finished; its result comes in the future."""
        future: Future = Future()
        with self._lock:
            if self._stopping:
                raise SchedulerStopped("the server is stopping")
            self._calls.append((work, future))
            self._lock.notify_all()
        return future

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        adapter: str | None = None,
        intervention: Intervention | None = None,
        instruction: tuple[int, int] | None = None,
        timeout: float | None = None,
    ) -> list[Completion]:
        """Submit and wait: the completions of one request (for tests and in-process callers)."""
        handle = self.submit(prompt_ids, params, adapter=adapter, intervention=intervention, instruction=instruction)
        if not handle.done.wait(timeout):
            handle.cancel()
            raise TimeoutError(f"no completion within {timeout} s")
        if handle.error is not None:
            raise handle.error
        return [self.engine.completion(s) for s in handle.seqs]

    def retry_after(self) -> float:
        """Seconds until the queue has room, roughly: the queued sequences at one batch per 10 s (at least 1)."""
        return max(1.0, 10.0 * len(self._queue) / max(self.width, 1))

    @property
    def queued(self) -> int:
        """Sequences waiting for a row."""
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new work, cancel what is queued and running, and wait for the thread to end."""
        with self._lock:
            self._stopping = True
            for s, _ in self._queue:
                s.cancelled = True
            for handle in list(self._handles.values()):
                handle.cancel()
            self._lock.notify_all()
        self._thread.join(timeout)

    # -- the scheduler's thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                with self.engine.session(self.bf16) as decoder:
                    while True:
                        with self._lock:
                            while not self._queue and not self._calls and not self._stopping:
                                self._lock.wait(1.0)
                            if self._stopping:
                                self._drop_queue()
                                return
                            if self._calls:
                                break
                        self.engine.run(self, self.width, self._finished, prefix=self._prefix, decoder=decoder, eager=True)
                # the session ended for work that wants the model to itself; a new one builds a new decoder
                self._run_calls()
            except Exception as err:  # noqa: BLE001 — fail the requests, not silently the thread
                self.last_error = err
                self._fail(err)
                if self._stopping:
                    return
                time.sleep(0.1)

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                work, future = self._calls.popleft()
            try:
                future.set_result(work())
            except BaseException as err:  # noqa: BLE001 — the caller gets the error
                future.set_exception(err)

    # Feed: the engine's decode loop takes sequences from here (see posttrain.generate.engine.Feed)

    def waiting(self) -> bool:
        return bool(self._queue) and not self._calls and not self._stopping

    def take(self, k: int) -> list[DecodeSequence]:
        """Up to ``k`` queued sequences of the first one's group, adapter and intervention (cancelled ones are dropped)."""
        batch: list[DecodeSequence] = []
        with self._lock:
            if self._calls or self._stopping:
                return batch
            kept: collections.deque[tuple[DecodeSequence, Handle]] = collections.deque()
            while self._queue and len(batch) < k:
                s, handle = self._queue.popleft()
                if s.cancelled:
                    self._finish_locked(s, handle)
                    continue
                if batch and s.group != batch[0].group:
                    kept.append((s, handle))
                    continue
                batch.append(s)
            self._queue.extendleft(reversed(kept))
            self._running += len(batch)
        return batch

    def _finished(self, s: DecodeSequence) -> None:
        self.tokens_generated += len(s.tokens)
        with self._lock:
            self._running -= 1
            handle = self._handles.get(id(s))
            if handle is not None:
                self._finish_locked(s, handle)

    def _finish_locked(self, s: DecodeSequence, handle: Handle) -> None:
        self._handles.pop(id(s), None)
        handle.left -= 1
        if handle.left == 0:
            self._complete(handle)

    def _complete(self, handle: Handle) -> None:
        handle.done.set()
        if handle.on_done is not None:
            try:
                handle.on_done(handle)
            except Exception:  # noqa: BLE001 — a listener's failure must not stop the decode loop
                pass

    def _drop_queue(self) -> None:
        while self._queue:
            s, handle = self._queue.popleft()
            s.cancelled = True
            self._finish_locked(s, handle)

    def _fail(self, err: BaseException) -> None:
        """The decode loop raised: every queued and running request fails with the error; the loop starts again."""
        with self._lock:
            handles = {id(h): h for h in self._handles.values()}
            self._queue.clear()
            self._handles.clear()
            self._running = 0
        for handle in handles.values():
            handle.error = err
            self._complete(handle)

