"""Server-side dynamic batching: concurrent requests share one model call.

A batch closes when it holds `max_batch_size` requests, when `max_delay_s` has passed since its
first request, or as soon as no other request is in the server: a lone request is never held
back, and under load a batch waits only for requests that are already on their way.
The batcher knows nothing of images or models: it hands a list of items to `run_batch` (on a
worker thread) and gives each caller its own entry of the returned list.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class BatchResult(Generic[ResultT]):
    """One request's share of a batch run."""

    value: ResultT
    queue_s: float
    batch_size: int


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    enqueued_at: float
    future: asyncio.Future[BatchResult[ResultT]]


class DynamicBatcher(Generic[ItemT, ResultT]):
    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], list[ResultT]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._run_batch = run_batch
        self._on_batch = on_batch  # told each batch's size, for metrics
        self._pending: deque[_Pending[ItemT, ResultT]] = deque()
        self._changed = asyncio.Event()
        self._in_server = 0  # requests between `admit` and their answer
        self._in_running_batches = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch")
        self._free_workers = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("server is shutting down"))
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a request as in the server from arrival to answer (wrap the whole handler)."""
        self._in_server += 1
        try:
            yield
        finally:
            self._in_server -= 1
            self._changed.set()

    async def submit(self, item: ItemT) -> BatchResult[ResultT]:
        """Queue one item and wait for its entry of the batch output."""
        future: asyncio.Future[BatchResult[ResultT]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, time.perf_counter(), future))
        self._changed.set()
        return await future

    async def _wait_for_change(self, timeout: float | None) -> bool:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _others_on_their_way(self) -> bool:
        return self._in_server > len(self._pending) + self._in_running_batches

    async def _collect(self) -> list[_Pending[ItemT, ResultT]]:
        while not self._pending:
            await self._wait_for_change(None)
        deadline = time.perf_counter() + self.max_delay_s
        while len(self._pending) < self.max_batch_size and self._others_on_their_way():
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not await self._wait_for_change(remaining):
                break
        size = min(self.max_batch_size, len(self._pending))
        return [self._pending.popleft() for _ in range(size)]

    async def _batch_loop(self) -> None:
        while True:
            await self._free_workers.acquire()  # collect only when a model call can start
            batch = [p for p in await self._collect() if not p.future.cancelled()]
            if not batch:
                self._free_workers.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        self._in_running_batches += len(batch)
        try:
            if self._on_batch is not None:
                self._on_batch(len(batch))
            started = time.perf_counter()
            try:
                outputs = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._run_batch, [p.item for p in batch]
                )
            except Exception as exc:  # the batch failed as a whole: every caller hears why
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                return
            for pending, output in zip(batch, outputs, strict=True):
                if not pending.future.done():
                    queue_s = started - pending.enqueued_at
                    pending.future.set_result(BatchResult(output, queue_s, len(batch)))
        finally:
            self._in_running_batches -= len(batch)
            self._free_workers.release()
