"""Depth stage: metric depth maps of a video's frames (chosen ones, or all) with Depth Pro.

The model comes through Hugging Face transformers (`AutoModelForDepthEstimation`), from a hub id
such as `apple/DepthPro-hf` or a local folder, so other transformers depth models work with the
same flag. It is loaded once per worker process (a Ray worker is reused for many videos) and
runs in half precision on a GPU, in full precision on the CPU.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from common.devices import choose_device
from common.files import atomic_output, partial_path
from common.frames import opened_video
from tasks.depth.model_files import (
    HubUnreachableError,
    check_hub_reachable,
    is_local_model,
    model_source,
)
from tasks.depth.settings import DepthSettings
from tasks.depth.video_record import VideoRecord

log = logging.getLogger(__name__)

_UNIFORM = re.compile(r"uniform:(\d+)")
FRAMES_CHOICES = "first, middle, uniform:N or all"


def check_frames_spec(spec: str) -> None:
    """Refuse a bad `--frames` value before any work starts."""
    match = _UNIFORM.fullmatch(spec)
    if spec not in ("first", "middle", "all") and not (match and int(match.group(1)) >= 1):
        raise ValueError(f"--frames must be {FRAMES_CHOICES} with N >= 1, not {spec!r}")


def frame_indices(spec: str, frame_count: int) -> list[int]:
    """Which frames represent a video: the first, the middle, N spread evenly (centres of N
    equal segments, so uniform:1 is the middle frame), or all of them."""
    check_frames_spec(spec)
    if frame_count <= 0:
        return []
    if spec == "first":
        return [0]
    if spec == "middle":
        return [frame_count // 2]
    if spec == "all":
        return list(range(frame_count))
    wanted = min(int(spec.split(":")[1]), frame_count)
    return sorted({int((i + 0.5) * frame_count / wanted) for i in range(wanted)})


def iter_frames(path: Path, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """The given frames as RGB arrays, one at a time and in order, so a whole video is never
    in memory (read in order: seeking is not frame-exact in every codec, and 360p decodes
    fast; frames past the last wanted one are not decoded)."""
    wanted = set(indices)
    last = max(indices, default=-1)
    with opened_video(path) as capture:
        index = 0
        while index <= last and capture.grab():  # a capture that did not open grabs nothing
            if index in wanted:
                ok, bgr = capture.retrieve()
                if ok:
                    yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1


def read_frames(path: Path, indices: list[int]) -> dict[int, np.ndarray]:
    """The given frames as RGB arrays (for a handful of frames; see `iter_frames`)."""
    return dict(iter_frames(path, indices))


@dataclass(frozen=True)
class DepthMap:
    depth_m: np.ndarray  # float32, height x width, metres (relative units for non-metric models)
    focal_length_px: float | None


# Set in the config.json of a model with random weights (devstack/tiny_depth_pro.py): every depth
# output of such a model is labelled untrained, so no one mistakes its numbers for real depth.
UNTRAINED_CONFIG_KEY = "vidflow_untrained_weights"


def is_untrained(config: object) -> bool:
    """Whether a transformers config (or its config.json as a dict) has the untrained marker."""
    if isinstance(config, dict):
        return bool(config.get(UNTRAINED_CONFIG_KEY, False))
    return bool(getattr(config, UNTRAINED_CONFIG_KEY, False))


def check_depth_model(model_name: str) -> bool:
    """Fail before any download if the depth model cannot be found; return whether it is an
    untrained stand-in (random weights).

    Reads the model's config.json only, through huggingface_hub: the driver that checks never
    runs the model, so it does not pay torch's and transformers' imports (seconds of CPU).
    """
    if is_local_model(model_name) and not Path(model_name).is_dir():
        raise ValueError(f"depth model folder {model_name} does not exist")
    try:
        if Path(model_name).is_dir():
            config_path = Path(model_name) / "config.json"
        else:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(model_name, "config.json")
            if not isinstance(cached, str):  # not cached: ask the hub, if it can be reached
                check_hub_reachable(model_name)
                cached = hf_hub_download(model_name, "config.json")
            config_path = Path(cached)
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict) or "model_type" not in config:
            raise ValueError(f"{config_path} is not a transformers model config")
    except HubUnreachableError as exc:
        raise ValueError(f"depth model {model_name!r} cannot be loaded: {exc}") from exc
    except Exception as exc:  # hub, network, file and format errors all mean: cannot load
        raise ValueError(
            f"depth model {model_name!r} cannot be loaded: give a Hugging Face hub id "
            f"(with network access or a filled HF cache) or a local folder. {exc}"
        ) from exc
    return is_untrained(config)


class Estimator(Protocol):
    """A loaded depth model: `DepthEstimator` (torch) or `depth_onnx.OnnxDepthEstimator`."""

    model_name: str
    device: str
    untrained: bool

    def estimate(self, frames_rgb: list[np.ndarray]) -> list[DepthMap]: ...


class DepthEstimator:
    """A transformers depth model with its image processor, ready to run on RGB frames."""

    def __init__(self, model_name: str, device: str = "auto") -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model_name = model_name
        self.device = choose_device(device, torch.cuda.is_available, what="depth model")
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        started = time.perf_counter()
        source = model_source(model_name)
        self.processor = AutoImageProcessor.from_pretrained(source)
        self.model = AutoModelForDepthEstimation.from_pretrained(source, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.untrained = is_untrained(self.model.config)
        if self.untrained:
            log.warning("depth model %s has UNTRAINED weights: depth means nothing", model_name)
        log.info(
            "loaded depth model %s on %s in %.1f s",
            model_name,
            self.device,
            time.perf_counter() - started,
        )

    def estimate(self, frames_rgb: list[np.ndarray]) -> list[DepthMap]:
        """Depth of each frame, at the frame's own size."""
        import torch

        inputs = self.processor(images=frames_rgb, return_tensors="pt")
        inputs = {
            name: value.to(self.device, self.dtype if value.is_floating_point() else value.dtype)
            for name, value in inputs.items()
        }
        with torch.inference_mode():
            outputs = self.model(**inputs)
        sizes = [frame.shape[:2] for frame in frames_rgb]
        post = self.processor.post_process_depth_estimation(outputs, target_sizes=sizes)
        maps = []
        for result in post:
            focal = result.get("focal_length")
            maps.append(
                DepthMap(
                    depth_m=result["predicted_depth"].float().cpu().numpy(),
                    focal_length_px=float(focal) if focal is not None else None,
                )
            )
        return maps


class DepthActor:
    """Holds one loaded depth model (a Ray actor; see tasks/depth/shard_tasks.py) and takes whole
    shards, batching their frames.

    On a cluster that outlives the run, later runs find it loaded (the model's imports and
    weights cost seconds of CPU): it ends itself after `keep_alive_s` without a call. A run
    that uses it calls `keep_alive` meanwhile (shard_tasks.actors_held), so a long wait for
    downloads or transcodes never ends it mid-run. It lives here, away from Prefect, so its
    process imports no orchestration code.
    """

    def __init__(
        self, settings: DepthSettings, device: str, threads: int, keep_alive_s: float
    ) -> None:
        # `threads`: the CPUs its callers reserve, not the whole node.
        self.estimator = load_depth_estimator(settings, device, threads)
        self.last_call, self.busy = time.monotonic(), False
        if keep_alive_s > 0:
            watch = threading.Thread(target=self._end_when_idle, args=(keep_alive_s,), daemon=True)
            watch.start()

    def depth_maps(
        self, records: Sequence[VideoRecord], maps_dir: Path, settings: DepthSettings
    ) -> list[VideoRecord]:
        self.busy = True
        try:
            return estimate_depth_many(records, maps_dir, settings, self.estimator)
        finally:
            self.busy, self.last_call = False, time.monotonic()

    def keep_alive(self) -> None:
        """Restart the idle clock: a run holds this actor (its next depth call may be minutes
        away, behind slow downloads)."""
        self.last_call = time.monotonic()

    def _end_when_idle(self, keep_alive_s: float) -> None:
        import ray

        while True:
            time.sleep(min(keep_alive_s, 5.0))
            if not self.busy and time.monotonic() - self.last_call > keep_alive_s:
                log.info("depth actor idle for %.0f s: ending it", keep_alive_s)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


def check_depth_backend(backend: str, device: str) -> None:
    """Refuse the ONNX backend on a GPU, where it would run on the CPU instead."""
    if backend == "onnx" and device == "cuda":
        raise ValueError(
            "--depth-backend onnx runs on the CPU only: use --device cpu, or auto or torch"
        )


def load_depth_estimator(settings: DepthSettings, device: str, threads: int = 1) -> Estimator:
    """The depth model of `settings` on `device` (auto, cpu or cuda) with `threads` CPU
    threads, run by its backend.

    Backend auto: ONNX Runtime on the CPU (no torch or transformers imports once the export is
    cached: seconds of CPU a run), torch on a GPU (float16 batches), and torch where a model
    cannot be exported, with a warning saying why.
    """
    if device == "auto":
        import torch

        device = choose_device(device, torch.cuda.is_available, what="depth model")
    backend = settings.depth_backend
    check_depth_backend(backend, device)
    if backend == "onnx" or (backend == "auto" and device == "cpu"):
        from tasks.depth.depth_onnx import OnnxDepthEstimator

        try:
            return OnnxDepthEstimator(settings.depth_model, settings.cache_dir, threads)
        except Exception as exc:
            if backend == "onnx":
                raise
            log.warning(
                "depth model %s cannot run on ONNX Runtime (%s: %s); running it with torch",
                settings.depth_model, type(exc).__name__, exc,
            )  # fmt: skip
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    return DepthEstimator(settings.depth_model, device)


def shared_estimator(settings: DepthSettings) -> Estimator:
    """One estimator per process and model: a reused Ray worker loads the weights once."""
    return _shared_estimator(
        settings.depth_model, settings.device, settings.depth_backend, settings.cache_dir
    )


def forget_loaded_models() -> None:
    """Drop this process's loaded models: the next call loads again (benchmarks use it)."""
    _shared_estimator.cache_clear()


@functools.cache
def _shared_estimator(model: str, device: str, backend: str, cache_dir: Path) -> Estimator:
    settings = DepthSettings(
        depth_model=model, device=device, depth_backend=backend, cache_dir=cache_dir
    )
    return load_depth_estimator(settings, device)


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
        if self.array is None:
            shape = (len(self.indices), *depth.depth_m.shape)
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.array = np.lib.format.open_memmap(
                self.partial, mode="w+", dtype=np.float16, shape=shape
            )
            self.preview = depth_preview(depth.depth_m)
        self.array[len(self.done)] = depth.depth_m
        self.done.append(index)
        self.low = min(self.low, float(depth.depth_m.min()))
        self.high = max(self.high, float(depth.depth_m.max()))
        self.total += float(depth.depth_m.sum(dtype=np.float64))
        self.count += depth.depth_m.size
        if depth.focal_length_px is not None:
            self.focals.append(depth.focal_length_px)

    @property
    def finished(self) -> bool:
        return self.reading_done and self.queued == 0

    def finish(self, estimator: Estimator) -> VideoRecord:
        """The record with its depth columns, or failed with the reason."""
        try:
            if self.error is not None:
                return self.record.fail("depth", self.error)
            if self.array is None:
                return self.record.fail(
                    "depth", f"no frame could be read from {self.record.transcoded_path}"
                )
            array, self.array = self.array, None
            array.flush()
            if len(self.done) < len(array):  # the container promised more frames than it had
                with atomic_output(self.partial) as short:
                    np.save(short, array[: len(self.done)])
            del array
            os.replace(self.partial, self.final)
            preview = self.final.with_suffix(".png")
            _save_png(preview, self.preview)
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
        except Exception as exc:  # a model failure fails the videos of this batch, as rows
            log.exception("depth model failed on a batch of %d frames", len(batch))
            maps = [None] * len(batch)
            for video, _, _ in batch:
                video.error = video.error or f"{type(exc).__name__}: {exc}"
        for (video, index, _), depth in zip(batch, maps, strict=True):
            video.queued -= 1
            if depth is not None and video.error is None:
                video.add(index, depth)


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
                results[position] = video.finish(estimator)
                del open_videos[position]

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
    return [results[position] for position in range(len(records))]


def estimate_depth(
    record: VideoRecord,
    maps_dir: Path,
    settings: DepthSettings,
    estimator: Estimator | None = None,
) -> VideoRecord:
    """Depth maps of one record's chosen frames (see `estimate_depth_many`)."""
    return estimate_depth_many([record], maps_dir, settings, estimator)[0]
