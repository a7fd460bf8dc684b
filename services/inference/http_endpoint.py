"""The HTTP side of the service, for probes and scrapers that speak no gRPC:
/healthz (the process is up), /readyz (503 until the model serves) and /metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


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
    runner = web.AppRunner(http_app(registry, is_ready), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
