"""A token the service wants with every classifier call (VIDFLOW_INFERENCE_AUTH_TOKEN).

Off by default: the service binds loopback. Once it listens where others can reach it (a GPU
box, a cluster), a token stops anyone who can reach the port from using its model. Health
checks and reflection stay open, so an orchestrator's probe needs no secret. Clients send the
token as gRPC's standard `authorization: Bearer` call credentials, which gRPC sends only over
TLS or to a loopback address (`services/inference/client.py`).

Hand-written as a server interceptor because grpcio has no server-side check of call
credentials; it is ~20 lines.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from services.inference.metrics import ServiceMetrics

# What the token guards: the classifier's methods (health and reflection stay open).
GUARDED_SERVICE = "/vidflow.inference.v1.Classifier/"


# The calls vidflow_inference_requests_total counts
CLASSIFY_METHODS = frozenset({"Classify", "ClassifyStream"})


class TokenCheck(grpc.ServerInterceptor):
    """Refuses a classifier call without the token with UNAUTHENTICATED (counted)."""

    def __init__(self, token: str, metrics: ServiceMetrics) -> None:
        self._expected = token.encode()
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(GUARDED_SERVICE):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        given = given.encode() if isinstance(given, str) else given
        if given is not None and hmac.compare_digest(_bearer_token(given), self._expected):
            return handler
        name = method.rsplit("/", 1)[-1]
        self._metrics.unauthenticated.labels(name).inc()
        if name in CLASSIFY_METHODS:  # that counter's subject: GetModelInfo's calls are not in it
            self._metrics.requests.labels(name, grpc.StatusCode.UNAUTHENTICATED.name).inc()
        # Client-streaming whatever the method: gRPC runs such a handler when the call opens,
        # so a caller that never sends its request is refused at once instead of holding one
        # of the server's threads (the wire format is the same for every kind).
        return _NO_TOKEN if given is None else _WRONG_TOKEN


def _bearer_token(authorization: bytes) -> bytes:
    """The token of an `authorization` value: after its scheme, which HTTP matches without
    case (grpcurl users write `bearer`); b"" for any other scheme."""
    scheme, _, token = authorization.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _refusal(message: str) -> grpc.RpcMethodHandler:
    def refuse(requests: Iterator[Any], context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_unary_rpc_method_handler(refuse)


_NO_TOKEN = _refusal("this service wants a token: set VIDFLOW_INFERENCE_AUTH_TOKEN for the client")
# A client with the variable set to another value was told to set it (found in a README walk).
_WRONG_TOKEN = _refusal(
    "the token sent is not this service's: check VIDFLOW_INFERENCE_AUTH_TOKEN on the client"
)
