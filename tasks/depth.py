"""Depth stage: metric depth maps of a video's representative frames with Depth Pro.

The model comes through Hugging Face transformers (`AutoModelForDepthEstimation`), from a hub id
such as `apple/DepthPro-hf` or a local folder, so other transformers depth models work with the
same flag. It is loaded once per worker process (a Ray worker is reused for many videos) and
runs in half precision on a GPU, in full precision on the CPU.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tasks.video_record import VideoRecord
from vidflow.config import DepthSettings

log = logging.getLogger(__name__)

_UNIFORM = re.compile(r"uniform:(\d+)")


def check_frames_spec(spec: str) -> None:
    """Refuse a bad `--frames` value before any work starts."""
    match = _UNIFORM.fullmatch(spec)
    if spec not in ("first", "middle") and not (match and int(match.group(1)) >= 1):
        raise ValueError(f"--frames must be first, middle or uniform:N with N >= 1, not {spec!r}")


def frame_indices(spec: str, frame_count: int) -> list[int]:
    """Which frames represent a video: the first, the middle, or N spread evenly (centres of N
    equal segments, so uniform:1 is the middle frame)."""
    check_frames_spec(spec)
    if frame_count <= 0:
        return []
    if spec == "first":
        return [0]
    if spec == "middle":
        return [frame_count // 2]
    wanted = min(int(spec.split(":")[1]), frame_count)
    return sorted({int((i + 0.5) * frame_count / wanted) for i in range(wanted)})


def read_frames(path: Path, indices: list[int]) -> dict[int, np.ndarray]:
    """The given frames as RGB arrays, read in order (seeking is not frame-exact in every
    codec, and a 360p file decodes fast)."""
    wanted = set(indices)
    frames: dict[int, np.ndarray] = {}
    capture = cv2.VideoCapture(str(path))
    try:
        index = 0
        while wanted - frames.keys() and capture.grab():
            if index in wanted:
                ok, bgr = capture.retrieve()
                if ok:
                    frames[index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
    return frames


@dataclass(frozen=True)
class DepthMap:
    depth_m: np.ndarray  # float32, height x width, metres (relative units for non-metric models)
    focal_length_px: float | None


# Set in the config.json of a model with random weights (tasks/tiny_depth_pro.py): every depth
# output of such a model is labelled untrained, so no one mistakes its numbers for real depth.
UNTRAINED_CONFIG_KEY = "vidflow_untrained_weights"


def is_untrained(config: object) -> bool:
    """Whether a transformers config carries the untrained-weights marker."""
    return bool(getattr(config, UNTRAINED_CONFIG_KEY, False))


def resolve_depth_device(requested: str) -> str:
    import torch

    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            log.warning("CUDA was asked for but is not available; depth runs on the CPU")
            return "cpu"
        return "cuda"
    return "cpu"


class DepthEstimator:
    """A transformers depth model with its image processor, ready to run on RGB frames."""

    def __init__(self, model_name: str, device: str = "auto") -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model_name = model_name
        self.device = resolve_depth_device(device)
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        started = time.perf_counter()
        self.processor = AutoImageProcessor.from_pretrained(model_name)
        self.model = AutoModelForDepthEstimation.from_pretrained(model_name, dtype=self.dtype)
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


@functools.cache
def shared_estimator(model_name: str, device: str) -> DepthEstimator:
    """One estimator per process and model: a reused Ray worker loads the weights once."""
    return DepthEstimator(model_name, device)


def depth_preview(depth_m: np.ndarray) -> np.ndarray:
    """A colour picture of a depth map (near is warm), as BGR for cv2.imwrite."""
    inverse = 1.0 / np.clip(depth_m, 1e-3, None)
    low, high = float(inverse.min()), float(inverse.max())
    scaled = (inverse - low) / (high - low) if high > low else np.zeros_like(inverse)
    return cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part{path.suffix}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _save_npy(array: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with path.open("wb") as out:
            np.save(out, array)

    return write


def _save_png(image: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        if not cv2.imwrite(str(path), image):
            raise OSError(f"could not write {path}")

    return write


def estimate_depth(
    record: VideoRecord,
    maps_dir: Path,
    settings: DepthSettings,
    estimator: DepthEstimator | None = None,
) -> VideoRecord:
    """Depth maps (float16 `.npy` plus a `.png` preview) of the record's representative frames."""
    if record.failed:
        return record
    started = time.perf_counter()
    path = Path(record.transcoded_path or "")
    indices = frame_indices(settings.frames, record.frame_count or 0)
    frames = read_frames(path, indices)
    if not frames:
        return record.fail("depth", f"no frame could be read from {path}")
    try:
        estimator = estimator or shared_estimator(settings.depth_model, settings.device)
        maps = estimator.estimate([frames[index] for index in sorted(frames)])
    except Exception as exc:  # a model failure is this video's failure, reported as a row
        log.exception("%s: depth failed", record.video_id)
        return record.fail("depth", f"{type(exc).__name__}: {exc}")
    video_dir = maps_dir / record.video_id
    video_dir.mkdir(parents=True, exist_ok=True)
    npy_paths, png_paths = [], []
    for index, depth in zip(sorted(frames), maps, strict=True):
        npy_path = video_dir / f"frame_{index:06d}.npy"
        png_path = video_dir / f"frame_{index:06d}.png"
        _write_atomically(npy_path, _save_npy(depth.depth_m.astype(np.float16)))
        _write_atomically(png_path, _save_png(depth_preview(depth.depth_m)))
        npy_paths.append(str(npy_path))
        png_paths.append(str(png_path))
    all_depths = np.stack([depth.depth_m for depth in maps])
    focals = [depth.focal_length_px for depth in maps if depth.focal_length_px is not None]
    return record.finish(
        status="ok",
        depth_frame_indices=sorted(frames),
        depth_paths=npy_paths,
        depth_preview_paths=png_paths,
        depth_min_m=float(all_depths.min()),
        depth_mean_m=float(all_depths.mean()),
        depth_max_m=float(all_depths.max()),
        focal_length_px=float(np.mean(focals)) if focals else None,
        depth_model=estimator.model_name,
        depth_untrained=estimator.untrained,
        depth_s=time.perf_counter() - started,
    )
