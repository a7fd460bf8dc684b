"""A call of one request (health Check and Watch, GetModelInfo) waits for it at most
--idle-call-timeout-s, and holds no thread's slot meanwhile.

grpcio's synchronous server runs a handler that takes one request only once that request has
arrived, and waits for it on one of its pool's threads. A call whose request never came reached
no code of ours and held that thread until its deadline, for good without one: a handful of such
calls would stop every health check, and an orchestrator's probe then took a busy server for a
dead one. Served as calls that read their request themselves inside a `CallPool`'s wait, such
calls give their thread's slot to the next call while they wait and end once the timeout
passes. `Classify` does the same in its own handler (servicer.ClassifyCall), where it also
counts the call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from services.inference.call_limit import idle_call_message
from services.inference.call_pool import CallPool, end_call
from services.inference.metrics import ServiceMetrics

Behaviour = Callable[..., Any]


class RequestWait(grpc.ServerInterceptor):
    """Serves every handler of one request as a handler of a request stream that reads that
    request within `idle_timeout_s` on `pool`, then runs the handler with it there."""

    def __init__(self, pool: CallPool, idle_timeout_s: float, metrics: ServiceMetrics) -> None:
        self.pool = pool
        self.idle_timeout_s = idle_timeout_s
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return handler._replace(
                request_streaming=True,
                unary_unary=None,
                stream_unary=self._on_pool(self._answering(method, handler.unary_unary)),
            )
        return handler._replace(
            request_streaming=True,
            unary_stream=None,
            stream_stream=self._on_pool(self._streaming(method, handler.unary_stream)),
        )

    def _on_pool(self, behaviour: Behaviour) -> Behaviour:
        behaviour.experimental_thread_pool = self.pool  # type: ignore[attr-defined]
        return behaviour

    def _answering(self, method: str, behaviour: Behaviour) -> Behaviour:
        def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behaviour(self._request(method, requests, context), context)

        return call

    def _streaming(self, method: str, behaviour: Behaviour) -> Behaviour:
        if getattr(behaviour, "experimental_non_blocking", False):  # health Watch

            def watch(requests: Iterator[Any], context: grpc.ServicerContext, send: Any) -> None:
                behaviour(self._request(method, requests, context), context, send)

            watch.experimental_non_blocking = True  # type: ignore[attr-defined]
            return watch

        def stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            yield from behaviour(self._request(method, requests, context), context)

        return stream

    def _request(self, method: str, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The call's request. A call without one ends here: DEADLINE_EXCEEDED past the timeout
        (counted), INVALID_ARGUMENT when its client closed without sending one. The read of a
        call that ended raises grpc.RpcError, which grpcio takes as that end, quietly."""
        end = functools.partial(self._end_idle, method, context)
        with self.pool.waiting_for_request(context, end):
            request = next(requests, None)
        if request is None:  # sent only if the call is still open
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")
        return request

    def _end_idle(self, method: str, context: grpc.ServicerContext) -> None:
        self.metrics.idle_calls_ended.labels(method).inc()
        what = "its request has not arrived"
        message = idle_call_message(method, what, self.idle_timeout_s)
        end_call(context, grpc.StatusCode.DEADLINE_EXCEEDED, message)
