"""Graceful shutdown: no new calls, calls in flight drained within the grace, and a log line
saying what became of each call that was open."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health

log = logging.getLogger(__name__)


# A health Watch streams until its client leaves: it is no work to drain, and shutdown must not
# wait for it (clients that check health on the client side keep one on every connection).
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION_INFO = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

Behaviour = Callable[..., Any]


class _Watch:
    """One open health Watch's sender (grpcio's non-blocking Watch), on a thread of its own.

    grpcio's send waits for its completion-queue thread, and grpc's health servicer sends while
    it holds its lock, which a closing Watch's callback takes on that same thread: sent in
    place, one watch opening while another closed stopped the server for good. Here a send only
    notes the latest status; this watch's thread sends it, then the end: when its call closes
    (grpc's servicer passes None), or at shutdown (`end`) once it has sent a status."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        self._send = send
        self._changed = threading.Condition()
        # Guarded by `_changed`:
        self._latest: Any = None  # a status not yet sent
        self._closed = self._ending = self._sent_one = False
        threading.Thread(target=self._run, name="health-watch", daemon=True).start()

    def __call__(self, response: Any) -> None:
        """grpc's servicer's send: a status, or None once the call has closed."""
        with self._changed:
            if response is None:
                self._closed = True
            else:
                self._latest = response
            self._changed.notify()

    def end(self) -> None:
        """End the watch (status OK) once it has sent a status: its last, NOT_SERVING."""
        with self._changed:
            self._ending = True
            self._changed.notify()

    def _ready(self) -> bool:
        return self._latest is not None or self._closed or (self._ending and self._sent_one)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(self._ready)
                response, self._latest = self._latest, None
            self._send(response)  # None: the end (an ended call takes nothing)
            if response is None:
                return
            with self._changed:
                self._sent_one = True


class CallTracker(grpc.ServerInterceptor):
    """Counts the calls being handled and how they ended, so shutdown can say what it did.

    A call is drained when its handler returns or raises (any status) within the shutdown
    grace with its call still open, cancelled when the call ended first: by the server at the
    end of the grace, or because its client left. Health watches are counted apart
    (`open_watches`), not as calls, and at most `max_watches` are open at once: a Watch lasts as
    long as its client stays, and enough of them took every place the server keeps for health
    checks, so its probe read it as dead.
    """

    def __init__(self, max_watches: int | None = None, max_reflections: int | None = None) -> None:
        self.max_watches = max_watches
        # Reflection streams last as long as their clients stay too (no token needed, none
        # idles out): 320 of them, sending nothing, took every place the server has, and health
        # checks and Classify were refused by gRPC itself.
        self.max_reflections, self._reflections = max_reflections, 0
        self._lock = threading.Lock()
        # Guarded by `_lock`:
        self.open = 0
        self.ended = 0
        self.cancelled_by_clients = 0
        self.cancelled_by_shutdown = 0
        self._watches: set[_Watch] = set()
        self._ending = False  # watches opening from now on end at once (shutdown)
        self.grace_ends: float | None = None  # time.monotonic(); set when shutdown begins
        self._ended_at_grace = 0  # `ended` when it was set

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        if handler_call_details.method == HEALTH_WATCH:
            return handler._replace(unary_stream=self._watched(handler.unary_stream))
        if handler_call_details.method == REFLECTION_INFO and self.max_reflections is not None:
            handler = handler._replace(stream_stream=self._limited(handler.stream_stream))
        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        return handler._replace(
            **{
                kind: self._tracked(behaviour, kind.endswith("_stream"))
                for kind in kinds
                if (behaviour := getattr(handler, kind)) is not None
            }
        )

    def end_watches(self) -> None:
        """End every health Watch, open or to come, once it has sent its status; call once the
        health servicer is set to NOT_SERVING.

        gRPC's stop(grace) waits for every call, and a Watch lasts until its client leaves:
        one watcher made every stop wait out the whole grace."""
        with self._lock:
            self._ending = True
            watches = list(self._watches)
        for watch in watches:
            watch.end()

    def _watched(self, behaviour: Behaviour) -> Behaviour:
        """grpc's non-blocking Watch, counted, limited and ended at shutdown (end_watches)."""

        def watch(request: Any, context: grpc.ServicerContext, send: Any) -> None:
            with self._lock:
                refused = self.max_watches is not None and len(self._watches) >= self.max_watches
                if not refused:
                    sender = _Watch(send)
                    self._watches.add(sender)
            if refused:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server holds its limit of {self.max_watches} health watches, which "
                    "keeps room for health checks: use Check, or watch when one ends",
                )
            if not context.add_callback(lambda: self._forget(sender)):
                self._forget(sender)  # its client has left already
                return
            behaviour(request, context, sender)
            with self._lock:
                ending = self._ending
            if ending:  # opened during shutdown: after end_watches' look
                sender.end()

        watch.experimental_non_blocking = True  # type: ignore[attr-defined]
        return watch

    def _limited(self, behaviour: Behaviour) -> Behaviour:
        """A reflection stream, refused past `max_reflections` open at once."""

        def stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            with self._lock:
                refused = self._reflections >= (self.max_reflections or 0)
                self._reflections += not refused
            if refused:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server holds its limit of {self.max_reflections} reflection streams, "
                    "which keeps room for health checks: try again when one ends",
                )
            try:
                yield from behaviour(requests, context)
            finally:
                with self._lock:
                    self._reflections -= 1

        return _like(behaviour, stream)

    def _forget(self, watch: _Watch) -> None:
        """Its call has closed: its thread ends (grpc's servicer may not have told it yet)."""
        with self._lock:
            self._watches.discard(watch)
        watch(None)

    def _tracked(self, behaviour: Behaviour, streams_responses: bool) -> Behaviour:
        if streams_responses:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                finish = self._opened(context)
                try:
                    yield from behaviour(request, context)
                finally:
                    finish(cut=not context.is_active())

            return _like(behaviour, stream)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            finish = self._opened(context)
            try:
                return behaviour(request, context)
            finally:
                finish(cut=not context.is_active())

        return _like(behaviour, call)

    def _opened(self, context: grpc.ServicerContext) -> Callable[..., None]:
        """Count one call open; what to call once when it ends (cut: its call ended first).

        A stream whose call ends while its handler waits is counted cut when the call ends
        (grpcio stops reading its responses and may never resume the handler)."""
        once = threading.Lock()

        def finish(cut: bool) -> None:
            if not once.acquire(blocking=False):
                return
            with self._lock:
                self.open -= 1
                past_grace = self.past_grace()
                if cut and past_grace:
                    self.cancelled_by_shutdown += 1
                elif cut:
                    self.cancelled_by_clients += 1
                elif past_grace:  # returned after the grace: gRPC had cut it, not drained
                    self.cancelled_by_shutdown += 1
                else:
                    self.ended += 1

        with self._lock:
            self.open += 1
        context.add_callback(lambda: finish(cut=True))  # if the handler has not finished by then
        return finish

    def start_grace(self, grace_s: float) -> None:
        """Shutdown begins: calls ending from here are counted for it, those past `grace_s`
        as cut."""
        with self._lock:
            self.cancelled_by_clients = self.cancelled_by_shutdown = 0
            self._ended_at_grace = self.ended
            self.grace_ends = time.monotonic() + grace_s

    def past_grace(self) -> bool:
        return self.grace_ends is not None and time.monotonic() >= self.grace_ends

    def outcomes(self) -> tuple[int, int, int, int]:
        """Calls drained, cancelled by shutdown, cancelled by their clients since the grace
        began, and calls still open."""
        with self._lock:
            drained = self.ended - self._ended_at_grace
            return drained, self.cancelled_by_shutdown, self.cancelled_by_clients, self.open


def summary(calls: CallTracker, counted_open: int, grace_s: float, cut_short: bool = False) -> str:
    """What shutdown did with the calls open when it began.

    `counted_open` (handlers begun plus calls queued for a thread, read one after the other
    while calls come and go) can miss a call that moved between the two, or ended between the
    reads: each call that ended since the grace began is counted once, by its outcome, so the
    figure is never below their sum. Calls counted open that no handler ever began (queued ones
    gRPC cut at the end of the grace, or whose clients left first) are counted cancelled."""
    drained, by_shutdown, by_clients, still_open = calls.outcomes()
    never_begun = max(0, counted_open - (drained + by_shutdown + by_clients + still_open))
    when = f"at the end of the {grace_s:.0f} s grace"
    if cut_short:
        when = "on the second stop signal"
    if cut_short or calls.past_grace():
        by_shutdown += never_begun
    else:
        by_clients += never_begun
    open_at_stop = max(counted_open, drained + by_shutdown + by_clients + still_open)
    return (
        f"of {open_at_stop} call(s) open at shutdown, {drained} call(s) drained, "
        f"{by_shutdown} cancelled {when}, {by_clients} cancelled by their clients"
    )


def _like(inner: Behaviour, outer: Behaviour) -> Behaviour:
    """`outer`, run on the pool `inner` asked for (its `experimental_thread_pool`)."""
    pool = getattr(inner, "experimental_thread_pool", None)
    if pool is not None:
        outer.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return outer


async def drain_calls(
    server: grpc.Server,
    health_servicer: health.HealthServicer,
    calls: CallTracker,
    grace_s: float,
    stop_now: asyncio.Event | None = None,
    queued: Callable[[], int] = lambda: 0,
) -> None:
    """Refuse new calls, give those in flight up to `grace_s` to end, then cancel the rest;
    at once if `stop_now` is set meanwhile (a second Ctrl-C). `queued` counts the calls taken
    and waiting for a thread of the server's pools: open too, though no handler has begun."""
    watches = calls.open_watches
    # Watchers hear NOT_SERVING, then their watches end (in that order, on each one's thread).
    await asyncio.to_thread(health_servicer.enter_graceful_shutdown)
    await asyncio.to_thread(calls.end_watches)
    calls.start_grace(grace_s)
    counted_open = calls.open + queued()
    stopped = server.stop(grace_s)
    stopping = asyncio.ensure_future(asyncio.to_thread(stopped.wait))
    cut = asyncio.ensure_future((stop_now or asyncio.Event()).wait())
    await asyncio.wait([stopping, cut], return_when=asyncio.FIRST_COMPLETED)
    cut.cancel()
    cut_short = not stopping.done()
    if cut_short:
        log.info("stopping now: cancelling the calls still open")
        calls.grace_ends = time.monotonic()
        # During a graceful stop, gRPC cancels every call at once.
        await asyncio.to_thread(server.stop, None)
    await stopping
    for _ in range(100):  # cancelled handlers finish on their threads just after stop returns
        if calls.open == 0:
            break
        await asyncio.sleep(0.01)
    log.info(
        "stopped: %s; %d health watch(es) ended with the server",
        summary(calls, counted_open, grace_s, cut_short),
        watches,
    )
