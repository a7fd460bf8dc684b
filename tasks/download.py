"""Download stage: fetch each video over HTTP(S) with aiohttp, safely and with retries.

Transient failures (timeouts, dropped connections, 5xx, 408, 429) are retried with exponential
backoff and jitter; permanent ones (404, 403, too big, not a video) fail at once. Bytes go to a
hidden temporary name and are renamed only when complete, so a crash never leaves a partial
file under a final name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from tasks.video_record import VideoRecord
from vidflow.config import DepthSettings

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
CONTAINER_SUFFIXES = frozenset({"mp4", "mkv", "avi", "flv", "mpg", "ogv", "wmv", "ts"})


class DownloadError(Exception):
    """A failed download; `retryable` says whether trying again could help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s: float | None = None


def sniff_container(head: bytes) -> str | None:
    """The container format from a file's first bytes, or None if it is not a video.

    Hand-written because the few signatures needed fit in a screen, where a libmagic binding
    would add a system dependency.
    """
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "mkv"  # Matroska and WebM
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"FLV"):
        return "flv"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpg"
    if head.startswith(b"OggS"):
        return "ogv"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return "wmv"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "ts"
    return None


def is_retryable(exc: BaseException) -> bool:
    """Whether a failure is worth another attempt."""
    if isinstance(exc, DownloadError):
        return exc.retryable
    return isinstance(exc, TimeoutError | aiohttp.ClientConnectionError)


def backoff_delay_s(
    retry: int, settings: DepthSettings, retry_after_s: float | None = None
) -> float:
    """Exponential backoff with jitter (half to full of the step), honouring Retry-After."""
    step = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2**retry)
    delay = step * random.uniform(0.5, 1.0)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, settings.retry_backoff_max_s))
    return delay


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, DownloadError) else str(exc)


def make_session(settings: DepthSettings) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.connect_timeout_s,
        sock_connect=settings.connect_timeout_s,
        sock_read=settings.read_timeout_s,
    )
    connector = aiohttp.TCPConnector(limit=settings.download_concurrency)
    return aiohttp.ClientSession(timeout=timeout, connector=connector)


async def _fetch_once(
    session: aiohttp.ClientSession, url: str, raw_dir: Path, video_id: str, max_bytes: int
) -> tuple[Path, int]:
    partial = raw_dir / f".{video_id}.{uuid.uuid4().hex}.part"
    try:
        async with session.get(url) as response:
            if response.status != 200:
                error = DownloadError(
                    f"HTTP {response.status} {response.reason or ''}".strip(),
                    retryable=response.status in RETRYABLE_STATUS,
                )
                if retry_after := response.headers.get("Retry-After", "").strip():
                    error.retry_after_s = float(retry_after) if retry_after.isdigit() else None
                raise error
            if response.content_length is not None and response.content_length > max_bytes:
                raise DownloadError(
                    f"too big: {response.content_length} bytes (limit {max_bytes})",
                    retryable=False,
                )
            received = 0
            container = None
            with partial.open("wb") as out:
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    if container is None:
                        container = sniff_container(chunk[:256])
                        if container is None:
                            kind = response.headers.get("Content-Type", "unknown type")
                            raise DownloadError(
                                f"not a video container (Content-Type {kind})", retryable=False
                            )
                    received += len(chunk)
                    if received > max_bytes:
                        raise DownloadError(
                            f"too big: over {max_bytes} bytes without an end", retryable=False
                        )
                    out.write(chunk)
            if container is None:
                raise DownloadError("empty response body", retryable=False)
            final = raw_dir / f"{video_id}.{container}"
            os.replace(partial, final)
            return final, received
    finally:
        partial.unlink(missing_ok=True)


def _complete_download(raw_dir: Path, video_id: str) -> Path | None:
    """A file an earlier attempt downloaded whole (a retried shard, a killed run): files get
    their final name only when complete, and an id stands for one URL."""
    for suffix in CONTAINER_SUFFIXES:
        if (path := raw_dir / f"{video_id}.{suffix}").is_file():
            return path
    return None


async def download_video(
    session: aiohttp.ClientSession, record: VideoRecord, raw_dir: Path, settings: DepthSettings
) -> VideoRecord:
    """Download one video into `raw_dir`; the record comes back filled in or failed."""
    if record.failed:
        return record
    started = time.perf_counter()
    scheme = urlsplit(record.source_url).scheme.lower()
    if scheme not in ("http", "https"):
        return record.fail("download", f"unsupported URL scheme {scheme!r} (http/https only)")
    raw_dir.mkdir(parents=True, exist_ok=True)
    if (earlier := _complete_download(raw_dir, record.video_id)) is not None:
        return record.update(raw_path=str(earlier), raw_bytes=earlier.stat().st_size)
    attempt = 0
    while True:
        attempt += 1
        try:
            path, size = await _fetch_once(
                session, record.source_url, raw_dir, record.video_id, settings.max_download_bytes
            )
        except (DownloadError, TimeoutError, aiohttp.ClientError, OSError) as exc:
            retries_left = settings.download_retries - (attempt - 1)
            if not is_retryable(exc) or retries_left <= 0:
                tried = f" after {attempt} attempts" if attempt > 1 else ""
                return record.update(download_attempts=attempt).fail(
                    "download", f"{describe(exc)}{tried} ({record.source_url})"
                )
            delay = backoff_delay_s(attempt - 1, settings, getattr(exc, "retry_after_s", None))
            log.warning(
                "%s: %s; retry %d in %.2f s", record.video_id, describe(exc), attempt, delay
            )
            await asyncio.sleep(delay)
            continue
        return record.update(
            raw_path=str(path),
            raw_bytes=size,
            download_attempts=attempt,
            download_s=time.perf_counter() - started,
        )


async def download_videos(
    records: Sequence[VideoRecord], raw_dir: Path, settings: DepthSettings
) -> list[VideoRecord]:
    """Download many videos, at most `download_concurrency` at once, in input order."""
    async with make_session(settings) as session:
        limit = asyncio.Semaphore(settings.download_concurrency)

        async def bounded(record: VideoRecord) -> VideoRecord:
            async with limit:
                return await download_video(session, record, raw_dir, settings)

        return list(await asyncio.gather(*(bounded(record) for record in records)))


def download_many(
    records: Sequence[VideoRecord], raw_dir: Path, settings: DepthSettings
) -> list[VideoRecord]:
    """Download a shard's videos from synchronous code (a Prefect task on a Ray worker)."""
    return asyncio.run(download_videos(records, raw_dir, settings))


def download(record: VideoRecord, raw_dir: Path, settings: DepthSettings) -> VideoRecord:
    """Download one video from synchronous code."""
    return download_many([record], raw_dir, settings)[0]
