"""Graceful shutdown: no new calls, calls in flight drained within the grace, and a log line
saying what became of each call that was open."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)


# A health Watch streams until its client leaves: it is no work to drain, and shutdown must not
# wait for it (clients that check health on the client side keep one on every connection).
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
# How long a Watch ending at shutdown may take to send its NOT_SERVING first.
WATCH_LAST_WORD_S = 1.0


class _StatusSent:
    """A Watch's context that notes when NOT_SERVING has gone out (the rest passes through)."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self.not_serving = asyncio.Event()

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(response)
        if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            self.not_serving.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class CallTracker(grpc.aio.ServerInterceptor):
    """Counts the calls being handled and how they ended, so shutdown can say what it did.

    A call is drained when its handler returns or raises (any status) within the shutdown
    grace, cancelled when gRPC cancels it: by the server at the end of the grace, or because
    its client left. Health watches are counted apart (`open_watches`), not as calls, and at
    most `max_watches` are open at once: a Watch lasts as long as its client stays, and enough
    of them took every place the server keeps for health checks, so its probe read it as dead.
    """

    def __init__(self, max_watches: int | None = None) -> None:
        self.max_watches = max_watches
        self.open = 0
        self.open_watches = 0
        self.ended = 0
        self.cancelled_by_clients = 0
        self.cancelled_by_shutdown = 0
        self.grace_ends: float | None = None  # loop time; set when shutdown begins
        self._watches_end = asyncio.Event()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler_call_details.method == HEALTH_WATCH:
            return handler._replace(unary_stream=self._watched(handler.unary_stream))
        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        return handler._replace(
            **{
                kind: self._tracked(behaviour)
                for kind in kinds
                if (behaviour := getattr(handler, kind)) is not None
            }
        )

    def end_watches(self) -> None:
        """End every health Watch (now and to come) once it has sent NOT_SERVING."""
        self._watches_end.set()

    def _watched(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        """A Watch that ends (status OK) at shutdown, once its client has heard NOT_SERVING.

        gRPC's stop(grace) waits for every call, and grpc's health servicer loops in a Watch
        until its client leaves: one watcher made every stop wait out the whole grace."""

        async def watch(request: Any, context: grpc.aio.ServicerContext) -> None:
            if self.max_watches is not None and self.open_watches >= self.max_watches:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server holds its limit of {self.max_watches} health watches, which "
                    "keeps room for health checks: use Check, or watch when one ends",
                )
            self.open_watches += 1
            sent = _StatusSent(context)
            serving = asyncio.ensure_future(behaviour(request, sent))
            ending = asyncio.ensure_future(self._watches_end.wait())
            try:
                await asyncio.wait([serving, ending], return_when=asyncio.FIRST_COMPLETED)
                if serving.done():
                    return serving.result()
                with contextlib.suppress(TimeoutError):  # a service never set: nothing to say
                    await asyncio.wait_for(sent.not_serving.wait(), WATCH_LAST_WORD_S)
            finally:
                self.open_watches -= 1
                for task in (serving, ending):
                    task.cancel()

        return watch

    @contextlib.contextmanager
    def _tracking(self) -> Iterator[None]:
        self.open += 1
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: a stream abandoned
            if self._past_grace():
                self.cancelled_by_shutdown += 1
            else:
                self.cancelled_by_clients += 1
            raise
        except BaseException:
            self._count_end()
            raise
        else:
            self._count_end()
        finally:
            self.open -= 1

    def _past_grace(self) -> bool:
        loop_time = asyncio.get_running_loop().time()
        return self.grace_ends is not None and loop_time >= self.grace_ends

    def _count_end(self) -> None:
        """A handler that returned: drained, unless it outlived the grace.

        When the grace runs out gRPC cancels the call, and a stream handler may see that as the
        end of its request stream and return before gRPC cancels its task: it was cut, not
        drained.
        """
        if self._past_grace():
            self.cancelled_by_shutdown += 1
        else:
            self.ended += 1

    def _tracked(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with self._tracking():
                    async for response in behaviour(request, context):
                        yield response

            return stream
        if inspect.iscoroutinefunction(behaviour):

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with self._tracking():
                    return await behaviour(request, context)

            return call
        return behaviour  # a synchronous handler: runs in a thread; not ours, not counted

    def summary(self, ended_before: int, grace_s: float, cut_short: bool = False) -> str:
        """What shutdown did with the calls open when it began."""
        when = f"at the end of the {grace_s:.0f} s grace"
        if cut_short:
            when = "on the second stop signal"
        return (
            f"{self.ended - ended_before} call(s) drained, {self.cancelled_by_shutdown} "
            f"cancelled {when}, {self.cancelled_by_clients} cancelled by their clients"
        )


async def drain_calls(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    calls: CallTracker,
    grace_s: float,
    stop_now: asyncio.Event | None = None,
) -> None:
    """Refuse new calls, give those in flight up to `grace_s` to end, then cancel the rest;
    at once if `stop_now` is set meanwhile (a second Ctrl-C)."""
    await health_servicer.enter_graceful_shutdown()  # watchers hear NOT_SERVING
    calls.end_watches()
    calls.cancelled_by_clients = calls.cancelled_by_shutdown = 0
    ended_before, open_at_stop, watches = calls.ended, calls.open, calls.open_watches
    loop = asyncio.get_running_loop()
    calls.grace_ends = loop.time() + grace_s
    stopping = asyncio.ensure_future(server.stop(grace_s))
    cut = asyncio.ensure_future((stop_now or asyncio.Event()).wait())
    await asyncio.wait([stopping, cut], return_when=asyncio.FIRST_COMPLETED)
    cut.cancel()
    cut_short = not stopping.done()
    if cut_short:
        log.info("stopping now: cancelling the calls still open")
        calls.grace_ends = loop.time()
        await server.stop(None)  # during a graceful stop, gRPC cancels every call at once
    await stopping
    for _ in range(100):  # cancelled handlers finish on the loop just after stop returns
        if calls.open == 0:
            break
        await asyncio.sleep(0.01)
    log.info(
        "stopped: of %d call(s) open at shutdown, %s; %d health watch(es) ended with the server",
        open_at_stop,
        calls.summary(ended_before, grace_s, cut_short),
        watches,
    )
