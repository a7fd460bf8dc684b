"""Server-side dynamic batching: concurrent requests share one model call.

A batch closes when it reaches `max_batch_size`, when `max_delay_s` has passed since its first
request, or at once when no other request is on its way (still being decoded), so a lone request
is never held back. While the model runs one batch, the next one fills up. With `workers` > 1
several batches run at once (each model call then uses fewer threads), which on a small CPU
keeps the cores busy while requests are decoded, instead of stalling a call spread over all cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a batch run."""

    probabilities: np.ndarray
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass
class _Pending:
    tensor: np.ndarray
    enqueued_at: float
    future: asyncio.Future[BatchResult]


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
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
        self._pending: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._incoming = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
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
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(RuntimeError("server is shutting down"))
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark a request that will be submitted soon, so the open batch waits for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    async def submit(self, tensor: np.ndarray) -> BatchResult:
        """Queue one preprocessed input and wait for its row of the batch output."""
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(tensor, time.perf_counter(), future))
        self._arrived.set()
        return await future

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _collect(self) -> list[_Pending]:
        while not self._pending:
            await self._wait_for_arrival(None)
        deadline = time.perf_counter() + self.max_delay_s
        while len(self._pending) < self.max_batch_size and self._incoming > 0:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not await self._wait_for_arrival(remaining):
                break
        size = min(self.max_batch_size, len(self._pending))
        return [self._pending.popleft() for _ in range(size)]

    async def _batch_loop(self) -> None:
        while True:
            await self._free_workers.acquire()  # collect only when a model call can start
            batch = [item for item in await self._collect() if not item.future.cancelled()]
            if not batch:
                self._free_workers.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Pending]) -> None:
        try:
            if self._on_batch is not None:
                self._on_batch(len(batch))
            started = time.perf_counter()
            try:
                inputs = np.stack([item.tensor for item in batch])
                outputs = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._run_batch, inputs
                )
            except Exception as exc:  # the model failed: every caller in the batch hears why
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
            inference_s = time.perf_counter() - started
            for row, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result(
                        BatchResult(
                            outputs[row], started - item.enqueued_at, inference_s, len(batch)
                        )
                    )
        finally:
            self._free_workers.release()
