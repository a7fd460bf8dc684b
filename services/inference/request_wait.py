"""A call of one request (health Check and Watch, GetModelInfo) waits for it at most
--idle-call-timeout-s.

gRPC runs a handler that takes one request only once that request has arrived. A call whose
request never came reached no code of ours and held one of the server's places
(`maximum_concurrent_rpcs`) until its deadline, for good without one: 32 such calls, the room
the server keeps beside the classifier's own limit, refused every health check after them,
and an orchestrator's probe then took a busy server for a dead one. Served as calls that read
their request themselves, such calls end once the timeout passes. `Classify` does the same in
its own handler (servicer.ClassifyCall), where it also counts the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc._cython.cygrpc import ExecuteBatchError

from services.inference.metrics import ServiceMetrics

Behaviour = Callable[..., Any]


class RequestWait(grpc.aio.ServerInterceptor):
    """Serves every handler of one request as a handler of a request stream that reads that
    request within `idle_timeout_s`, then runs the handler with it."""

    def __init__(self, idle_timeout_s: float, metrics: ServiceMetrics) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            return handler._replace(
                request_streaming=True,
                unary_unary=None,
                stream_unary=self._answering(method, handler.unary_unary),
            )
        if handler.unary_stream is not None and (
            inspect.iscoroutinefunction(handler.unary_stream)  # answers with context.write
            or inspect.isasyncgenfunction(handler.unary_stream)
        ):
            return handler._replace(
                request_streaming=True,
                unary_stream=None,
                stream_stream=self._streaming(method, handler.unary_stream),
            )
        return handler  # a synchronous handler runs in a thread of gRPC's: left as it is

    def _answering(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await behaviour(await self._request(method, requests, context), context)

        return call

    def _streaming(self, method: str, behaviour: Behaviour) -> Behaviour:
        if inspect.iscoroutinefunction(behaviour):
            return self._answering(method, behaviour)

        async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            request = await self._request(method, requests, context)
            async for response in behaviour(request, context):
                yield response

        return stream

    async def _request(
        self, method: str, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> Any:
        """The call's request; a call without one ends here: DEADLINE_EXCEEDED past the
        timeout (counted), INVALID_ARGUMENT when its client closed without sending one, and
        quietly when it was cancelled."""
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                return await anext(aiter(requests))
        except TimeoutError:
            self.metrics.idle_calls_ended.labels(method).inc()
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{method} ended by the server: its request has not arrived within "
                f"{self.idle_timeout_s:g} s (--idle-call-timeout-s)",
            )
        except (StopAsyncIteration, asyncio.CancelledError, grpc.aio.UsageError):
            # As in ClassifyCall: only answering tells a half-close from a call that ended.
            if context.time_remaining() != 0:
                with contextlib.suppress(ExecuteBatchError):  # failed: the client has gone
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request"
                    )
            raise asyncio.CancelledError from None  # nobody to answer: end quietly
        raise AssertionError("unreachable")  # context.abort always raises
