"""The cap on Classify and ClassifyStream calls held at once (--max-concurrent-rpcs), and the end
of calls that idle in their places (--idle-call-timeout-s).

It bounds the memory of the calls held (a call may carry --max-message-bytes, a stream
some 32 MiB of images in flight: services/inference/stream.py). Kept by the
service rather than by gRPC's server-wide `maximum_concurrent_rpcs`, which refused health
checks too: a server busy with that many streams looked dead to its orchestrator's probe.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from services.inference.metrics import ServiceMetrics


class CallLimit:
    """At most `limit` classifier calls at once; the next is refused at once, and counted."""

    def __init__(self, limit: int, metrics: ServiceMetrics, idle_timeout_s: float) -> None:
        self.limit = limit
        self.metrics = metrics
        self.idle_timeout_s = idle_timeout_s
        self.open_calls = 0
        # Read when scraped: an operator sees how near the limit the server runs, at no cost
        # per call.
        metrics.open_calls.set_function(lambda: self.open_calls)
        metrics.max_open_calls.set(limit)

    @contextlib.asynccontextmanager
    async def admitted(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Hold one place for the call while it runs, or end it with RESOURCE_EXHAUSTED.

        The check and the count happen on the event loop with no await between them."""
        if self.open_calls >= self.limit:
            self.metrics.requests.labels(method, "RESOURCE_EXHAUSTED").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server holds its limit of {self.limit} calls (--max-concurrent-rpcs); "
                "try again when one ends",
            )
        self.open_calls += 1
        try:
            yield
        finally:
            self.open_calls -= 1

    async def end_idle_call(
        self, method: str, context: grpc.aio.ServicerContext, what: str
    ) -> None:
        """End a call that idled past its timeout, so that it frees its place (counted).

        Without this, a client opening calls and sending nothing held every place for good."""
        self.metrics.requests.labels(method, grpc.StatusCode.DEADLINE_EXCEEDED.name).inc()
        self.metrics.idle_calls_ended.labels(method).inc()
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"{method} ended by the server: {what} within {self.idle_timeout_s:g} s "
            "(--idle-call-timeout-s)",
        )
