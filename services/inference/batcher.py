"""Server-side dynamic batching: concurrent requests share one model call.

A batch closes when it holds `max_batch_size` requests, when `max_delay_s` has passed since its
first request, or as soon as no other request is on its way (admitted but not yet queued): a
lone request is never held back, and under load a batch waits only for requests that are already
in the server. The batcher knows nothing of images or models: it hands a list of items to
`run_batch` and gives each caller its own entry of the returned list.

Each model worker is a thread that takes its next batch itself the moment its last one is done,
as the model instances behind Triton's dynamic batcher do. Handing batches out from an event
loop instead left each worker idle 0.8 ms (3 ms at p90) between batches, waiting for the loop to
get a core and dispatch: 5-7 % of the CPU at concurrency 8 on 2 cores (docs/benchmarks.md).
The queue is a deque under a lock, each worker waits on a `threading.Condition` of its own on
that lock, and each request's result is a `concurrent.futures.Future` that its caller (a gRPC
handler thread) waits on. A request handed straight to a worker wakes the worker that
went idle last, as a LIFO thread pool does: its memory is still warm in the caches. Waking the
one idle longest made the three workers take turns at two requests in flight; on 2 cores that
did 117.6 img/s against 132.9 (docs/benchmarks.md).

Batching is worth its queueing only where the model does more images per second in batches, as
on a GPU; on a CPU where an image costs the same at batch 1 and 8 holding requests only adds
latency. `choose_batch_size` measures that on the device at hand (`--batching auto`); a
batcher with `max_batch_size` 1 dispatches each request to the next free worker at once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
log = logging.getLogger(__name__)
# How long closing waits for the batches being run (the drain before it waited for their calls)
CLOSE_WAIT_S = 10.0


@dataclass(frozen=True)
class BatchResult(Generic[ResultT]):
    """One request's share of a batch run."""

    value: ResultT
    queue_s: float
    batch_size: int


@dataclass(eq=False)  # compared by identity: a cancelled request removes exactly its own entry
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    enqueued_at: float
    future: Future[BatchResult[ResultT]]


@dataclass
class Admission(Generic[ItemT, ResultT]):
    """A request counted as on its way to the batcher until it submits its item."""

    batcher: DynamicBatcher[ItemT, ResultT]
    submitted: bool = field(default=False, init=False)

    def submit(self, item: ItemT) -> Future[BatchResult[ResultT]]:
        """Queue the item; its future holds its entry of the batch output (cancel it to take
        the item back if no batch has taken it yet)."""
        self.submitted = True
        return self.batcher._queue(item)


class DynamicBatcher(Generic[ItemT, ResultT]):
    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], list[ResultT]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        workers: int = 1,
        worker_niceness: int = 0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.workers = workers
        self.worker_niceness = worker_niceness
        self._run_batch = run_batch
        self._on_batch = on_batch  # told each batch's size (from a worker thread), for metrics
        self._lock = threading.Lock()
        # Guarded by `_lock`:
        self._pending: deque[_Pending[ItemT, ResultT]] = deque()
        self._on_their_way = 0  # admitted requests that have not submitted yet
        self._closing = False
        self._wakeups: list[threading.Condition] = []  # one per worker, on `_lock`
        self._idle: list[threading.Condition] = []  # the wakeups of idle workers, last idle last
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._wakeups = [threading.Condition(self._lock) for _ in range(self.workers)]
        self._threads = [
            threading.Thread(target=self._work, args=(wakeup,), name=f"batch-{index}", daemon=True)
            for index, wakeup in enumerate(self._wakeups)
        ]
        for thread in self._threads:
            thread.start()

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Let the batches being run finish (for up to `timeout_s`: a model call that never
        returns, a wedged GPU, held the server's exit for good), then fail whatever is still
        queued."""
        with self._lock:
            self._closing = True
            self._wake_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if stuck := [thread.name for thread in self._threads if thread.is_alive()]:
            log.error("model call(s) of %s still running after %.0f s: left behind as the "
                      "server exits", ", ".join(stuck), timeout_s)  # fmt: skip
        with self._lock:
            # Taken as running, as a batch is: a caller's cancel (grpc's stop cancels every
            # call at once) between `_fail`'s look and its set_exception raised in shutdown.
            leftovers = [p for p in self._pending if p.future.set_running_or_notify_cancel()]
            self._pending = deque()
        _fail(leftovers, RuntimeError("server is shutting down"))

    @contextlib.contextmanager
    def admit(self) -> Iterator[Admission[ItemT, ResultT]]:
        """Count a request as on its way from arrival until it submits (wrap the handler)."""
        admission = Admission(self)
        with self._lock:
            self._on_their_way += 1
        try:
            yield admission
        finally:
            if not admission.submitted:  # it left without queueing: stop waiting for it
                with self._lock:
                    self._on_their_way -= 1
                    self._wake_all()

    def _queue(self, item: ItemT) -> Future[BatchResult[ResultT]]:
        """Queue an admitted request's item; its future gets its entry of the batch output."""
        future: Future[BatchResult[ResultT]] = Future()
        pending = _Pending(item, time.perf_counter(), future)
        with self._lock:
            self._on_their_way -= 1  # no longer on its way: queued or refused
            if self._closing:
                raise RuntimeError("server is shutting down")
            self._pending.append(pending)
            if self.max_batch_size == 1:
                # Direct dispatch: one free worker takes it; waking every idle one would only
                # have the rest take the lock, find nothing and sleep again.
                self._wake_last_idle()
            else:  # a worker holding a batch open must see it grow
                self._wake_all()
        future.add_done_callback(lambda done: self._withdraw(pending) if done.cancelled() else None)
        return future

    def _withdraw(self, pending: _Pending[ItemT, ResultT]) -> None:
        """A cancelled request's caller is gone: do not spend the model on it."""
        with self._lock, contextlib.suppress(ValueError):
            self._pending.remove(pending)

    # ---- worker threads --------------------------------------------------------------------

    def _wake_all(self) -> None:
        """Have every worker look again (closing, a batch growing, a request that left)."""
        for wakeup in self._wakeups:
            wakeup.notify()

    def _wake_last_idle(self) -> None:
        """Wake the worker that went idle last, if any; a busy one looks when it is done."""
        if self._idle:
            self._idle.pop().notify()

    def _next_batch(self, wakeup: threading.Condition) -> list[_Pending[ItemT, ResultT]] | None:
        """Wait (on this worker's `wakeup`) for a batch to close and take it; None once the
        batcher is closing."""
        with self._lock:
            while True:
                if self._closing:
                    return None
                if not self._pending:
                    self._idle.append(wakeup)
                    try:
                        wakeup.wait()
                    finally:  # still listed if woken by `_wake_all`
                        with contextlib.suppress(ValueError):
                            self._idle.remove(wakeup)
                    continue
                deadline = self._pending[0].enqueued_at + self.max_delay_s
                while (
                    not self._closing
                    and 0 < len(self._pending) < self.max_batch_size
                    and self._on_their_way > 0
                    and (remaining := deadline - time.perf_counter()) > 0
                ):
                    wakeup.wait(remaining)
                if self._pending:  # another worker may have taken them while this one waited
                    size = min(self.max_batch_size, len(self._pending))
                    batch = [self._pending.popleft() for _ in range(size)]
                    # Taken: from here a cancel no longer withdraws it (its result is dropped).
                    return [p for p in batch if p.future.set_running_or_notify_cancel()]

    def _work(self, wakeup: threading.Condition) -> None:
        lower_this_thread(self.worker_niceness)
        while (batch := self._next_batch(wakeup)) is not None:
            if not batch:  # every request of it was cancelled meanwhile
                continue
            started = time.perf_counter()
            try:  # nothing may end this thread but closing: its callers would wait forever
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                outputs = self._run_batch([pending.item for pending in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(
                        f"the model returned {len(outputs)} results for a batch of {len(batch)}"
                    )
            except Exception as exc:  # the batch failed as a whole: every caller hears why
                _fail(batch, exc)
            else:
                _deliver(batch, outputs, started)


def lower_this_thread(niceness: int) -> None:
    """Run the calling thread `niceness` steps below the others of its process (Linux only:
    there a thread has its own nice value; elsewhere this would lower the whole process).

    A model worker is lowered so that gRPC's threads, which receive requests and hand results
    back, take a core the moment they have work instead of waiting for a worker
    running the model to be descheduled; the model gets every cycle they leave. Measured on 2
    cores (docs/benchmarks.md, service_sweep) the gain is small: at concurrency 2 119.5-120.2
    img/s against 111.9-117.5 unlowered, p99 at 16 127-128 ms against 132; within noise at 8.
    """
    if niceness and sys.platform.startswith("linux"):
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + niceness))


def _deliver(batch: list[_Pending[ItemT, ResultT]], outputs: list[ResultT], started: float) -> None:
    for pending, output in zip(batch, outputs, strict=True):
        if not pending.future.done():
            queue_s = started - pending.enqueued_at
            pending.future.set_result(BatchResult(output, queue_s, len(batch)))


def _fail(batch: list[_Pending[ItemT, ResultT]], exc: Exception) -> None:
    """Each caller gets an error of its own, of `exc`'s type and caused by it: one instance
    re-raised in many threads gathered every caller's frames in its traceback (and kept their
    requests alive with them)."""
    for pending in batch:
        if not pending.future.done():
            try:
                own = copy.copy(exc)
            except Exception:  # an error that cannot be copied: its words
                own = RuntimeError(str(exc))
            own.__cause__ = exc
            pending.future.set_exception(own)


@dataclass(frozen=True)
class BatchingChoice:
    """The largest batch to form (1: dispatch each request alone) and the figures behind it."""

    max_batch_size: int
    reason: str
    images_per_s_at_1: float | None = None
    images_per_s_at_max: float | None = None


MIN_TIMED_CALLS = 3


def images_per_s(
    run: Callable[[int], object], batch_size: int, callers: int, duration_s: float
) -> float:
    """Images/s of `callers` threads each calling `run(batch_size)` back to back: one call
    untimed, then for `duration_s` and at least `MIN_TIMED_CALLS` calls each.

    As many callers as model workers: the shape the model runs in under load. A slow model's
    figure rested on one call that took longer than the window (an eager model's batch of 8
    on a busy CPU), the first after a change of batch size, which may reallocate: a start-up
    judged batching worth 8x on a CPU, where it costs.
    """

    def back_to_back() -> float:
        run(batch_size)
        started, calls = time.perf_counter(), 0
        while calls < MIN_TIMED_CALLS or time.perf_counter() < started + duration_s:
            run(batch_size)
            calls += 1
        return calls * batch_size / (time.perf_counter() - started)

    with ThreadPoolExecutor(callers) as pool:
        return sum(pool.map(lambda _: back_to_back(), range(callers)))


def choose_batch_size(
    mode: Literal["auto", "on", "off"],
    max_batch_size: int,
    run: Callable[[int], object],
    *,
    callers: int,
    min_speedup: float,
    duration_s: float = 0.25,
    rounds: int = 3,
) -> BatchingChoice:
    """Batch (up to `max_batch_size`) when asked to, or in `auto` when it measurably pays.

    `auto` times `run` (one model call of the given batch size) at batch 1 and at the largest
    batch, in alternating rounds, keeping each size's best round against a noisy machine; it
    batches only if the largest batch does at least `min_speedup` times batch 1's images/s.
    """
    if mode == "off" or max_batch_size == 1:
        return BatchingChoice(1, "--batching off" if mode == "off" else "--max-batch-size 1")
    if mode == "on":
        return BatchingChoice(max_batch_size, "--batching on")
    at_1: list[float] = []
    at_max: list[float] = []
    for _ in range(rounds):
        at_1.append(images_per_s(run, 1, callers, duration_s))
        at_max.append(images_per_s(run, max_batch_size, callers, duration_s))
    single, batched = max(at_1), max(at_max)
    pays = batched >= min_speedup * single
    return BatchingChoice(
        max_batch_size if pays else 1,
        f"--batching auto: batch {max_batch_size} does {batched / single:.2f}x the images/s of "
        f"batch 1 ({batched:.0f} against {single:.0f}), batching "
        f"{'pays' if pays else 'does not pay'} (needs {min_speedup:.2f}x)",
        single,
        batched,
    )
