"""The HTTP side of the service, for probes and scrapers that speak no gRPC:
/healthz (the process is up), /readyz (503 until the model serves) and /metrics."""

from __future__ import annotations

import asyncio
import logging
import socket

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class _UnreadableRequestsInOneLine(logging.Filter):
    """aiohttp logs a request it cannot parse as "Error handling request" at ERROR with a
    20-line traceback; a gRPC client pointed at this port (HTTP/2's `PRI *` preface) did that on
    every try. One warning line instead: the client has its 400, and nothing in the service
    failed. (aiohttp logs a bad method, a port scanner's usual noise, at debug: left as is.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.ERROR or not isinstance(error, BadHttpMessage):
            return True
        lines = str(error.message).strip().splitlines()
        reason = lines[0].rstrip(":") if lines else "unreadable"
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "a client"
        hint = " (a gRPC client belongs on the gRPC port)" if "PRI" in reason else ""
        record.msg = "%s sent a request that cannot be read as HTTP/1.x (%s): answered 400%s"
        record.args = (peer, reason, hint)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True


_UNREADABLE_REQUESTS = _UnreadableRequestsInOneLine()


def http_app(registry: CollectorRegistry, is_ready: asyncio.Event) -> web.Application:
    """The three routes; /readyz follows `is_ready`, /metrics exposes `registry`."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if is_ready.is_set():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes(
        [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]
    )
    return app


async def start_http(
    registry: CollectorRegistry, is_ready: asyncio.Event, host: str, port: int
) -> web.AppRunner:
    """Serve the routes on host:port; the caller ends them with `runner.cleanup()`."""
    logging.getLogger("aiohttp.server").addFilter(_UNREADABLE_REQUESTS)  # once: a set
    runner = web.AppRunner(http_app(registry, is_ready), access_log=None)
    await runner.setup()
    if host == "::":  # every interface of both families, as gRPC's [::] is
        await web.SockSite(runner, _dual_stack_socket(port)).start()
    else:
        await web.TCPSite(runner, host, port).start()
    return runner


def _dual_stack_socket(port: int) -> socket.socket:
    """A socket bound to `::` that takes IPv4 connections too. asyncio binds `::` IPv6-only:
    gRPC answered on the pod's IPv4 address and `/readyz` and `/metrics` did not, so an IPv4
    cluster's probes never saw the service ready (found in review, stop 62)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        raise
    return sock
