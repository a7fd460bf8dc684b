"""Choosing where a model runs: the one rule the service and the depth model share."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class DeviceUnavailableError(RuntimeError):
    """CUDA was asked for with strict placement, and no CUDA GPU is usable."""


def choose_device(
    requested: str, cuda_available: Callable[[], bool], *, strict: bool = False, what: str = "model"
) -> str:
    """'cuda' or 'cpu' for a request of auto, cpu or cuda, saying why in the log.

    `cuda_available` is only called when the answer depends on it, so `cpu` never imports a
    GPU runtime. Without a GPU, `cuda` falls back to the CPU with a warning, or raises
    `DeviceUnavailableError` when `strict`.
    """
    if requested == "cpu":
        return "cpu"
    if requested not in ("auto", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {requested!r}")
    if cuda_available():
        log.info("device: CUDA is available, the %s runs on the GPU", what)
        return "cuda"
    if requested == "cuda":
        if strict:
            raise DeviceUnavailableError("--device cuda was asked for but no CUDA GPU is usable")
        log.warning(
            "device: --device cuda asked for but no CUDA GPU is usable; falling back to CPU (%s)",
            what,
        )
    else:
        log.info("device: no CUDA GPU found, the %s runs on the CPU", what)
    return "cpu"
