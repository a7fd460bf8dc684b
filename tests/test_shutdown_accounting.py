"""The shutdown log's account of open calls, on a real grpc.aio server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health

from services.inference.shutdown import CallTracker, drain_calls

GRACE_S = 1.0


async def _quick(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(0.1)  # ends well within the grace
    return request


async def _returns_when_cut(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Like a stream handler that sees its request stream end when gRPC cuts the call, and
    returns normally after the grace instead of raising CancelledError."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return request
    return request


async def _shutdown_with_calls_open() -> str:
    calls = CallTracker()
    server = grpc.aio.server(interceptors=[calls])
    handlers = {
        "Quick": grpc.unary_unary_rpc_method_handler(_quick),
        "ReturnsWhenCut": grpc.unary_unary_rpc_method_handler(_returns_when_cut),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        quick = channel.unary_unary("/t.T/Quick")(b"q")
        cut = channel.unary_unary("/t.T/ReturnsWhenCut")(b"c")
        while calls.open < 2:
            await asyncio.sleep(0.01)
        await drain_calls(server, health.aio.HealthServicer(), calls, GRACE_S)
        assert await quick == b"q"
        with pytest.raises(grpc.aio.AioRpcError):
            await cut
    return calls.summary(0, GRACE_S)


def test_a_call_that_returns_after_the_grace_is_counted_as_cut_not_drained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="services.inference.shutdown"):
        summary = asyncio.run(_shutdown_with_calls_open())
    assert summary == (
        "1 call(s) drained, 1 cancelled at the end of the 1 s grace, 0 cancelled by their clients"
    )
    assert "of 2 call(s) open at shutdown, 1 call(s) drained, 1 cancelled" in caplog.text
