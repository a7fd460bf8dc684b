"""The cap on Classify and ClassifyStream calls held at once (--max-concurrent-rpcs), and the end
of calls that idle in their places (--idle-call-timeout-s).

It bounds the memory of the calls held (a call may carry --max-message-bytes, a stream
some 32 MiB of images in flight: services/inference/stream.py). Kept by the
service rather than by gRPC's server-wide `maximum_concurrent_rpcs`, which refused health
checks too: a server busy with that many streams looked dead to its orchestrator's probe.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import grpc

from services.inference.call_pool import end_call
from services.inference.metrics import ServiceMetrics


class CallLimit:
    """At most `limit` classifier calls at once; the next is refused at once, and counted."""

    def __init__(self, limit: int, metrics: ServiceMetrics, idle_timeout_s: float) -> None:
        self.limit = limit
        self.metrics = metrics
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self.open_calls = 0  # guarded by `_lock`
        # Read when scraped: an operator sees how near the limit the server runs, at no cost
        # per call.
        metrics.open_calls.set_function(lambda: self.open_calls)
        metrics.max_open_calls.set(limit)

    def take(self) -> bool:
        """One place, if one is free (give it back when the call ends)."""
        with self._lock:
            if self.open_calls >= self.limit:
                return False
            self.open_calls += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.open_calls -= 1

    def refuse(self, method: str, context: grpc.ServicerContext) -> None:
        """End a call that found no place with RESOURCE_EXHAUSTED (counted); raises."""
        self.metrics.requests.labels(method, "RESOURCE_EXHAUSTED").inc()
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the server holds its limit of {self.limit} calls (--max-concurrent-rpcs); "
            "try again when one ends",
        )

    @contextlib.contextmanager
    def admitted(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        """Hold one place for the call while it runs, or end it with RESOURCE_EXHAUSTED."""
        if not self.take():
            self.refuse(method, context)
        try:
            yield
        finally:
            self.give_back()

    def end_idle_call(self, method: str, context: grpc.ServicerContext, what: str) -> None:
        """End a call that idled past its timeout, so that it frees its place (counted); from
        its handler's thread (raises, as context.abort does).

        Without this, a client opening calls and sending nothing held every place for good."""
        self._count_idle(method)
        message = idle_call_message(method, what, self.idle_timeout_s)
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)

    def idle_ender(self, method: str, context: grpc.ServicerContext, what: str) -> IdleEnd:
        """What a call pool's watchdog calls to end, from its own thread, a call whose request
        has not come (see IdleEnd)."""
        return IdleEnd(self, method, context, what)

    def _count_idle(self, method: str) -> None:
        self.metrics.requests.labels(method, grpc.StatusCode.DEADLINE_EXCEEDED.name).inc()
        self.metrics.idle_calls_ended.labels(method).inc()


def idle_call_message(method: str, what: str, idle_timeout_s: float) -> str:
    """What a client whose call was ended for idling reads (here and in request_wait.py)."""
    return (
        f"{method} ended by the server: {what} within {idle_timeout_s:g} s (--idle-call-timeout-s)"
    )


class IdleEnd:
    """Ends one call with DEADLINE_EXCEEDED from another thread (a call pool's watchdog),
    counted; the pool's wait then says `cancelled` to the call's handler."""

    def __init__(
        self, limit: CallLimit, method: str, context: grpc.ServicerContext, what: str
    ) -> None:
        self._limit, self._method, self._context, self._what = limit, method, context, what

    def __call__(self) -> None:
        self._limit._count_idle(self._method)
        message = idle_call_message(self._method, self._what, self._limit.idle_timeout_s)
        end_call(self._context, grpc.StatusCode.DEADLINE_EXCEEDED, message)
