"""What a depth model is to the pipeline: the map it gives a frame, the `Estimator` interface its
backends share (`depth_onnx`, `depth_torch`), and the checks a run makes before any download
(the model can be found, the backend suits the device), which import no ML library.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tasks.depth.model_files import (
    NEEDED_FILES,
    WEIGHT_PATTERNS,
    HubUnreachableError,
    cached_model_dir,
    check_hub_reachable,
    is_local_model,
    is_whole_model,
    unreadable_files,
)


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


def check_depth_model(model_name: str, backend: str = "auto") -> bool:
    """Fail before any download if the depth model cannot be found, or `backend` cannot run
    it; return whether it is an untrained stand-in (random weights).

    Reads the model's config.json only, through huggingface_hub: the driver that checks never
    runs the model, so it does not pay torch's and transformers' imports (seconds of CPU).
    """
    if is_local_model(model_name) and not Path(model_name).is_dir():
        raise ValueError(f"depth model folder {model_name} does not exist")
    if Path(model_name).is_dir():
        _check_model_folder(Path(model_name))
    try:
        if Path(model_name).is_dir():
            config_path = Path(model_name) / "config.json"
        else:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(model_name, "config.json")
            # Not all cached (a download cut short leaves config.json alone, and this check
            # itself fetches it): the workers will ask the hub, so it must be reachable.
            if not isinstance(cached, str) or cached_model_dir(model_name) is None:
                check_hub_reachable(model_name)
            if not isinstance(cached, str):
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
    _check_backend_takes(backend, model_name, config["model_type"])
    return is_untrained(config)


def _check_backend_takes(backend: str, model_name: str, model_type: str) -> None:
    """`--depth-backend onnx` exports Depth Pro alone: another model was taken, and each video
    failed at depth once every download and transcode was done."""
    if backend == "onnx" and model_type != "depth_pro":
        raise ValueError(
            f"--depth-backend onnx runs Depth Pro models only; {model_name} is {model_type!r}: "
            "use --depth-backend auto or torch"
        )


def _check_model_folder(folder: Path) -> None:
    """Refuse a folder the run's user cannot load, before any download, rather than fail each
    video at its depth stage."""
    if not os.access(folder, os.R_OK | os.X_OK):  # not even its list of files
        raise ValueError(
            f"depth model folder {folder}: this user (uid {os.getuid()}) may not open it; make "
            "it readable (chmod a+rx)"
        )
    unreadable = unreadable_files(folder)
    if unreadable:
        raise ValueError(
            f"depth model folder {folder}: this user (uid {os.getuid()}) may not read "
            f"{', '.join(unreadable)}; make them readable (chmod a+r)"
        )
    if not is_whole_model(folder):
        raise ValueError(
            f"depth model folder {folder} does not hold a whole model: it needs "
            f"{' and '.join(NEEDED_FILES)} and weights ({' or '.join(WEIGHT_PATTERNS)})"
        )


class Estimator(Protocol):
    """A loaded depth model: `DepthEstimator` (torch) or `depth_onnx.OnnxDepthEstimator`."""

    model_name: str
    device: str
    untrained: bool

    def estimate(self, frames_rgb: list[np.ndarray]) -> list[DepthMap]: ...


def check_depth_backend(backend: str, device: str) -> None:
    """Refuse the ONNX backend on a GPU, where it would run on the CPU instead."""
    if backend == "onnx" and device == "cuda":
        raise ValueError(
            "--depth-backend onnx runs on the CPU only: use --device cpu, or auto or torch"
        )
