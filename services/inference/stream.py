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

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.held_requests = self.held_bytes = 0
        self.room = asyncio.Condition()  # told each time an answer frees its share
        self._loop = asyncio.get_running_loop()
        self.last_moved = self._loop.time()

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

    def idle_s(self) -> float:
        """How long the stream has had nothing in flight and sent nothing (0 while it has)."""
        return 0.0 if self.held_requests else self._loop.time() - self.last_moved


async def _next_request(
    iterator: AsyncIterator[RequestT], window: _Window, idle_timeout_s: float | None
) -> object:
    """The next request or _END; StreamIdleError once idle for `idle_timeout_s`."""
    if idle_timeout_s is None:
        return await anext(iterator, _END)
    read = asyncio.ensure_future(anext(iterator, _END))
    try:
        while (idle_s := window.idle_s()) < idle_timeout_s:
            # Woken at the latest when the stream would have idled out; checked again then,
            # as an item in flight meanwhile restarts the count.
            done, _ = await asyncio.wait({read}, timeout=idle_timeout_s - idle_s)
            if done:
                return read.result()
        raise StreamIdleError(f"no request and nothing in flight for {idle_s:.0f} s")
    finally:
        read.cancel()  # nothing to cancel once it is done


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
    held = _Window(window, window_bytes)

    async def read_requests() -> None:
        iterator = aiter(requests)
        try:
            while (request := await _next_request(iterator, held, idle_timeout_s)) is not _END:
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
