"""Exports a loaded model to ONNX once and caches it by a hash of its weights.

The exported file carries what serving needs in its metadata (model name, class names,
preprocessing, weights hash), so `vidflow serve --onnx-model FILE` runs without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import warnings
from pathlib import Path

from common.files import atomic_output, remove_stale_partials
from services.inference.models import LoadedModel, with_softmax
from services.inference.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_FORMAT_VERSION = "1"  # bump when the export itself changes, to invalidate caches


@dataclasses.dataclass(frozen=True)
class ExportedModelInfo:
    """What an exported ONNX file says about itself."""

    name: str
    class_names: list[str]
    preprocess: PreprocessSpec
    weights_sha256: str

    def to_metadata(self) -> dict[str, str]:
        return {
            "vidflow.model_name": self.name,
            "vidflow.class_names": json.dumps(self.class_names),
            "vidflow.preprocess": json.dumps(dataclasses.asdict(self.preprocess)),
            "vidflow.weights_sha256": self.weights_sha256,
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> ExportedModelInfo:
        try:
            spec = json.loads(metadata["vidflow.preprocess"])
            return cls(
                name=metadata["vidflow.model_name"],
                class_names=json.loads(metadata["vidflow.class_names"]),
                preprocess=PreprocessSpec(
                    resize_short_side=spec["resize_short_side"],
                    crop_size=spec["crop_size"],
                    mean=tuple(spec["mean"]),
                    std=tuple(spec["std"]),
                ),
                weights_sha256=metadata["vidflow.weights_sha256"],
            )
        except KeyError as exc:
            raise ValueError(
                f"ONNX file lacks vidflow metadata {exc}; export it with `vidflow export-onnx`"
            ) from None


def cached_onnx_path(model: LoadedModel, cache_dir: Path) -> Path:
    import torch

    key = hashlib.sha256(
        f"{model.name}|{model.weights_sha256}|{torch.__version__}|{OPSET}|{EXPORT_FORMAT_VERSION}".encode()
    ).hexdigest()[:16]
    return Path(cache_dir) / f"{model.name}-{key}.onnx"


def _by_weights_file(name: str, weights_file: Path, cache_dir: Path) -> Path | None:
    """Where the cache notes which export was made from these very weights bytes; None
    without torch installed (nothing is exported then)."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    digest = hashlib.sha256()
    with open(weights_file, "rb") as weights:
        while chunk := weights.read(1 << 20):
            digest.update(chunk)
    key = hashlib.sha256(
        f"{name}|{digest.hexdigest()}|{torch_version}|{OPSET}|{EXPORT_FORMAT_VERSION}".encode()
    ).hexdigest()[:16]
    return Path(cache_dir) / "by-weights-file" / f"{name}-{key}.json"


def export_made_from(name: str, weights_file: Path, cache_dir: Path) -> Path | None:
    """The cached export made before from this weights file, found without torch.

    An export is cached by a hash of the weights as loaded (`cached_onnx_path`), which takes
    torch and the network to compute: 3.4 of a server's 7.3 s of start-up on 2 cores, for a
    file that was there all along. Keyed here by the file's own bytes instead, so a file
    whose bytes change misses, and is loaded and exported as before."""
    note = _by_weights_file(name, weights_file, cache_dir)
    if note is None or not note.is_file():
        return None
    try:
        export = Path(cache_dir) / Path(json.loads(note.read_text())["export"]).name
    except (ValueError, KeyError, TypeError):  # a note cut short: found the slow way again
        return None
    return export if export.is_file() else None


def note_export_made_from(name: str, weights_file: Path, cache_dir: Path, export: Path) -> None:
    """Remember that `export` was made from this weights file (see export_made_from)."""
    note = _by_weights_file(name, weights_file, cache_dir)
    if note is None:
        return
    note.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(note) as partial:
        partial.write_text(json.dumps({"export": export.name}))


def export_onnx(model: LoadedModel, cache_dir: Path) -> Path:
    """Return the cached ONNX export of `model`, exporting it first if needed."""
    import onnx
    import torch

    target = cached_onnx_path(model, cache_dir)
    # What an export stopped by SIGTERM left (the server ends without waiting for it).
    remove_stale_partials(target.parent, target.name)
    if target.is_file():
        log.info("using cached ONNX export %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s to ONNX (opset %d) -> %s", model.name, OPSET, target)
    wrapped = with_softmax(model.network).cpu()
    example = torch.zeros((1, *model.preprocess.input_shape))
    # Atomic: concurrent servers never see a half-written file.
    with atomic_output(target) as partial:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but reliable
            torch.onnx.export(
                wrapped,
                (example,),
                str(partial),
                input_names=["input"],
                output_names=["probabilities"],
                dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        proto = onnx.load(str(partial))
        info = ExportedModelInfo(
            model.name, model.class_names, model.preprocess, model.weights_sha256
        )
        onnx.helper.set_model_props(proto, info.to_metadata())
        onnx.save(proto, str(partial))
    return target
