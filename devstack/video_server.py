"""A real aiohttp server on 127.0.0.1 that serves video files and misbehaves on request.

Used by the depth tests and the depth benchmarks, which is why it lives here and not under
tests/: the benchmarks run from an installed wheel too. Each path has a behaviour (serve a
file, 404, fail with 500 a few times first, serve something that is not a video, stall
mid-body, drip bytes, ask for a login, stream as an IP camera does).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from aiohttp import encode_basic_auth, web

from devstack.http_thread import serve_in_thread


@dataclass(frozen=True)
class Serve:
    path: Path
    fail_first: int = 0  # answer 500 this many times before serving


@dataclass(frozen=True)
class Status:
    code: int


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str = "text/html"


@dataclass(frozen=True)
class Stall:
    path: Path
    after_bytes: int = 65536
    stall_s: float = 30.0


@dataclass(frozen=True)
class Drip:
    """The file `chunk` bytes per write, `every_s` apart; after `drip_bytes`
    (None: never) the rest at once. A slow link, a proxy, or a server holding a client."""

    path: Path
    chunk: int = 1
    every_s: float = 2.0
    drip_bytes: int | None = None


@dataclass(frozen=True)
class Cut:
    """The file's first `after_bytes` under its whole Content-Length, then the connection
    closed, the first `cut_first` times; whole after that (a link that dropped once)."""

    path: Path
    cut_first: int = 1
    after_bytes: int = 65536


@dataclass(frozen=True)
class Busy:
    """429 with `Retry-After: retry_after` the first `busy_first` times, then the file."""

    path: Path
    busy_first: int = 1
    retry_after: str = "2"


@dataclass(frozen=True)
class Redirect:
    location: str  # where a 302 sends the client (the request's own path: a loop)


@dataclass(frozen=True)
class Guarded:
    """The file only to a client that logs in with this HTTP basic login: a camera behind a
    password, as a URL with `user:password@` reaches it."""

    path: Path
    user: str
    password: str


@dataclass(frozen=True)
class Camera:
    """An IP camera's MJPEG stream: `frames` (JPEG bytes) one after the other, `fps` a second,
    over and over, as one multipart/x-mixed-replace body of no length, until the client leaves."""

    frames: tuple[bytes, ...]
    fps: float


Behaviour = Serve | Status | Body | Stall | Drip | Cut | Busy | Redirect | Guarded | Camera


class VideoServer:
    """Runs in its own thread with its own event loop; `url(name)` gives a route's address."""

    def __init__(self, routes: dict[str, Behaviour] | None = None) -> None:
        self.routes: dict[str, Behaviour] = dict(routes or {})
        self.requests: Counter[str] = Counter()
        self.order: list[str] = []  # the routes asked for, in the order the requests came
        self.port = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> VideoServer:
        app = web.Application()
        app.router.add_get("/{name:.+}", self._handle)
        self.port = self._stack.enter_context(serve_in_thread(app))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests[name] += 1
        self.order.append(name)
        behaviour = self.routes.get(name)
        match behaviour:
            case None:
                return web.Response(status=404, text="no such video")
            case Status(code):
                return web.Response(status=code, text=f"status {code}")
            case Body(data, content_type):
                return web.Response(body=data, content_type=content_type)
            case Redirect(location):
                raise web.HTTPFound(location)
            case Serve(path, fail_first) if self.requests[name] <= fail_first:
                return web.Response(status=500, text="try again")
            case Serve(path):
                return web.FileResponse(path)
            case Guarded(path, user, password):
                if request.headers.get("Authorization") != encode_basic_auth(user, password):
                    # FFmpeg sends the login only when challenged, and needs the realm.
                    challenge = 'Basic realm="camera"'
                    return web.Response(status=401, headers={"WWW-Authenticate": challenge})
                return web.FileResponse(path)
            case Stall(path, after_bytes, stall_s):
                response = web.StreamResponse()
                response.content_type = "video/mp4"
                await response.prepare(request)
                await response.write(path.read_bytes()[:after_bytes])
                await asyncio.sleep(stall_s)
                return response
            case Cut(path, cut_first, after_bytes) if self.requests[name] <= cut_first:
                data = path.read_bytes()
                response = web.StreamResponse(headers={"Content-Length": str(len(data))})
                response.content_type = "video/mp4"
                await response.prepare(request)
                await response.write(data[:after_bytes])
                assert request.transport is not None
                request.transport.close()  # the rest never comes
                return response
            case Cut(path):
                return web.FileResponse(path)
            case Busy(path, busy_first, retry_after) if self.requests[name] <= busy_first:
                return web.Response(status=429, headers={"Retry-After": retry_after})
            case Busy(path):
                return web.FileResponse(path)
            case Drip():
                return await _drip(request, behaviour)
            case Camera(frames, fps):
                return await _camera_stream(request, frames, fps)
        raise AssertionError(f"unknown behaviour {behaviour!r}")


async def _drip(request: web.Request, drip: Drip) -> web.StreamResponse:
    """`Drip`'s body: its file `chunk` bytes per write, `every_s` apart."""
    data = drip.path.read_bytes()
    response = web.StreamResponse(headers={"Content-Length": str(len(data))})
    response.content_type = "video/mp4"
    await response.prepare(request)
    dripped = len(data) if drip.drip_bytes is None else min(drip.drip_bytes, len(data))
    for start in range(0, dripped, drip.chunk):
        # A write goes to the socket at once; the pause keeps writes apart.
        await response.write(data[start : min(start + drip.chunk, dripped)])
        await asyncio.sleep(drip.every_s)
    await response.write(data[dripped:])
    await response.write_eof()
    return response


async def _camera_stream(
    request: web.Request, frames: tuple[bytes, ...], fps: float
) -> web.StreamResponse:
    """`Camera`'s body: each frame a part of its own, on the camera's clock."""
    response = web.StreamResponse()
    response.content_type = "multipart/x-mixed-replace"
    response.headers["Content-Type"] = "multipart/x-mixed-replace; boundary=frame"
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    started, sent = loop.time(), 0
    with contextlib.suppress(ConnectionError):  # the client left
        while True:
            jpeg = frames[sent % len(frames)]
            head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
            await response.write(head.encode() + jpeg + b"\r\n")
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / fps - loop.time()))
    return response
