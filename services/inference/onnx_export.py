"""Exports a loaded model to ONNX once and caches it by a hash of its weights.

The exported file carries what serving needs in its metadata (model name, class names,
preprocessing, weights hash), so `vidflow serve --onnx-model FILE` runs without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
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


def a_broken_file(exc: Exception) -> bool:
    """Whether ONNX Runtime, or the metadata check, refused the file itself (not a device,
    not memory): the one rule by which the server and `export-onnx` make a cached export
    again."""
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        InvalidArgument,  # an empty file: "No graph was found in the protobuf"
        InvalidGraph,
        InvalidProtobuf,
    )

    refused = InvalidProtobuf | InvalidGraph | InvalidArgument
    return isinstance(exc, refused) or "lacks vidflow metadata" in str(exc)


def export_problem(path: Path) -> str | None:
    """Why the file at `path` cannot be served (cut short, empty, not ONNX, no vidflow
    metadata: `a_broken_file`), or None; for `export-onnx` to check before it hands a cached
    export out (a copy of a broken one failed every start where it was served). Any other
    failure (no memory for the session) is raised: the file is not at fault."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ExportedModelInfo.from_metadata(session.get_modelmeta().custom_metadata_map)
    except Exception as exc:
        if not a_broken_file(exc):
            raise
        return str(exc) or type(exc).__name__
    return None


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
    with atomic_output(target, durable=True) as partial:
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
