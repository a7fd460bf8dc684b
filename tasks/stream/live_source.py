"""Live sources (cameras, RTSP and other network streams) read so that a slow publisher drops
frames rather than falling behind.

A camera or a network stream does not wait for its reader: OpenCV (and the camera driver or
FFmpeg's network buffer under it) queues what arrives, and `read()` hands back the oldest
frame. A producer that is late once, behind a slow broker or a busy CPU, then publishes frames
seconds old for the rest of the run, each a little older, and a live view falls further behind.
`LatestFrame` reads the source on a thread of its own and keeps only the newest frame: what is
not taken before the next one arrives is dropped (and counted), as a live pipeline does.
(OpenCV's `CAP_PROP_BUFFERSIZE` would do it only for some camera back ends, never for FFmpeg's
network streams, hence this thread.)

A camera that drops out (a network blip, a restarted RTSP server, a replugged USB camera) is
opened again, with backoff, for up to `reconnect_s` after its frames stop, as camera pipelines
such as DeepStream's and Frigate's do; only a source gone for longer is lost.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import math
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from common.backoff import jittered_backoff_s
from common.urls import shown_url, without_userinfo

log = logging.getLogger(__name__)

# URL schemes of streams that run whether or not they are read (http(s) may be a file too)
LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "rtp", "udp", "tcp", "srt"})
# How long the question of what an http(s) source's server sends waits for its answer
SERVED_PROBE_TIMEOUT_S = 5.0
MANIFEST_MAX_BYTES = 1 << 20  # a served body this small is read to see if it is a manifest
# How long closing waits for the reading thread's last `read()` (at most one frame period on a
# working source; FFmpeg's own timeout on a stalled one)
CLOSE_WAIT_S = 2.0
# The backoff between attempts to open a lost source again: first wait, longest wait
REOPEN_FIRST_WAIT_S = 0.25
REOPEN_MAX_WAIT_S = 5.0


def is_live(source: str) -> bool:
    """Whether `source` runs on its own clock: a webcam or a stream URL, not a file."""
    if source.startswith("webcam:"):
        return True
    return urlsplit(source).scheme.lower() in LIVE_SCHEMES


def has_no_end(source: str, capture: cv2.VideoCapture) -> bool:
    """Whether an http(s) source, opened, is a stream with no end (an IP camera's MJPEG, a
    live HLS playlist), which runs on its own clock too. OpenCV counts no frames in one, but
    none in some files either (a raw .mjpeg): what the server says decides (`_served_live`)."""
    if urlsplit(source).scheme.lower() not in ("http", "https"):
        return False
    return capture.get(cv2.CAP_PROP_FRAME_COUNT) <= 0 and _served_live(source)


def _served_live(url: str) -> bool:
    """What the server says of `url`'s body: a multipart stream (an IP camera's MJPEG), a
    manifest still growing (a live HLS playlist: no #EXT-X-ENDLIST; a dynamic DASH one) or a
    body of no stated length is live; a file served with its length is not (read live, a file
    of frames OpenCV does not count played at the reader's pace and was opened again at its
    end, for ever). Asked as FFmpeg asks (its user agent, a login only when challenged, a TLS
    certificate not checked); unanswered (a camera that takes one client, held by the capture
    just opened), live."""
    parts, plain = urlsplit(url), without_userinfo(url)
    logins = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    if parts.username is not None:
        logins.add_password(None, plain, unquote(parts.username), unquote(parts.password or ""))
    unchecked = ssl.create_default_context()
    unchecked.check_hostname, unchecked.verify_mode = False, ssl.CERT_NONE
    opener = urllib.request.build_opener(
        urllib.request.HTTPBasicAuthHandler(logins),
        urllib.request.HTTPDigestAuthHandler(logins),
        urllib.request.HTTPSHandler(context=unchecked),
    )
    request = urllib.request.Request(plain, headers={"User-Agent": "Lavf"})
    try:
        with opener.open(request, timeout=SERVED_PROBE_TIMEOUT_S) as response:
            if response.headers.get_content_type().startswith("multipart/"):
                return True
            length = response.headers.get("Content-Length")
            if length is None:
                return True
            return int(length) <= MANIFEST_MAX_BYTES and _live_manifest(response.read())
    except (OSError, ValueError, http.client.HTTPException) as exc:
        log.info("%s: its server could not be asked what it sends (%s): read live",
                 shown_url(url), exc)  # fmt: skip
        return True


def _live_manifest(body: bytes) -> bool:
    """Whether a small body is a live stream's manifest (of any content type: many stores serve
    an HLS playlist as octet-stream or plain text)."""
    head = body.lstrip()[:4096]
    if head.startswith(b"#EXTM3U"):
        return b"#EXT-X-ENDLIST" not in body
    return b"<MPD" in head and b'type="dynamic"' in body


@contextlib.contextmanager
def open_live(
    target: str | int, shown: str, reconnect_s: float, capture: cv2.VideoCapture | None = None
) -> Iterator[LatestFrame]:
    """A live source's `LatestFrame` (on `capture`, where one is open on it already), its
    capture released when the block ends (or, where the reading thread is still inside a
    `read()`, as soon as that returns). ValueError where OpenCV cannot open it at first (a
    source that drops out later is opened again)."""
    latest = LatestFrame(
        capture or cv2.VideoCapture(target),
        name=f"live-{shown}",
        reopen=target,
        reconnect_s=reconnect_s,
    )
    try:
        if not latest.capture.isOpened():
            raise ValueError(f"cannot open video source {shown}")
        latest.start()
        yield latest
    finally:
        latest.close()


@dataclass
class _Outage:
    """A live source's time without frames: since when, and the attempts to open it again."""

    started: float  # monotonic
    attempts: int = 0
    reopened: bool = False  # opened again at least once (it is back when a frame comes)
    said: bool = False


class LatestFrame:
    """The newest frame of a live capture, read on a thread of its own from `start` (else the
    first `take`); older frames not taken in time are dropped. It owns the capture and
    releases it; the rate the source reports is read before the thread starts (a capture is
    not safe to ask while it reads)."""

    def __init__(
        self,
        capture: cv2.VideoCapture,
        name: str = "live-source",
        reopen: str | int | None = None,
        reconnect_s: float = 0.0,
    ) -> None:
        self.capture = capture
        self.name = name
        self._reopen = reopen  # what the capture opens again when the source drops out
        self._reconnect_s = reconnect_s if reopen is not None else 0.0
        self._closed = threading.Event()  # wakes a wait between attempts to open it again
        self._changed = threading.Condition()
        self._image: np.ndarray | None = None
        self._read_ns = 0  # wall-clock time its newest frame was read
        self._sequence = 0  # frames read so far
        self._taken = 0  # the sequence number of the last frame taken
        self._ended = False
        self._closing = False
        self._release_when_read = False  # closed during a read: the thread releases it
        self.dropped = 0  # frames read but replaced before anyone took them (after the first)
        self.reported_fps = 0.0  # what the source reports, read by `start`
        self.reconnects = 0  # times it dropped out and was opened again
        self._thread = threading.Thread(target=self._read_all, name=name, daemon=True)

    def _read_all(self) -> None:
        outage: _Outage | None = None  # from the first failed read after a frame
        try:
            while not self._closing:
                ok, image = self.capture.read()
                now_ns = time.time_ns()
                if not ok:
                    outage = outage or _Outage(started=time.monotonic())
                    if self._closing or not self._opened_again(outage):
                        return
                    continue
                if outage is not None and outage.reopened:  # back: counted once it gives frames
                    self.reconnects += 1
                    log.warning(
                        "%s is back: frames again %.1f s after they stopped",
                        self.name, time.monotonic() - outage.started,
                    )  # fmt: skip
                outage = None
                with self._changed:
                    self._image, self._read_ns = image, now_ns
                    self._sequence += 1
                    self._changed.notify_all()
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()
                if self._release_when_read:
                    self.capture.release()

    def _opened_again(self, outage: _Outage) -> bool:
        """Open a source that stopped giving frames again, with backoff (kept over the outage,
        however often it opens and gives nothing), until `reconnect_s` after its frames
        stopped (a stalled stream is found stopped when FFmpeg's read gives up on it); whether
        it opened (its frames may still not come: the next failed read tries again)."""
        if self._reconnect_s <= 0:
            return False
        give_up_at = outage.started + self._reconnect_s
        if not outage.said:
            outage.said = True
            shown = "for ever" if math.isinf(self._reconnect_s) else f"{self._reconnect_s:g} s"
            log.warning("%s gave no frame: opening it again (up to %s)", self.name, shown)
        while time.monotonic() < give_up_at:
            wait_s = jittered_backoff_s(outage.attempts, REOPEN_FIRST_WAIT_S, REOPEN_MAX_WAIT_S)
            if self._closed.wait(min(wait_s, max(0.0, give_up_at - time.monotonic()))):
                return False
            outage.attempts += 1
            if self.capture.open(self._reopen) and self.capture.isOpened():
                outage.reopened = True
                return True
        return False

    def start(self) -> None:
        """Read the source from now on, as it runs: started at the first `take`, the frames it
        had queued since it was opened (the producer's start, seconds on a busy machine) were
        published first, stamped as read then, and counted as dropped."""
        if self._thread.ident is None:
            self.reported_fps = self.capture.get(cv2.CAP_PROP_FPS)
            self._thread.start()

    def take(
        self, stop: threading.Event, idle: Callable[[], None] | None = None
    ) -> tuple[np.ndarray, int] | None:
        """The newest frame not taken yet and when it was read (ns, wall clock), waiting for
        one; None once the source has ended (a lost camera or stream) or `stop` is set.
        `idle` runs every 0.1 s of the wait, outside the lock (a camera out for minutes must
        not stop its producer serving its client's events)."""
        self.start()
        while True:
            with self._changed:
                if self._sequence != self._taken:
                    if self._taken:  # before the first take, the run had not begun
                        self.dropped += self._sequence - self._taken - 1
                    self._taken = self._sequence
                    return self._image, self._read_ns
                if self._ended or stop.is_set():
                    return None
                self._changed.wait(0.1)
            if idle is not None:
                idle()

    @property
    def ended(self) -> bool:
        """Whether the source stopped giving frames (not because it was closed)."""
        with self._changed:
            return self._ended and not self._closing

    def close(self) -> None:
        """Stop reading and release the capture: now, or where the reading thread is still
        inside a `read()` (a stalled stream), by that thread once the read returns (a capture
        released under a read in progress is not safe)."""
        self._closing = True
        self._closed.set()
        if self._thread.ident is not None:
            self._thread.join(CLOSE_WAIT_S)
        with self._changed:
            if self._thread.ident is not None and not self._ended:
                self._release_when_read = True
                return
        self.capture.release()
