"""The batcher: one thread that runs every model call of the server, sentences of concurrent requests
decoded together.

A request's handler submits its work and awaits the result; it never touches a model. The one
worker thread takes the oldest waiting job and, if it is a search, every other waiting search with
the same key (the same model and settings), up to a budget of source tokens. Before it starts a
batch, it waits for more searches to join: until none has arrived for a quiet gap, and at most a
limit after the later of the oldest one's arrival and the previous batch's end. Both are
`max_wait` when batches are quick and grow with the previous batch's decoding time (2% and 10% of
it) when they are not: a lone request waits `max_wait`, while under load the answers of a batch go
out and their clients' next requests come back before the next batch starts, so that they are
decoded together rather than in a string of small batches, at a cost of at most a tenth of a
batch's time. Since only this thread runs the models, no model runs from two threads at once, and
a slow client, whose request body is read and answer written by the event loop, never holds one.

The worker is the batcher's own thread, or (`own_thread=False`) whichever thread calls `run`:
`transformer-serve` runs it on the process's main thread and the event loop on a second one, which
decodes faster under load than the other way round (docs/serve.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence, TypeVar

from transformer.decoding.search import Hypothesis

logger = logging.getLogger(__name__)

# How long a batch waits for more searches, as shares of the previous batch's decoding time (at least max_wait).
QUIET_SHARE = 0.02  # the gap without a new search after which it starts
WAIT_SHARE = 0.1  # the longest wait
T = TypeVar("T")
Search = Callable[[list[Sequence[int]]], list[list[Hypothesis]]]


class BatcherClosed(RuntimeError):
    """The batcher stopped (the server is shutting down) before the job ran."""


@dataclass(frozen=True)
class BatchInfo:
    """What a job's batch was.

    Attributes:
        sentences: sentences in the batch (of every job in it).
        tokens: their source tokens.
        waited: seconds from the job's submission to the start of its batch.
        seconds: the batch's decoding time.
    """

    sentences: int
    tokens: int
    waited: float
    seconds: float


@dataclass
class _Job:
    """One submission: a search over `sources` (batched with others of its `key`), or a `call` alone."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    key: Hashable | None = None
    label: str = ""
    sources: list[Sequence[int]] = field(default_factory=list)
    tokens: int = 0
    budget: int = 0
    search: Search | None = None
    call: Callable[[], Any] | None = None
    submitted: float = field(default_factory=time.perf_counter)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """Hand the result (or the error) to the awaiting handler, on its event loop."""
        def settle() -> None:
            if self.future.done():  # the handler went away (its client disconnected)
                return
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody is waiting
            pass


class Batcher:
    """Runs submitted searches in batches, and other model calls one at a time, on one thread.

    Args:
        max_wait: the least quiet gap and wait (see the module), in seconds: what a lone request waits.
        on_batch: called on the worker thread with (label, sentences, tokens, seconds) of every batch
            of searches it decodes (for metrics).
        own_thread: start a thread of its own that runs `run`; False: the caller runs it.
    """

    def __init__(
        self, max_wait: float = 0.005, on_batch: Callable[[str, int, int, float], None] | None = None,
        own_thread: bool = True,
    ) -> None:
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        self.max_wait = max_wait
        self.on_batch = on_batch
        self._pending: deque[_Job] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._last_seconds = 0.0  # the previous batch's decoding time
        self._last_end = 0.0  # when it ended (time.perf_counter)
        self._thread = threading.Thread(target=self._work, name="model", daemon=True) if own_thread else None
        if self._thread is not None:
            self._thread.start()

    async def search(
        self, key: Hashable, sources: list[Sequence[int]], tokens: int, budget: int, search: Search, label: str = ""
    ) -> tuple[list[list[Hypothesis]], BatchInfo]:
        """The n-best lists of `sources`, searched in a batch with other searches of the same `key`.

        Args:
            key: searches with equal keys run as one call of `search` (same model, same settings).
            sources: source ids per sentence, EOS included.
            tokens: their source tokens, counted against `budget`.
            budget: source tokens a batch of this key may hold; a job alone may exceed it.
            search: the engine call, from source ids to n-best lists in input order.
            label: names the batch for `on_batch` (the model).

        Raises:
            BatcherClosed: the batcher stopped before the search ran.
        """
        loop = asyncio.get_running_loop()
        job = _Job(loop, loop.create_future(), key, label, sources, tokens, budget, search)
        self._submit(job)
        return await job.future

    async def call(self, function: Callable[[], T]) -> T:
        """Run `function` on the worker thread, alone (e.g. an attention map or a measured search).

        Raises:
            BatcherClosed: the batcher stopped before it ran; or what `function` raises.
        """
        loop = asyncio.get_running_loop()
        job = _Job(loop, loop.create_future(), call=function)
        self._submit(job)
        return await job.future

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the batch in progress; jobs still waiting fail with `BatcherClosed`. Waits up
        to `timeout` seconds for its own thread to end (`run` on another thread returns by itself)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _submit(self, job: _Job) -> None:
        with self._condition:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            self._pending.append(job)
            self._condition.notify_all()

    def run(self) -> None:
        """Be the worker on the calling thread until `close` (a batcher built with `own_thread=False`;
        from one thread only).

        Raises:
            RuntimeError: the batcher has a thread of its own, which is its worker.
        """
        if self._thread is not None:
            raise RuntimeError("this batcher's worker is its own thread")
        self._work()

    def _work(self) -> None:
        """The worker: take the next batch, run it, repeat until closed."""
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            if jobs[0].call is not None:
                self._run_call(jobs[0])
            else:
                self._run_search(jobs)

    def _next_batch(self) -> list[_Job] | None:
        """The oldest job and, for a search, the waiting searches of its key that fit its budget, once
        no more has come for the quiet gap or the wait's limit is reached (see the module); None once closed."""
        with self._condition:
            while True:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if self._closed:
                    for job in self._pending:
                        job.finish(error=BatcherClosed("the server is shutting down"))
                    self._pending.clear()
                    return None
                first = self._pending[0]
                if first.future.done():  # abandoned while waiting
                    self._pending.popleft()
                    continue
                if first.call is not None:
                    return [self._pending.popleft()]
                batch, tokens = self._fitting(first)
                since = max(first.submitted, self._last_end)
                quiet = max(since, *(job.submitted for job in batch)) + max(self.max_wait,
                                                                            QUIET_SHARE * self._last_seconds)
                limit = since + max(self.max_wait, WAIT_SHARE * self._last_seconds)
                remaining = min(quiet, limit) - time.perf_counter()
                if tokens >= first.budget or remaining <= 0:
                    for job in batch:
                        self._pending.remove(job)
                    return batch
                self._condition.wait(remaining)

    def _fitting(self, first: _Job) -> tuple[list[_Job], int]:
        """The waiting searches of `first`'s key, oldest first, while their tokens fit its budget."""
        batch, tokens = [first], first.tokens
        for job in self._pending:
            if job is first or job.key != first.key or job.future.done():
                continue
            if tokens + job.tokens > first.budget:
                break
            batch.append(job)
            tokens += job.tokens
        return batch, tokens

    def _run_call(self, job: _Job) -> None:
        try:
            job.finish(job.call())
        except Exception as e:  # handed to the request that asked; the worker goes on
            job.finish(error=e)

    def _run_search(self, jobs: list[_Job]) -> None:
        sources = [ids for job in jobs for ids in job.sources]
        tokens = sum(job.tokens for job in jobs)
        start = time.perf_counter()
        try:
            found = jobs[0].search(sources)
        except Exception as e:  # every request of the batch gets the error; the worker goes on
            logger.exception("a batch of %d sentences failed", len(sources))
            for job in jobs:
                job.finish(error=e)
            return
        self._last_end = time.perf_counter()
        seconds = self._last_end - start
        self._last_seconds = seconds
        if self.on_batch is not None:
            self.on_batch(jobs[0].label, len(sources), tokens, seconds)
        offset = 0
        for job in jobs:
            info = BatchInfo(len(sources), tokens, start - job.submitted, seconds)
            job.finish((found[offset: offset + len(job.sources)], info))
            offset += len(job.sources)
