"""Download stage: fetch each video over HTTP(S) with aiohttp, safely and with retries.

Transient failures (timeouts, dropped connections, 5xx, 408, 429) are retried with exponential
backoff and jitter; permanent ones (404, 403, too big, not a video, too slow) fail at once. A
download, retries included, ends by an overall deadline, and a body arriving slower than a
minimum rate is dropped, so a server dripping bytes cannot hold a worker. Redirects are followed
only where `redirects` allows. Bytes go to a hidden
temporary name and are renamed only when complete, so a crash never leaves a partial file under
a final name.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import logging
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from common.backoff import jittered_backoff_s
from common.files import atomic_output
from common.urls import shown_url
from tasks.depth.output_layout import note_source
from tasks.depth.redirects import RedirectRefused, final_response, session_connector
from tasks.depth.settings import DepthSettings
from tasks.depth.video_record import VideoRecord
from tasks.depth.video_sources import unfetchable

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
CONTAINER_SUFFIXES = frozenset(
    {"mp4", "webm", "mkv", "avi", "flv", "mpg", "ogv", "wmv", "ts", "m2ts"}
)
SNIFF_BYTES = 256  # what sniff_container reads: the longest signature (M2TS) needs 197


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
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska, or WebM (a Matroska subset)
        return "webm" if _ebml_doc_type(head) == b"webm" else "mkv"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"FLV"):
        return "flv"
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")):
        return "mpg"  # a program stream, or an elementary stream's sequence header
    if head.startswith(b"OggS"):
        return "ogv"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return "wmv"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "ts"
    if len(head) > 196 and head[4] == 0x47 and head[196] == 0x47:
        return "m2ts"  # AVCHD/Blu-ray (.mts): 192-byte packets, a 4-byte time code first
    return None


def _ebml_doc_type(head: bytes) -> bytes | None:
    """The DocType of the EBML header `head` starts with (`webm`, `matroska`), or None where
    the header's first bytes hold none. WebM was stored as `.mkv`, where its server, and the
    README, call it `.webm`."""
    try:
        header_size, at = _ebml_size(head, 4)  # after the 4-byte EBML element id
        end = min(len(head), at + header_size)
        while at < end:
            id_length = _ebml_length(head[at])
            if not 1 <= id_length <= 4:  # an element id is 1 to 4 bytes
                return None
            element, at = head[at : at + id_length], at + id_length
            size, at = _ebml_size(head, at)
            if element == b"\x42\x82":  # DocType: a string, maybe padded with NULs
                return head[at : at + size].rstrip(b"\x00") if at + size <= len(head) else None
            at += size
    except IndexError:  # cut inside an element: no DocType in these bytes
        return None
    return None


def _ebml_length(first: int) -> int:
    """Bytes of an EBML variable-size integer, from its first byte: its leading zeros + 1
    (0 for a zero byte, which starts none)."""
    return 9 - first.bit_length() if first else 0


def _ebml_size(data: bytes, at: int) -> tuple[int, int]:
    """The EBML size at `data[at]` (its length marker masked off), and where what follows it
    starts; IndexError where `data` ends inside it or no size starts there."""
    length = _ebml_length(data[at])
    if not length or at + length > len(data):
        raise IndexError(at)
    value = int.from_bytes(data[at : at + length], "big") & ((1 << (7 * length)) - 1)
    return value, at + length


@dataclass
class RateFloor:
    """Fails a body that arrives slower than `min_bps`, measured over consecutive windows of at
    least `window_s` seconds.

    Hand-written because aiohttp's timeouts bound the wait for each read and the whole request,
    not the rate: a server sending a byte just inside the read timeout passes them all.
    """

    min_bps: float
    window_s: float
    window_start: float
    window_bytes: int = 0  # bytes received when the window started

    def check(self, received: int, now: float) -> None:
        elapsed = now - self.window_start
        if self.min_bps <= 0 or elapsed < self.window_s:
            return
        rate = (received - self.window_bytes) / elapsed
        if rate < self.min_bps:
            raise DownloadError(
                f"too slow: {rate:.1f} B/s over {elapsed:.0f} s "
                f"(minimum {self.min_bps:g} B/s, download_min_rate_bps)",
                retryable=False,  # a retry would most likely crawl just the same
            )
        self.window_start, self.window_bytes = now, received


def is_retryable(exc: BaseException) -> bool:
    """Whether a failure is worth another attempt: a timeout, a connection refused or dropped,
    a body cut short (ClientPayloadError: fewer bytes than Content-Length); not a certificate,
    which stays wrong however often it is asked for."""
    if isinstance(exc, DownloadError):
        return exc.retryable
    if isinstance(exc, aiohttp.ClientSSLError):  # only a handshake cut short may pass
        return isinstance(getattr(exc, "os_error", None), ssl.SSLEOFError | ssl.SSLZeroReturnError)
    return isinstance(
        exc, TimeoutError | aiohttp.ClientConnectionError | aiohttp.ClientPayloadError
    )


def backoff_delay_s(
    retry: int, settings: DepthSettings, retry_after_s: float | None = None
) -> float:
    """Exponential backoff with jitter (half to full of the step), or the server's Retry-After
    when it asks for longer: retried sooner, a 429 answers 429 again. Only the download's
    deadline bounds it (a wait past it fails the video at once, saying so)."""
    delay = jittered_backoff_s(retry, settings.retry_backoff_s, settings.retry_backoff_max_s)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


def parse_retry_after(value: str) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date; None if it
    is neither."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def describe(exc: BaseException) -> str:
    """A failure in a line for the table, the artifacts and the logs: with every URL in it as
    `shown_url` shows it (aiohttp's errors say the whole URL, a signed query included)."""
    return _URL_IN_TEXT.sub(lambda found: shown_url(found.group(0)), _describe(exc))


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    if isinstance(exc, UnicodeError | aiohttp.InvalidURL) or (
        isinstance(exc, ValueError) and "URL" in str(exc)
    ):  # a host IDNA cannot encode ("a..b", a 64-character label), "Invalid IPv6 URL"
        # aiohttp's InvalidURL says the whole URL, credentials and signature included.
        detail = shown_url(str(exc.url)) if isinstance(exc, aiohttp.InvalidURL) else exc
        return f"invalid URL: {type(exc).__name__}: {detail}"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, DownloadError) else str(exc)


def make_session(settings: DepthSettings) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.connect_timeout_s,
        sock_connect=settings.connect_timeout_s,
        sock_read=settings.read_timeout_s,
    )
    connector = session_connector(limit=settings.download_concurrency)
    return aiohttp.ClientSession(timeout=timeout, connector=connector)


def _refuse_unless_video(head: bytes, response: aiohttp.ClientResponse) -> str:
    """The container of a body starting with `head`, or a permanent error saying what came."""
    if (container := sniff_container(head)) is None:
        kind = response.headers.get("Content-Type", "unknown type")
        raise DownloadError(f"not a video container (Content-Type {kind})", retryable=False)
    return container


def _refuse_bad_response(response: aiohttp.ClientResponse, max_bytes: int) -> None:
    """A permanent or retryable error for a status other than 200 or a too-big announced size."""
    if response.status != 200:
        error = DownloadError(
            f"HTTP {response.status} {response.reason or ''}".strip(),
            retryable=response.status in RETRYABLE_STATUS,
        )
        if retry_after := response.headers.get("Retry-After", "").strip():
            error.retry_after_s = parse_retry_after(retry_after)
        raise error
    if response.content_length is not None and response.content_length > max_bytes:
        raise DownloadError(
            f"too big: {response.content_length} bytes (limit {max_bytes})", retryable=False
        )


async def _checked_chunks(
    response: aiohttp.ClientResponse, settings: DepthSettings
) -> AsyncGenerator[bytes, None]:
    """The body's chunks, failing it once it grows past `max_download_bytes` (a missing or
    false Content-Length) or arrives slower than the rate floor."""
    max_bytes = settings.max_download_bytes
    floor = RateFloor(
        settings.download_min_rate_bps, settings.download_rate_window_s, time.monotonic()
    )
    received = 0
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        received += len(chunk)
        if received > max_bytes:
            raise DownloadError(f"too big: over {max_bytes} bytes without an end", retryable=False)
        floor.check(received, time.monotonic())
        yield chunk


async def _read_head(chunks: AsyncIterator[bytes]) -> bytes:
    """The body's first SNIFF_BYTES or more (all of it if shorter): a slow link or a proxy may
    deliver them a few at a time. The rest stays in `chunks`."""
    head = b""
    async for chunk in chunks:
        head += chunk
        if len(head) >= SNIFF_BYTES:
            break
    return head


async def _fetch_once(
    session: aiohttp.ClientSession,
    url: str,
    raw_dir: Path,
    video_id: str,
    settings: DepthSettings,
) -> tuple[Path, int]:
    """One attempt: the container is told from the first bytes, before anything is written,
    so the file's final name (`<video_id>.<container>`) is known when writing starts."""
    async with final_response(session, url) as response:
        _refuse_bad_response(response, settings.max_download_bytes)
        async with contextlib.aclosing(_checked_chunks(response, settings)) as chunks:
            head = await _read_head(chunks)
            if not head:
                raise DownloadError("empty response body", retryable=False)
            container = _refuse_unless_video(head[:SNIFF_BYTES], response)
            final = raw_dir / f"{video_id}.{container}"
            with atomic_output(final) as partial:
                with partial.open("wb") as out:
                    out.write(head)
                    size = len(head)
                    async for chunk in chunks:
                        out.write(chunk)
                        size += len(chunk)
                note_source(raw_dir, video_id, url)  # before the file's name: whole, it has one
    return final, size


def _complete_download(raw_dir: Path, video_id: str) -> Path | None:
    """A file an earlier attempt downloaded whole (a retried shard, a killed run): files get
    their final name only when complete, and an id stands for one URL."""
    for suffix in CONTAINER_SUFFIXES:
        if (path := raw_dir / f"{video_id}.{suffix}").is_file():
            return path
    return None


def _unfetchable(url: str) -> str | None:
    """Why `url` is not fetched at all, or None."""
    try:
        return unfetchable(url)
    except ValueError as exc:  # e.g. "http://[::1/x"
        return f"{describe(exc)} ({shown_url(url)})"


# What ends one attempt (retried or not, as `is_retryable` says) rather than the download task.
ATTEMPT_FAILURES = (
    DownloadError,
    RedirectRefused,
    TimeoutError,
    aiohttp.ClientError,
    OSError,
    ValueError,
)


async def download_video(
    session: aiohttp.ClientSession,
    record: VideoRecord,
    raw_dir: Path,
    settings: DepthSettings,
    slot: asyncio.Semaphore | None = None,
) -> VideoRecord:
    """Download one video into `raw_dir`; the record comes back filled in or failed. `slot`,
    held by the caller, is let go while a retry waits (a server's Retry-After may ask for
    minutes: the shard's other downloads go on meanwhile)."""
    if record.failed:
        return record
    started = time.perf_counter()
    if (problem := _unfetchable(record.source_url)) is not None:
        return record.fail("download", problem)
    raw_dir.mkdir(parents=True, exist_ok=True)
    if (earlier := _complete_download(raw_dir, record.video_id)) is not None:
        return record.update(raw_path=str(earlier), raw_bytes=earlier.stat().st_size)

    def failed(attempts: int, reason: str) -> VideoRecord:
        """The record failed for `reason`, keeping how long its download took. The error text
        goes to logs, artifacts and the table's `error` column; `source_url` already holds the
        whole URL, so the text names it without credentials or a signed query."""
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        return record.update(
            download_attempts=attempts, download_s=time.perf_counter() - started
        ).fail("download", f"{reason}{tried} ({shown_url(record.source_url)})")

    # The deadline spans every attempt and the waits between them, which a request's own
    # ClientTimeout(total=...) cannot: one asyncio deadline over the whole download instead.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.download_deadline_s
    too_late = f"deadline: not done after {settings.download_deadline_s:g} s (download_deadline_s)"
    attempt = 0
    while True:
        attempt += 1
        budget = asyncio.timeout_at(deadline)
        try:
            async with budget:
                path, size = await _fetch_once(
                    session, record.source_url, raw_dir, record.video_id, settings
                )
        except ATTEMPT_FAILURES as exc:
            if budget.expired():
                return failed(attempt, too_late)
            retries_left = settings.download_retries - (attempt - 1)
            if not is_retryable(exc) or retries_left <= 0:
                return failed(attempt, describe(exc))
            delay = backoff_delay_s(attempt - 1, settings, getattr(exc, "retry_after_s", None))
            if loop.time() + delay >= deadline:
                return failed(attempt, f"{describe(exc)}; no time left to retry, {too_late}")
            log.warning("%s: %s; retry %d in %.2f s", record.video_id, describe(exc), attempt,
                        delay)  # fmt: skip
            deadline += await _wait_without(slot, delay)  # the slot's queue is not its time
            continue
        took = time.perf_counter() - started
        return record.update(
            raw_path=str(path), raw_bytes=size, download_attempts=attempt, download_s=took
        )


async def _wait_without(slot: asyncio.Semaphore | None, delay: float) -> float:
    """Sleep `delay` seconds with `slot` let go, and take it again before going on; the seconds
    waited for it after the sleep, behind the shard's downloads not yet started, which are not
    the retrying video's (they took its deadline, and its row said "deadline" for a 503 a retry
    would have got past: found in review, stop 62)."""
    if slot is None:
        await asyncio.sleep(delay)
        return 0.0
    slot.release()
    try:
        await asyncio.sleep(delay)
    finally:  # taken again even if cancelled meanwhile: its holder lets it go once
        asked = time.monotonic()
        await asyncio.shield(slot.acquire())
    return time.monotonic() - asked


async def download_videos(
    records: Sequence[VideoRecord], raw_dir: Path, settings: DepthSettings
) -> list[VideoRecord]:
    """Download many videos, at most `download_concurrency` at once, in input order."""
    async with make_session(settings) as session:
        limit = asyncio.Semaphore(settings.download_concurrency)

        async def bounded(record: VideoRecord) -> VideoRecord:
            async with limit:
                try:
                    return await download_video(session, record, raw_dir, settings, limit)
                except Exception as exc:  # a bug or an unforeseen error: this video's alone
                    log.exception("%s: download crashed", record.video_id)
                    shown = shown_url(record.source_url)
                    return record.fail("download", f"download crashed: {describe(exc)} ({shown})")

        return list(await asyncio.gather(*(bounded(record) for record in records)))


def download_many(
    records: Sequence[VideoRecord], raw_dir: Path, settings: DepthSettings
) -> list[VideoRecord]:
    """Download a shard's videos from synchronous code (a Prefect task on a Ray worker)."""
    return asyncio.run(download_videos(records, raw_dir, settings))


def download(record: VideoRecord, raw_dir: Path, settings: DepthSettings) -> VideoRecord:
    """Download one video from synchronous code."""
    return download_many([record], raw_dir, settings)[0]
