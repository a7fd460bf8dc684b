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


async def answer_in_order(
    requests: AsyncIterator[RequestT],
    start: Callable[[RequestT], ItemTask[ResponseT]],
    window: int = STREAM_WINDOW,
    size: Callable[[RequestT], int] = lambda _: 0,
    window_bytes: int = STREAM_WINDOW_BYTES,
) -> AsyncIterator[ResponseT]:
    """Yield each request's response in request order, with at most `window` of them started
    and not yet answered, and no more than `window_bytes` of their `size` (unless one alone
    is larger): no further request is read meanwhile, so a client's stream waits in gRPC's
    flow control, not in this server's memory.

    Items answer their errors as responses, so an item task raises only if cancelled; what is
    left unanswered when the stream ends is cancelled, every started item included (an item is
    queued the moment it starts, with no await between, so an ending stream always finds it).
    """
    in_order: asyncio.Queue[tuple[ItemTask[ResponseT], int] | None] = asyncio.Queue()
    held_requests = held_bytes = 0  # started and not yet answered
    room = asyncio.Condition()  # told each time an answer frees its share of the window

    def fits(nbytes: int) -> bool:  # one request always goes alone, however large
        return held_requests < window and (held_bytes == 0 or held_bytes + nbytes <= window_bytes)

    async def read_requests() -> None:
        nonlocal held_requests, held_bytes
        async for request in requests:
            nbytes = size(request)
            async with room:
                await room.wait_for(lambda nbytes=nbytes: fits(nbytes))
                held_requests, held_bytes = held_requests + 1, held_bytes + nbytes
            in_order.put_nowait((start(request), nbytes))
        in_order.put_nowait(None)

    reader = asyncio.ensure_future(read_requests())
    try:
        while (item := await in_order.get()) is not None:
            task, nbytes = item
            response, _ = await task
            async with room:
                held_requests, held_bytes = held_requests - 1, held_bytes - nbytes
                room.notify_all()
            yield response
        await reader  # surface a failure to read the request stream
    finally:
        reader.cancel()
        while not in_order.empty():
            if (leftover := in_order.get_nowait()) is not None:
                leftover[0].cancel()
