"""Choosing where a model runs: the one rule the service and the depth model share."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# The NVIDIA driver's list of GPUs: read without CUDA or torch.
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def nvidia_gpu_present() -> bool:
    """Whether the NVIDIA driver lists a GPU here (Linux), whatever the runtimes can use."""
    try:
        return any(NVIDIA_GPUS.iterdir())
    except OSError:
        return False


class DeviceUnavailableError(RuntimeError):
    """CUDA was asked for with strict placement, and no CUDA GPU is usable."""


def choose_device(
    requested: str,
    cuda_available: Callable[[], bool],
    *,
    strict: bool = False,
    what: str = "model",
    why_not: Callable[[], str] = lambda: "",
) -> str:
    """'cuda' or 'cpu' for a request of auto, cpu or cuda, saying why in the log.

    `cuda_available` is only called when the answer depends on it, so `cpu` never imports a
    GPU runtime. Without a GPU, `cuda` falls back to the CPU with a warning, or raises
    `DeviceUnavailableError` when `strict`; `why_not` says why where there is a GPU after all
    (a runtime built for the CPU read as "no GPU").
    """
    if requested == "cpu":
        return "cpu"
    if requested not in ("auto", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {requested!r}")
    if cuda_available():
        log.info("device: CUDA is available, the %s runs on the GPU", what)
        return "cuda"
    reason = why_not()
    if requested == "cuda":
        if strict:
            raise DeviceUnavailableError(
                f"--device cuda was asked for but no CUDA GPU is usable{': ' * bool(reason)}"
                f"{reason}"
            )
        log.warning(
            "device: --device cuda asked for but no CUDA GPU is usable; falling back to CPU "
            "(%s)%s", what, f": {reason}" if reason else "",
        )  # fmt: skip
    elif reason:
        log.warning("device: the %s runs on the CPU: %s", what, reason)
    else:
        log.info("device: no CUDA GPU found, the %s runs on the CPU", what)
    return "cpu"
