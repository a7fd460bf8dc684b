"""Depth stage: a depth map for each chosen frame of each video (`--frames`: first, middle,
uniform:N or all), frames streamed to the model in batches across a shard's videos, each
video's maps stored as one float16 array (`.npy`) with a preview picture, and its record told
what was done. The model itself comes from `depth_loader`, run by the `DepthActor` in a flow.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from common.files import atomic_output, partial_path
from tasks.depth.depth_loader import shared_estimator
from tasks.depth.depth_model import DepthMap, Estimator
from tasks.depth.frame_choice import frame_indices, iter_frames
from tasks.depth.settings import DepthSettings
from tasks.depth.video_record import VideoRecord

log = logging.getLogger(__name__)


def depth_preview(depth_m: np.ndarray) -> np.ndarray:
    """A colour picture of a depth map (near is warm), as BGR for cv2.imwrite."""
    inverse = 1.0 / np.clip(depth_m, 1e-3, None)
    low, high = float(inverse.min()), float(inverse.max())
    scaled = (inverse - low) / (high - low) if high > low else np.zeros_like(inverse)
    return cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)


def _save_png(path: Path, image: np.ndarray) -> None:
    """Write `image` as a PNG whole or not at all (OpenCV reports failure as False)."""
    with atomic_output(path) as partial:
        if not cv2.imwrite(str(partial), image):
            raise OSError(f"could not write {path}")


def _allocate(path: Path) -> None:
    """Take the blocks of the memory-mapped file `path` now.

    numpy leaves the file sparse: on a full disk a write to its pages raised SIGBUS, which
    killed the depth actor; with its blocks taken, a full disk is an OSError here. Where the
    system or the file system cannot (macOS has no posix_fallocate; some file systems refuse
    it), the file stays sparse, as before."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:
        return
    with open(path, "r+b") as blocks:
        try:
            allocate(blocks.fileno(), 0, os.fstat(blocks.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


FLOAT16_MAX = float(np.finfo(np.float16).max)  # maps are stored as float16


class VideoDepth:
    """One video's depth maps as they arrive from the model, batch by batch.

    The maps go straight into a float16 `.npy` on disk (a memory map of shape frames x height x
    width), never all in memory; running min, mean and max make the row's summary. The file
    appears under its final name only when every frame is in.
    """

    def __init__(self, record: VideoRecord, maps_dir: Path, indices: list[int]) -> None:
        self.record, self.indices = record, indices
        self.started = time.perf_counter()
        self.final = maps_dir / f"{record.video_id}.npy"
        # The memory map stays open across many `add` calls and is renamed in `finish`, so a
        # `with atomic_output(...)` block cannot hold it: the same hidden name, renamed by hand.
        self.partial = partial_path(self.final)
        self.array: np.memmap | None = None
        self.done: list[int] = []
        self.queued = 0  # frames handed to a batch and not yet back
        self.reading_done = False
        self.error: str | None = None
        self.low, self.high, self.total, self.count = np.inf, -np.inf, 0.0, 0
        self.focals: list[float] = []
        self.preview: np.ndarray | None = None

    def add(self, index: int, depth: DepthMap) -> None:
        if self.error is not None:  # failed already: nothing more is stored
            return
        depth_m, low, high = depth.depth_m, float(depth.depth_m.min()), float(depth.depth_m.max())
        if not (math.isfinite(low) and math.isfinite(high)):  # a NaN makes both NaN
            # Stored, a NaN read back as an "ok" row with min inf, max -inf and a mean of NaN.
            self.error = (
                f"the depth model gave values that are not numbers (NaN or inf) for frame {index}"
            )
            self.discard()
            return
        if low < -FLOAT16_MAX or high > FLOAT16_MAX:  # past float16's range: inf once stored
            depth_m = np.clip(depth_m, -FLOAT16_MAX, FLOAT16_MAX)
            low, high = (min(max(v, -FLOAT16_MAX), FLOAT16_MAX) for v in (low, high))
        if self.array is None:
            shape = (len(self.indices), *depth.depth_m.shape)
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.array = np.lib.format.open_memmap(
                self.partial, mode="w+", dtype=np.float16, shape=shape
            )
            _allocate(self.partial)
            self.preview = depth_preview(depth_m)
        self.array[len(self.done)] = depth_m
        self.done.append(index)
        self.low, self.high = min(self.low, low), max(self.high, high)
        self.total += float(depth_m.sum(dtype=np.float64))
        self.count += depth_m.size
        if depth.focal_length_px is not None:
            self.focals.append(depth.focal_length_px)

    def fail(self, exc: OSError) -> None:
        """A write failed (a full disk): this video fails, its partial file goes."""
        log.error("depth maps of %s could not be written: %s", self.record.video_id, exc)
        self.error = self.error or f"{type(exc).__name__}: {exc}"
        self.discard()

    def discard(self) -> None:
        self.array = None
        self.partial.unlink(missing_ok=True)

    @property
    def finished(self) -> bool:
        return self.reading_done and self.queued == 0

    def finish(self, estimator: Estimator) -> VideoRecord:
        """The record with its depth columns, or failed with the reason."""
        try:
            if self.error is not None:
                return self.record.fail("depth", self.error)
            if self.array is None:
                return self.record.fail(  # its transcode is at fault: a rerun makes it again
                    "transcode", f"no frame could be read from {self.record.transcoded_path}"
                )
            array, self.array = self.array, None
            array.flush()
            if len(self.done) < len(array):  # the container promised more frames than it had
                with atomic_output(self.partial) as short:
                    np.save(short, array[: len(self.done)])
            del array
            os.replace(self.partial, self.final)
            preview = self.final.with_suffix(".png")
            try:
                _save_png(preview, self.preview)
            except OSError:  # a failed row leaves no map behind (it would look made)
                self.final.unlink(missing_ok=True)
                raise
        finally:
            self.array = None
            self.partial.unlink(missing_ok=True)
        return self.record.finish(
            status="ok",
            depth_frame_indices=self.done,
            depth_path=str(self.final),
            depth_preview_path=str(preview),
            depth_min_m=self.low,
            depth_mean_m=self.total / self.count,
            depth_max_m=self.high,
            focal_length_px=float(np.mean(self.focals)) if self.focals else None,
            depth_model=estimator.model_name,
            depth_untrained=estimator.untrained,
            depth_s=time.perf_counter() - self.started,
        )


class _Batcher:
    """Frames of several videos gathered into model batches of `size` (one video's frames may
    span batches, and one batch may hold several videos' frames)."""

    def __init__(self, estimator: Estimator, size: int) -> None:
        self.estimator, self.size = estimator, size
        self.frames: list[tuple[VideoDepth, int, np.ndarray]] = []

    def add(self, video: VideoDepth, index: int, frame: np.ndarray) -> None:
        self.frames.append((video, index, frame))
        video.queued += 1
        if len(self.frames) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.frames:
            return
        batch, self.frames = self.frames, []
        try:
            maps = self.estimator.estimate([frame for _, _, frame in batch])
        except Exception as exc:  # each video of the batch again on its own: one fails, not all
            log.exception("depth model failed on a batch of %d frames", len(batch))
            maps = self._video_by_video(batch, exc)
        for (video, index, _), depth in zip(batch, maps, strict=True):
            video.queued -= 1
            if depth is not None and video.error is None:
                try:
                    video.add(index, depth)
                except OSError as exc:  # this video's file, not the model: the rest go on
                    video.fail(exc)

    def _video_by_video(
        self, batch: list[tuple[VideoDepth, int, np.ndarray]], failure: Exception
    ) -> list[DepthMap | None]:
        """The maps of a batch the model failed on (`failure`), each video's frames in a call
        of their own; None for the frames of a video whose call failed too, its error set."""
        maps: list[DepthMap | None] = [None] * len(batch)
        videos = {id(video): video for video, _, _ in batch}
        for key, video in videos.items():
            positions = [i for i, (other, _, _) in enumerate(batch) if id(other) == key]
            try:
                if len(videos) == 1:  # the call just made: not again
                    raise failure
                found = self.estimator.estimate([batch[i][2] for i in positions])
            except Exception as exc:  # a model failure fails this video, as a row
                video.error = video.error or f"{type(exc).__name__}: {exc}"
                continue
            for position, depth in zip(positions, found, strict=True):
                maps[position] = depth
        return maps


def estimate_depth_many(
    records: Sequence[VideoRecord],
    maps_dir: Path,
    settings: DepthSettings,
    estimator: Estimator | None = None,
) -> list[VideoRecord]:
    """Depth maps of each record's chosen frames (`settings.frames`), in input order.

    Frames stream from the videos into batches of `settings.depth_batch_size` across videos,
    so a GPU sees full batches even at one frame per video; each video's maps are one float16
    `.npy` (frames x height x width) with a `.png` preview of its first map.
    """
    results: dict[int, VideoRecord] = {}
    try:
        estimator = estimator or shared_estimator(settings)
    except Exception as exc:  # a model that cannot load fails these videos, as rows
        log.exception("the depth model could not be loaded")
        reason = f"{type(exc).__name__}: {exc}"
        return [r if r.failed else r.fail("depth", reason) for r in records]
    batcher = _Batcher(estimator, settings.depth_batch_size)
    open_videos: dict[int, VideoDepth] = {}

    def collect_finished() -> None:
        for position, video in list(open_videos.items()):
            if video.finished:
                try:
                    results[position] = video.finish(estimator)
                except OSError as exc:
                    video.fail(exc)
                    results[position] = video.record.fail("depth", video.error or str(exc))
                del open_videos[position]

    try:
        for position, record in enumerate(records):
            if record.failed:
                results[position] = record
                continue
            indices = frame_indices(settings.frames, record.frame_count or 0)
            video = open_videos[position] = VideoDepth(record, maps_dir, indices)
            for index, frame in iter_frames(Path(record.transcoded_path or ""), indices):
                if video.error is not None:
                    break
                batcher.add(video, index, frame)
            video.reading_done = True
            collect_finished()
        batcher.flush()
        collect_finished()
    finally:  # on an error that ends the call, no partial file is left to the hourly sweep
        for video in open_videos.values():
            video.discard()
    return [results[position] for position in range(len(records))]


def estimate_depth(
    record: VideoRecord,
    maps_dir: Path,
    settings: DepthSettings,
    estimator: Estimator | None = None,
) -> VideoRecord:
    """Depth maps of one record's chosen frames (see `estimate_depth_many`)."""
    return estimate_depth_many([record], maps_dir, settings, estimator)[0]
