"""Depth on the CPU through ONNX Runtime: the model exported once per model version and cached,
and Depth Pro's image pre- and post-processing in NumPy and OpenCV.

Why: a CPU depth actor that runs the transformers model first imports torch and transformers
and builds the model, ~4 CPU-s on every run (measured: torch 1.3, transformers and the tiny
model 2.8), more than the depth inference of 48 videos at one frame each (~1 CPU-s). ONNX
Runtime opens a cached export in ~0.45 CPU-s and runs a frame ~40 % cheaper. The export needs
torch and transformers once per model version, like the inference service's
(services/inference/onnx_export.py); the processing mirrors transformers'
`DepthProImageProcessor`, and tests hold the two to the same maps.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common.files import exclusive_lock, sync_to_disk
from tasks.depth.depth_model import DepthMap, check_depth_model
from tasks.depth.model_files import digest_model_files
from tasks.depth.model_files import model_dir as local_model_dir

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = "1"  # bump when the export changes, to invalidate caches
OPSET = 17
MODEL_FILE = "model.onnx"
BILINEAR = 2  # PIL's code for bilinear resampling, as preprocessor_config.json writes it


class OnnxUnsupportedError(ValueError):
    """The model is not one this module can run through ONNX (the torch path still can)."""


@dataclass(frozen=True)
class DepthProProcessing:
    """What Depth Pro's image processor does, from its preprocessor_config.json."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> DepthProProcessing:
        config = json.loads((model_dir / "config.json").read_text())
        processor = json.loads((model_dir / "preprocessor_config.json").read_text())
        if config.get("model_type") != "depth_pro":
            raise OnnxUnsupportedError(f"not a Depth Pro model: {config.get('model_type')!r}")
        kind = processor.get("image_processor_type", "")
        flags = [processor.get(key, True) for key in ("do_resize", "do_rescale", "do_normalize")]
        if not kind.startswith("DepthPro") or not all(flags):
            raise OnnxUnsupportedError(f"image processor {kind} with {processor} is not handled")
        if processor.get("resample", BILINEAR) != BILINEAR:
            raise OnnxUnsupportedError(f"resampling {processor['resample']} is not bilinear")
        size = processor.get("size", {"height": 1536, "width": 1536})
        return cls(
            height=int(size["height"]),
            width=int(size["width"]),
            mean=tuple(processor.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(processor.get("image_std", (0.5, 0.5, 0.5))),
            rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        )

    def preprocess(self, frame_rgb: np.ndarray) -> np.ndarray:
        """One RGB uint8 frame as the model's 1 x 3 x H x W input: rescaled and normalised
        first, then resized bilinearly without antialiasing, in that order, as transformers'
        processor does (OpenCV's linear resize samples the same half-pixel centres)."""
        scale = np.float32(self.rescale_factor)
        mean, std = np.float32(self.mean), np.float32(self.std)
        normalised = (frame_rgb.astype(np.float32) * scale - mean) / std
        resized = cv2.resize(normalised, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(resized.transpose(2, 0, 1)[None])

    @staticmethod
    def postprocess(
        inverse_depth: np.ndarray, field_of_view_deg: float | None, size: tuple[int, int]
    ) -> DepthMap:
        """Depth at the frame's own size (`size` is height, width) from the model's output at
        its own size: scaled by the focal length the field of view gives (metric; a model
        without a field-of-view head gives relative depth), resized, and inverted, as
        transformers' `post_process_depth_estimation`."""
        height, width = size
        scaled, focal_length = inverse_depth.astype(np.float32), None
        if field_of_view_deg is not None:
            focal_length = 0.5 * width / math.tan(0.5 * math.radians(field_of_view_deg))
            scaled = scaled * np.float32(width / focal_length)
        resized = cv2.resize(scaled, (width, height), interpolation=cv2.INTER_LINEAR)
        depth = 1.0 / np.clip(resized, 1e-4, 1e4)
        return DepthMap(
            depth_m=depth.astype(np.float32),
            focal_length_px=None if focal_length is None else float(focal_length),
        )


def export_key(model_dir: Path) -> str:
    """Names one export: the model's configs, its weight files (name, size and time, not their
    gigabytes of content) and the exporting library versions."""
    digest = hashlib.sha256(EXPORT_FORMAT_VERSION.encode())
    digest_model_files(digest, model_dir)
    for package in ("torch", "transformers"):
        try:
            digest.update(importlib.metadata.version(package).encode())
        except importlib.metadata.PackageNotFoundError:  # a runtime without the exporter
            digest.update(b"-")
    return digest.hexdigest()[:16]


def export_depth_onnx(model_dir: Path, cache_dir: Path) -> Path:
    """The cached ONNX export of the Depth Pro model in `model_dir`, exported first if needed.

    Exported for one image at a time: Depth Pro's patch split is traced with the batch size as
    a constant, so a graph exported for a batch runs that batch size only (on the CPU a frame
    costs the same alone or in a batch). Written into a hidden folder and renamed whole, so a
    crash or a second exporter never leaves a half file under the final name. The exporter
    writes a model over 2 GB (full-size Depth Pro) with its weights as external data beside
    the graph, in the same folder; that size is not exported in the tests (an export that
    fails leaves the model on torch, see `load_depth_estimator`).
    """
    target = cache_dir / f"depth-pro-{export_key(model_dir)}"
    if (target / MODEL_FILE).is_file():
        return target / MODEL_FILE
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One exporter at a time per export: CPU actors that started together each traced and
    # exported the full model at once (several GB of memory each), and an OOM kill restarted
    # them to export again. The others wait, then find the export made.
    with exclusive_lock(cache_dir / f".{target.name}.lock") as locked:
        if locked:  # the only exporter now (else each exports): a folder left was left by a kill
            for left in cache_dir.glob(f".{target.name}.*"):
                if left.is_dir():  # an OOM kill mid-export left ~2 GB for good
                    shutil.rmtree(left, ignore_errors=True)
        if (target / MODEL_FILE).is_file():
            return target / MODEL_FILE
        return _export(model_dir, cache_dir, target)


def _export(model_dir: Path, cache_dir: Path, target: Path) -> Path:
    """Trace and export the model into `target`, built beside it and renamed whole."""
    import torch
    from transformers import AutoModelForDepthEstimation

    processing = DepthProProcessing.from_model_dir(model_dir)
    log.info("exporting depth model %s to ONNX (opset %d) -> %s", model_dir, OPSET, target)
    started = time.perf_counter()
    model = AutoModelForDepthEstimation.from_pretrained(model_dir, dtype=torch.float32).eval()
    example = torch.zeros(1, 3, processing.height, processing.width)
    has_fov = bool(getattr(model.config, "use_fov_model", False))
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and traces
            torch.onnx.export(
                _plain_outputs(model),
                (example,),
                str(building / MODEL_FILE),
                input_names=["pixel_values"],
                output_names=["inverse_depth", "field_of_view"][: 2 if has_fov else 1],
                opset_version=OPSET,
                dynamo=False,  # the TorchScript exporter: deprecated, but it handles this model
            )
        sync_to_disk(building)  # the cache is trusted on sight: no empty file after a crash
        # mkdtemp's 0700, renamed as is, shut the export to every other user of a shared
        # cache (a host's and a container's): theirs failed (found in review, stop 62)
        building.chmod(0o777 & ~_umask())
        with contextlib.suppress(OSError):  # another process finished the same export first
            os.replace(building, target)
        sync_to_disk(cache_dir, contents=False)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    log.info("exported depth model to ONNX in %.1f s", time.perf_counter() - started)
    return target / MODEL_FILE


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _plain_outputs(model: Any) -> Any:
    """The model as a module returning plain tensors (the exporter cannot return a ModelOutput)."""
    import torch

    class Outputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outputs = self.model(pixel_values=pixel_values)
            if outputs.field_of_view is None:  # a model without the field-of-view head
                return (outputs.predicted_depth,)
            return outputs.predicted_depth, outputs.field_of_view

    return Outputs()


class OnnxDepthEstimator:
    """A Depth Pro model run by ONNX Runtime on the CPU: the same interface and maps as
    `DepthEstimator`, without torch or transformers in the process once the export is cached."""

    device = "cpu"

    def __init__(self, model_name: str, cache_dir: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        started = time.perf_counter()
        self.model_name = model_name
        # configs and weights, not every format a repo has
        model_dir = local_model_dir(model_name, ["*.json", "*.safetensors"])
        self.processing = DepthProProcessing.from_model_dir(model_dir)
        self.untrained = check_depth_model(str(model_dir))
        if self.untrained:
            log.warning("depth model %s has UNTRAINED weights: depth means nothing", model_name)
        path = export_depth_onnx(model_dir, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = max(1, threads)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        log.info(
            "loaded depth model %s on cpu (ONNX Runtime, %s) in %.1f s",
            model_name, path, time.perf_counter() - started,
        )  # fmt: skip

    def estimate(self, frames_rgb: list[np.ndarray]) -> list[DepthMap]:
        """Depth of each frame, at the frame's own size (one model call per frame: see
        `export_depth_onnx`)."""
        maps = []
        for frame in frames_rgb:
            inverse_depth, *field_of_view = self.session.run(
                None, {"pixel_values": self.processing.preprocess(frame)}
            )
            fov = float(field_of_view[0][0]) if field_of_view else None
            maps.append(self.processing.postprocess(inverse_depth[0], fov, frame.shape[:2]))
        return maps
