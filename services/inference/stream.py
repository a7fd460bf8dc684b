"""ClassifyStream's flow: requests worked on concurrently (so one stream fills batches), answered
in order, each counted once it ends however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from services.inference.classify import cancelled_code

# Requests of one ClassifyStream processed at once; enough to fill batches from a single stream.
STREAM_WINDOW = 32
# ... and their image bytes at most (one request always goes, whatever its size): 32 requests of
# --max-message-bytes each would hold 512 MiB for one stream (a review's stream of 64 images of
# 12.8 MB each took a server from 1.2 to 2.35 GB).
STREAM_WINDOW_BYTES = 32 * 1024 * 1024


class StreamIdleError(TimeoutError):
    """The stream had nothing in flight and sent no request for its idle timeout."""


_END = object()  # what reading a finished request stream gives

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
ItemTask = asyncio.Task[tuple[ResponseT, grpc.StatusCode]]


def start_counted_item(
    work: Awaitable[tuple[ResponseT, grpc.StatusCode]],
    context: grpc.aio.ServicerContext,
    finish: Callable[[grpc.StatusCode], None],
) -> ItemTask[ResponseT]:
    """Start one stream element; `finish` gets its status when it ends, however it ends.

    Counting in a done callback includes items cancelled before they ever ran (the stream's
    deadline passed or its client left while they waited in the window).
    """

    def count(task: ItemTask[ResponseT]) -> None:
        if task.cancelled():
            code = cancelled_code(context)
        elif task.exception() is not None:
            code = grpc.StatusCode.INTERNAL
        else:
            code = task.result()[1]
        finish(code)

    task = asyncio.ensure_future(work)
    task.add_done_callback(count)
    return task


class _Window:
    """What one stream holds: requests started and not yet answered and their bytes, and when
    it last moved (a request read or an answer sent)."""

    def __init__(self, max_requests: int, max_bytes: int, idle_timeout_s: float | None) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.held_requests = self.held_bytes = 0
        self.room = asyncio.Condition()  # told each time an answer frees its share
        self._loop = asyncio.get_running_loop()
        self.last_moved = self._loop.time()
        self.read_deadline: asyncio.Timeout | None = None  # the pending read's, if timed

    def _fits(self, nbytes: int) -> bool:  # one request always goes alone, however large
        return self.held_requests < self.max_requests and (
            self.held_bytes == 0 or self.held_bytes + nbytes <= self.max_bytes
        )

    async def take(self, nbytes: int) -> None:
        async with self.room:
            await self.room.wait_for(lambda: self._fits(nbytes))
            self.held_requests, self.held_bytes = self.held_requests + 1, self.held_bytes + nbytes

    async def release(self, nbytes: int) -> None:
        """An answer is ready: its share of the window is free, and the stream has moved (an
        item slower than the idle timeout does not leave it idle)."""
        async with self.room:
            self.held_requests, self.held_bytes = self.held_requests - 1, self.held_bytes - nbytes
            self.moved()
            self.room.notify_all()

    def moved(self) -> None:
        self.last_moved = self._loop.time()
        if self.read_deadline is not None and not self.read_deadline.expired():
            self.read_deadline.reschedule(self._idle_deadline())

    def _idle_deadline(self) -> float | None:
        """When the stream idles out: never while something is in flight."""
        if self.held_requests or self.idle_timeout_s is None:
            return None
        return self.last_moved + self.idle_timeout_s

    async def next_request(self, iterator: AsyncIterator[RequestT]) -> object:
        """The next request or _END; StreamIdleError once idle for `idle_timeout_s`. One
        timer per read, moved as the stream moves (a task and a wait per read cost 3x more)."""
        if self.idle_timeout_s is None:
            return await anext(iterator, _END)
        try:
            async with asyncio.timeout(self._idle_deadline()) as self.read_deadline:
                return await anext(iterator, _END)
        except TimeoutError:
            if not self.read_deadline.expired():
                raise  # not ours
            quiet_s = self._loop.time() - self.last_moved
            raise StreamIdleError(f"no request and nothing in flight for {quiet_s:.0f} s") from None
        finally:
            self.read_deadline = None


async def answer_in_order(
    requests: AsyncIterator[RequestT],
    start: Callable[[RequestT], ItemTask[ResponseT]],
    window: int = STREAM_WINDOW,
    size: Callable[[RequestT], int] = lambda _: 0,
    window_bytes: int = STREAM_WINDOW_BYTES,
    idle_timeout_s: float | None = None,
) -> AsyncIterator[ResponseT]:
    """Yield each request's response in request order, with at most `window` of them started
    and not yet answered, and no more than `window_bytes` of their `size` (unless one alone
    is larger): no further request is read meanwhile, so a client's stream waits in gRPC's
    flow control, not in this server's memory.

    Items answer their errors as responses, so an item task raises only if cancelled; what is
    left unanswered when the stream ends is cancelled, every started item included (an item is
    queued the moment it starts, with no await between, so an ending stream always finds it).

    With `idle_timeout_s`, a stream that has nothing in flight and sends no request for that
    long raises StreamIdleError once its answers are out: an idle client holds a call's place.
    """
    in_order: asyncio.Queue[tuple[ItemTask[ResponseT], int] | None] = asyncio.Queue()
    held = _Window(window, window_bytes, idle_timeout_s)

    async def read_requests() -> None:
        iterator = aiter(requests)
        try:
            while (request := await held.next_request(iterator)) is not _END:
                held.moved()
                nbytes = size(request)
                await held.take(nbytes)
                in_order.put_nowait((start(request), nbytes))
        finally:
            in_order.put_nowait(None)  # the answers end here, however the reading ended

    reader = asyncio.ensure_future(read_requests())
    try:
        while (item := await in_order.get()) is not None:
            task, nbytes = item
            response, _ = await task
            await held.release(nbytes)
            yield response
            held.moved()
        await reader  # surface a failure to read the request stream (or its idle timeout)
    finally:
        reader.cancel()
        while not in_order.empty():
            if (leftover := in_order.get_nowait()) is not None:
                leftover[0].cancel()
