"""Transcode stage: each downloaded video to H.264 at a fixed height (360p), with FFmpeg.

FFmpeg runs as a subprocess (from PATH where it has libx264, else the static binary of the
imageio-ffmpeg wheel, so no system package is needed) with a timeout; its own error text becomes
the failure reason.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2

from common.files import atomic_output
from common.frames import opened_video
from common.processes import batch_child
from common.urls import shown_url
from tasks.depth.clip_window import ClipWindow, seconds_text, window_of
from tasks.depth.run_log import run_logger
from tasks.depth.settings import DepthSettings
from tasks.depth.video_record import VideoRecord

log = logging.getLogger(__name__)

FFMPEG_ERROR_CHARS = 1500
_ADDRESS = re.compile(r" @ 0x[0-9a-fA-F]+")


class TranscodeError(Exception):
    """FFmpeg failed, timed out or wrote no frames; the message is the failure reason."""


@functools.cache
def ffmpeg_exe() -> str:
    """`ffmpeg` from PATH when there is one that encodes H.264, else the imageio-ffmpeg wheel's
    static build (which does); chosen once per process, and said why where PATH's is passed by."""
    on_path = shutil.which("ffmpeg")
    if on_path:
        if (lack := _h264_lack(on_path)) is None:
            return on_path
        log.warning("%s %s: transcodes use the imageio-ffmpeg wheel's ffmpeg", on_path, lack)
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


# An encoder line of `ffmpeg -encoders`: " V....D libx264   libx264 H.264 / AVC ..."
_LIBX264_LINE = re.compile(r"^\s*V\S*\s+libx264\s", re.MULTILINE)


def _h264_lack(ffmpeg: str) -> str | None:
    """Why `ffmpeg` cannot make the transcodes, or None: builds without libx264 (Fedora's
    ffmpeg-free, conda-forge's LGPL ffmpeg) failed every transcode with "Unknown encoder"."""
    try:
        listed = subprocess.run(
            [ffmpeg, "-hide_banner", "-encoders"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot list its encoders ({type(exc).__name__}: {exc})"
    if listed.returncode != 0:
        return f"cannot list its encoders (exit {listed.returncode})"
    return None if _LIBX264_LINE.search(listed.stdout) else "has no libx264 encoder"


@dataclass(frozen=True)
class StreamFacts:
    width: int
    height: int
    fps: float
    frame_count: int

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps if self.fps > 0 else 0.0


# How much longer than its window a file may be and still be the clip itself (_window_to_cut)
CLIP_SLACK_S = 1.0
# Containers whose header gives the exact frame count (others' is an estimate from the
# duration, which an audio track longer than the video stretches): the cut-short check trusts
# these alone
EXACT_COUNT_SUFFIXES = frozenset({".mp4", ".m4v", ".mov"})
# A transcode with errors that gives fewer than this share of the frames its source's header
# declares is of a source cut short (header counts of damaged files may be a little off)
CUT_SHORT_SHARE = 0.9


def probe_video(path: Path) -> StreamFacts | None:
    """Size, rate and length of a video's first video stream, or None if it cannot be opened."""
    with opened_video(path) as capture:
        if not capture.isOpened():
            return None
        facts = StreamFacts(
            width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            fps=float(capture.get(cv2.CAP_PROP_FPS)),
            frame_count=int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
        )
    return facts if facts.width > 0 and facts.height > 0 else None


def ffmpeg_command(
    source: Path, output: Path, settings: DepthSettings, window: ClipWindow | None = None
) -> list[str]:
    """The FFmpeg call: scale to the target height keeping the aspect (even width), H.264
    yuv420p, the index at the front of the file (fast start), audio kept as AAC when present;
    only the `window` of the source where one is given (a Kinetics clip of a whole video)."""
    threads = str(settings.ffmpeg_threads)
    cut = [] if window is None else ["-ss", seconds_text(window.start_s)]  # seeks, decodes
    if window is not None and window.length_s is not None:
        cut += ["-t", seconds_text(window.length_s)]
    return [
        ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-y",
        "-loglevel",
        "error",
        "-threads",
        threads,
        *cut,
        "-i",
        str(source),
        "-map",
        "0:V:0",  # V, not v: a video stream that is not an attached picture (cover art)
        "-map",
        "0:a:0?",
        "-vf",
        f"scale=-2:{settings.height}",
        "-c:v",
        "libx264",
        "-preset",
        settings.x264_preset,
        "-crf",
        str(settings.x264_crf),
        "-pix_fmt",
        "yuv420p",
        "-threads",
        threads,
        "-filter_threads",
        threads,
        "-c:a",
        "aac",
        "-b:a",
        "128k",
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
        str(output),
    ]


def transcode_many(
    records: Sequence[VideoRecord],
    out_dir: Path,
    settings: DepthSettings,
    workers: int,
    then: Callable[[VideoRecord], VideoRecord] = lambda record: record,
) -> list[VideoRecord]:
    """Transcode a shard's videos, `workers` ffmpeg at once (one per CPU the task holds), in
    input order; `then` is applied to each on this thread as soon as its transcode ends (the
    shard task hands it to the depth model there)."""
    if workers <= 1:
        return [then(_transcode_alone(record, out_dir, settings)) for record in records]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ffmpeg") as pool:
        running = {  # each in the task run's context: what it logs goes to the run's log
            pool.submit(contextvars.copy_context().run, _transcode_alone, record, out_dir,
                        settings): position
            for position, record in enumerate(records)
        }  # fmt: skip
        done = {running[future]: then(future.result()) for future in as_completed(running)}
    return [done[position] for position in range(len(records))]


def _transcode_alone(record: VideoRecord, out_dir: Path, settings: DepthSettings) -> VideoRecord:
    """`transcode`, with an error no check foresaw (ffmpeg that cannot be started for want of
    memory or processes, a folder that cannot be read) failing this video alone, not its
    shard: the shard's other videos and their rows go on."""
    try:
        return transcode(record, out_dir, settings)
    except Exception as exc:
        log.exception("%s: transcode crashed", record.video_id)
        return record.fail("transcode", f"transcode crashed: {type(exc).__name__}: {exc}")


def transcode(record: VideoRecord, out_dir: Path, settings: DepthSettings) -> VideoRecord:
    """Transcode the record's downloaded file into `out_dir/<video_id>.mp4`.

    A complete output from an earlier attempt (a retried shard, a killed run) is kept: files
    appear under their final name only when whole.
    """
    if record.failed:
        return record
    started = time.perf_counter()
    source = Path(record.raw_path or "")
    if not source.is_file():
        return record.fail("transcode", f"downloaded file is missing: {source}")
    source_facts = probe_video(source)
    if source_facts is not None:
        record = record.update(
            source_width=source_facts.width,
            source_height=source_facts.height,
            source_fps=source_facts.fps,
            source_duration_s=source_facts.duration_s,
        )
    output = out_dir / f"{record.video_id}.mp4"
    if output.is_file() and (facts := probe_video(output)) is not None and facts.frame_count > 0:
        return _with_output(record, output, facts, started)
    try:
        window = _window_to_cut(record.source_url, source_facts)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output(output) as partial:
            facts = _run_ffmpeg(
                source, partial, settings, window, _frames_declared(source, source_facts, window)
            )
    except TranscodeError as exc:
        if "matches no streams" in str(exc):  # ffmpeg's words for a file without `-map 0:V:0`
            return record.fail("transcode", f"no video stream in the file (audio only?): {exc}")
        return record.fail("transcode", str(exc))
    return _with_output(record, output, facts, started)


def _window_to_cut(url: str, facts: StreamFacts | None) -> ClipWindow | None:
    """The window of its video the URL asks for (clip_window), or None where the file is the
    clip itself: it cannot hold the window and is no longer than it (CLIP_SLACK_S at most
    more), as a mirror that names its clips by their video id alone serves them (cut again,
    little or nothing was left of it). A file that ends before its window starts and is
    longer than it is some other footage: TranscodeError (taken whole, a 300-s video with
    the window 417-427 became an ok row of 300 s under the clip's label). One that holds the
    window's start alone gives what it has of the window, as a cut of the video does."""
    window = window_of(url)
    if window is None or facts is None or facts.duration_s <= 0:
        return window
    duration_s = facts.duration_s
    if (
        window.end_s is not None
        and window.length_s is not None
        and duration_s < window.end_s
        and duration_s <= window.length_s + CLIP_SLACK_S
    ):
        run_logger(log).info(
            "%s is %.1f s long, the clip itself: not cut", shown_url(url), duration_s
        )
        return None
    if duration_s <= window.start_s:
        raise TranscodeError(
            f"the video is {seconds_text(round(duration_s, 1))} s; its window starts at "
            f"{seconds_text(window.start_s)} s (the URL's #t=)"
        )
    return window


def _frames_declared(source: Path, facts: StreamFacts | None, window: ClipWindow | None) -> int:
    """The frames a transcode of the source should give, from its header: all of them, or
    those of the window (0: not known, or only estimated)."""
    if facts is None or facts.frame_count <= 0 or source.suffix.lower() not in EXACT_COUNT_SUFFIXES:
        return 0
    if window is None:
        return facts.frame_count
    if facts.fps <= 0:
        return 0
    after_start = facts.frame_count - int(window.start_s * facts.fps)
    if window.length_s is None:
        return max(0, after_start)
    return max(0, min(after_start, int(window.length_s * facts.fps)))


def _run_ffmpeg(
    source: Path,
    output: Path,
    settings: DepthSettings,
    window: ClipWindow | None = None,
    declared_frames: int = 0,
) -> StreamFacts:
    """Transcode `source` into `output`; the facts of what FFmpeg wrote. Raises TranscodeError
    (so that `atomic_output` drops the file) when it failed, timed out, wrote no frames, or
    stopped short of the `declared_frames` of the source's header with errors."""
    # Transcodes are batch work: on a busy machine the Prefect API and UI, the downloads and
    # the depth model get the CPU first, and ffmpeg takes every cycle they leave (the total
    # work, and so the run's length, is the same). It dies with its worker.
    args, preexec_fn = batch_child(
        ffmpeg_command(source.resolve(), output.resolve(), settings, window),
        settings.transcode_nice,
    )
    try:
        completed = subprocess.run(
            args,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=settings.transcode_timeout_s,
            check=False,
            preexec_fn=preexec_fn,
        )
    except subprocess.TimeoutExpired:
        raise TranscodeError(f"ffmpeg timed out after {settings.transcode_timeout_s:g} s") from None
    if completed.returncode != 0:
        # Without ffmpeg's context addresses ("[in#0 @ 0x559a55e6b700] moov atom not found").
        reason = _ADDRESS.sub("", completed.stderr.strip())[-FFMPEG_ERROR_CHARS:] or "no error text"
        raise TranscodeError(f"ffmpeg exit {completed.returncode}: {reason}")
    facts = probe_video(output)
    if facts is None or facts.frame_count <= 0:
        raise TranscodeError("ffmpeg wrote no decodable video frames")
    said = _ADDRESS.sub("", completed.stderr.strip())
    if said and facts.frame_count < CUT_SHORT_SHARE * declared_frames:
        # FFmpeg ends a source cut short (a partial download from a server that sent no
        # length, a mirror's broken copy) with exit 0 after its errors: kept, its row was ok
        # and the video was never fetched again.
        raise TranscodeError(
            f"the source ends after {facts.frame_count} of the {declared_frames} frames its "
            f"header gives (cut short, or damaged): {said.splitlines()[-1][-FFMPEG_ERROR_CHARS:]}"
        )
    return facts


def _with_output(
    record: VideoRecord, output: Path, facts: StreamFacts, started: float
) -> VideoRecord:
    return record.update(
        transcoded_path=str(output),
        transcoded_bytes=output.stat().st_size,
        width=facts.width,
        height=facts.height,
        fps=facts.fps,
        duration_s=facts.duration_s,
        frame_count=facts.frame_count,
        transcode_s=time.perf_counter() - started,
    )
