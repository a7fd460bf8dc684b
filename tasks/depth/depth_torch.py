"""Depth through PyTorch and Hugging Face transformers (`AutoModelForDepthEstimation`): the
backend on a GPU (float16 batches), and on the CPU for a model ONNX Runtime cannot take."""

from __future__ import annotations

import logging
import time

import numpy as np

from common.devices import choose_device
from tasks.depth.depth_model import DepthMap, is_untrained
from tasks.depth.model_files import model_source

log = logging.getLogger(__name__)


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
        """Depth of each frame, at the frame's own size.

        A processor that keeps the aspect ratio (Depth Anything, DPT) cannot stack frames of
        two shapes, and a batch of a 16:9 and a 4:3 video failed both: such a batch goes
        through the model one shape at a time (Depth Pro's processor resizes every frame to
        one square, so its mixed batches stay whole)."""
        try:
            inputs = self.processor(images=frames_rgb, return_tensors="pt")
        except ValueError:
            if len({frame.shape for frame in frames_rgb}) == 1:
                raise
            return self._by_shape(frames_rgb)
        return self._estimated(inputs, frames_rgb)

    def _by_shape(self, frames_rgb: list[np.ndarray]) -> list[DepthMap]:
        positions: dict[tuple[int, ...], list[int]] = {}
        for position, frame in enumerate(frames_rgb):
            positions.setdefault(frame.shape, []).append(position)
        maps: dict[int, DepthMap] = {}
        for group in positions.values():
            frames = [frames_rgb[position] for position in group]
            inputs = self.processor(images=frames, return_tensors="pt")
            maps.update(zip(group, self._estimated(inputs, frames), strict=True))
        return [maps[position] for position in range(len(frames_rgb))]

    def _estimated(self, inputs: dict, frames_rgb: list[np.ndarray]) -> list[DepthMap]:
        import torch

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
