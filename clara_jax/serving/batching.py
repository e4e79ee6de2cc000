"""One worker that turns concurrent requests into batches for the model.

Why: a jitted model is fastest, and compiles least, when it sees full fixed-size batches; and
generation must never run on the event loop. Requests are queued with a `kind` (which runner)
and a `key` (what must agree inside a batch, e.g. the sampling settings); the worker takes the
oldest request, every queued request with the same kind and key up to the batch size, and runs
them on a single background thread, so the device work is serialised and the loop stays free.
Admission is bounded: more than `max_pending` unanswered requests is refused (ServerBusy).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
from collections.abc import Callable, Hashable
from typing import Any


class ServerBusy(Exception):
    """Too many requests are already waiting or running."""


class ShuttingDown(Exception):
    """The worker is stopping and takes no more requests."""


@dataclasses.dataclass
class _Job:
    kind: str
    key: Hashable
    payload: Any
    future: asyncio.Future


class BatchingWorker:
    """`await worker.submit(kind, key, payload)` -> that payload's result from `runners[kind]`.

    runners[kind](payloads) receives a list of payloads sharing kind and key (at most
    max_batch[kind]) and returns one result per payload, in order. An exception fails the batch.
    """

    def __init__(
        self,
        runners: dict[str, Callable[[list], list]],
        *,
        max_batch: dict[str, int],
        max_pending: int,
        gather_seconds: float = 0.005,
    ):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        missing = set(runners) - set(max_batch)
        if missing:
            raise ValueError(f"max_batch lacks a size for {sorted(missing)}")
        self.runners, self.max_batch, self.max_pending = runners, max_batch, max_pending
        self.gather_seconds = gather_seconds
        self._jobs: collections.deque[_Job] = collections.deque()
        self._admitted = 0
        self._running = 0
        self._current: list[_Job] = []
        self._batches = 0
        self._closed = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def stats(self) -> dict:
        return {
            "in_flight": self._admitted,
            "queued": len(self._jobs),
            "running": self._running,
            "max_concurrency": self.max_pending,
            "batches_run": self._batches,
        }

    async def start(self) -> None:
        """Start the worker task on the running event loop (idempotent)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clara-jax-model")
            self._task = asyncio.create_task(self._loop(), name="clara-jax-batching")

    async def submit(self, kind: str, key: Hashable, payload: Any) -> Any:
        if kind not in self.runners:
            raise ValueError(f"no runner for {kind!r}; have {sorted(self.runners)}")
        if self._closed or self._task is None:
            raise ShuttingDown("the server is shutting down" if self._closed else "the worker is not running")
        if self._admitted >= self.max_pending:
            raise ServerBusy(
                f"{self._admitted} requests are already in flight (the limit is {self.max_pending})"
            )
        job = _Job(kind, key, payload, asyncio.get_running_loop().create_future())
        self._admitted += 1
        try:
            self._jobs.append(job)
            self._wake.set()
            return await job.future
        finally:
            self._admitted -= 1

    def _take_batch(self) -> list[_Job]:
        first = self._jobs[0]
        batch = [j for j in self._jobs if j.kind == first.kind and j.key == first.key]
        batch = batch[: self.max_batch[first.kind]]
        for job in batch:
            self._jobs.remove(job)
        return [j for j in batch if not j.future.done()]  # a disconnected client cancelled its future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                self._wake.clear()
                await self._wake.wait()
            if self.gather_seconds:  # let requests that arrive together share the first batch
                await asyncio.sleep(self.gather_seconds)
            batch = self._take_batch()
            if not batch:
                continue
            runner = self.runners[batch[0].kind]
            self._running, self._current = len(batch), batch
            try:
                results = await loop.run_in_executor(self._executor, runner, [j.payload for j in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} requests")
            except Exception as exc:  # each waiting request receives the error
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            else:
                for job, result in zip(batch, results):
                    if not job.future.done():
                        job.future.set_result(result)
            finally:
                self._running, self._current = 0, []
                self._batches += 1

    async def stop(self, drain_seconds: float = 0.0) -> None:
        """Refuse new requests, give queued ones `drain_seconds` to finish, fail the rest with
        ShuttingDown, and stop the worker (a batch already on the device runs to its end)."""
        self._closed = True
        deadline = asyncio.get_running_loop().time() + drain_seconds
        while (self._jobs or self._running) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        unanswered = [*self._jobs, *self._current]
        self._jobs.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in unanswered:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False)
