"""An aiohttp app served from a background thread with its own event loop.

For local helpers that synchronous code starts and stops around its work: the sample mirror of
`make demo` and the test video server. aiohttp's own `web.run_app` blocks the calling thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web


@contextmanager
def serve_in_thread(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """Serve `app` on host:port (0: any free port) until the block ends; yields the bound port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="http-thread", daemon=True)
    # A client still reading at the end (a camera stream, a test that failed mid-read) is
    # cut after 1 s: aiohttp's 60-s wait outlasted the stop's own 10 s and hid the failure.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner.addresses[0][1]

    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
