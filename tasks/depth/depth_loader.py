"""Loading the depth model on its backend, once per process (a reused Ray worker or actor keeps
its weights loaded between shards)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from common.devices import choose_device
from tasks.depth.depth_model import Estimator, check_depth_backend
from tasks.depth.settings import DepthSettings

log = logging.getLogger(__name__)


def load_depth_estimator(
    settings: DepthSettings, device: str, threads: int = 1, notes: list[str] | None = None
) -> Estimator:
    """The depth model of `settings` on `device` (auto, cpu or cuda) with `threads` CPU
    threads, run by its backend.

    Backend auto: ONNX Runtime on the CPU (no torch or transformers imports once the export is
    cached: seconds of CPU a run), torch on a GPU (float16 batches), and torch where a model
    cannot be exported, with a warning saying why.
    """
    backend = settings.depth_backend
    if device == "auto" and backend == "onnx":  # ONNX runs on the CPU: auto means it
        device = "cpu"
    if device in ("auto", "cuda"):
        # A "cuda" actor on a node whose torch cannot use its GPU (a CPU-only build, a driver
        # mismatch) ran torch on every core: resolved here, it gets ONNX and its thread count.
        import torch

        asked, device = device, choose_device(device, torch.cuda.is_available, what="depth model")
        if asked == "cuda" and device == "cpu" and notes is not None:
            notes.append("placed on a GPU that torch here cannot use (a CPU build, a driver)")
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
            if notes is not None:
                notes.append(f"it cannot run on ONNX Runtime ({type(exc).__name__}: {exc})")
    import torch

    from tasks.depth.depth_torch import DepthEstimator

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
