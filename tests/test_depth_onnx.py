"""Depth on ONNX Runtime (tasks/depth/depth_onnx.py) against transformers' own Depth Pro path:
the same processing, the same network outputs, the export cached, and torch left out."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.settings import SAMPLE_VIDEO
from tasks.depth.depth_loader import load_depth_estimator
from tasks.depth.depth_onnx import (
    DepthProProcessing,
    OnnxDepthEstimator,
    OnnxUnsupportedError,
    export_depth_onnx,
    export_key,
)
from tasks.depth.depth_torch import DepthEstimator
from tasks.depth.frame_choice import read_frames
from tasks.depth.settings import DepthSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A real RGB frame at the flow's 360p, larger than the tiny model's input (a downscale)."""
    import cv2

    return cv2.resize(read_frames(SAMPLE_VIDEO, [40])[40], (478, 360))


def test_preprocessing_equals_the_transformers_processor(
    tiny_depth_model: Path, frame: np.ndarray
) -> None:
    from transformers import AutoImageProcessor

    expected = AutoImageProcessor.from_pretrained(tiny_depth_model)(
        images=[frame], return_tensors="pt"
    )["pixel_values"].numpy()
    ours = DepthProProcessing.from_model_dir(tiny_depth_model).preprocess(frame)
    assert ours.shape == expected.shape == (1, 3, 128, 128)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("fov", [60.0, None])
def test_postprocessing_equals_the_transformers_processor(
    tiny_depth_model: Path, fov: float | None
) -> None:
    """On plausible outputs (positive inverse depth, a 60 degree view or none), where the clamp
    does not hide a difference."""
    import torch
    from transformers import AutoImageProcessor
    from transformers.models.depth_pro.modeling_depth_pro import DepthProDepthEstimatorOutput

    rng = np.random.default_rng(0)
    inverse_depth = rng.uniform(0.05, 2.0, size=(1, 256, 256)).astype(np.float32)
    outputs = DepthProDepthEstimatorOutput(
        predicted_depth=torch.from_numpy(inverse_depth),
        field_of_view=None if fov is None else torch.tensor([fov]),
    )
    processor = AutoImageProcessor.from_pretrained(tiny_depth_model)
    expected = processor.post_process_depth_estimation(outputs, target_sizes=[(360, 478)])[0]
    ours = DepthProProcessing.postprocess(inverse_depth[0], fov, (360, 478))
    assert ours.depth_m.shape == (360, 478)
    # OpenCV's and torch's bilinear weights differ in the last bits (2e-4 at most, here):
    # within the float16 the maps are stored as (5e-4).
    np.testing.assert_allclose(ours.depth_m, expected["predicted_depth"].numpy(), rtol=5e-4)
    if fov is None:
        assert ours.focal_length_px is None and expected["focal_length"] is None
    else:
        assert ours.focal_length_px == pytest.approx(float(expected["focal_length"]), rel=1e-6)


@pytest.mark.parametrize("fov", [True, False])
def test_the_export_computes_what_the_torch_model_does(
    tiny_depth_model: Path, frame: np.ndarray, tmp_path: Path, fov: bool
) -> None:
    """With the field-of-view head (apple/DepthPro-hf) and without it (relative depth)."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForDepthEstimation

    from devstack.tiny_depth_pro import save_tiny_depth_pro

    model_dir = tiny_depth_model if fov else save_tiny_depth_pro(tmp_path / "no-fov", fov=False)
    pixel_values = DepthProProcessing.from_model_dir(model_dir).preprocess(frame)
    exported = export_depth_onnx(model_dir, tmp_path / "cache")
    session = ort.InferenceSession(str(exported))
    # Open to the cache's other users as the umask says (mkdtemp's 0700 shut them out of a
    # shared cache: found in review, stop 62)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(exported.parent.stat().st_mode) == 0o777 & ~umask
    inverse_depth, *field_of_view = session.run(None, {"pixel_values": pixel_values})
    model = AutoModelForDepthEstimation.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        expected = model(pixel_values=torch.from_numpy(pixel_values))
    # ONNX Runtime fuses and reorders the float32 sums: differences of ~1e-4 of the scale.
    scale = float(np.abs(expected.predicted_depth.numpy()).max())
    np.testing.assert_allclose(
        inverse_depth, expected.predicted_depth.numpy(), rtol=1e-3, atol=1e-3 * scale
    )
    if fov:
        np.testing.assert_allclose(field_of_view[0], expected.field_of_view.numpy(), rtol=1e-4)
    else:
        assert field_of_view == [] and expected.field_of_view is None
        estimator = OnnxDepthEstimator(str(model_dir), tmp_path / "cache")
        assert estimator.estimate([frame])[0].focal_length_px is None


def test_a_cached_export_loads_without_torch_or_transformers(
    tiny_depth_model: Path, tmp_path: Path, frame: np.ndarray
) -> None:
    """The second process to load the model finds the export and never imports torch (the CPU
    that the ONNX path saves on every run); both give the same maps."""
    first = OnnxDepthEstimator(str(tiny_depth_model), tmp_path)
    exported = sorted(tmp_path.rglob("*.onnx"))
    assert len(exported) == 1 and first.untrained is True
    made = exported[0].stat().st_mtime_ns, exported[0].stat().st_ino
    np.save(tmp_path / "frame.npy", frame)
    script = f"""
import sys
from pathlib import Path
import numpy as np
from tasks.depth.depth_onnx import OnnxDepthEstimator
estimator = OnnxDepthEstimator({str(tiny_depth_model)!r}, Path({str(tmp_path)!r}))
depth = estimator.estimate([np.load({str(tmp_path / "frame.npy")!r})])[0].depth_m
np.save({str(tmp_path / "depth.npy")!r}, depth)
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout
    assert sorted(tmp_path.rglob("*.onnx")) == exported  # the same export, not a second one
    assert (exported[0].stat().st_mtime_ns, exported[0].stat().st_ino) == made  # not made again
    np.testing.assert_array_equal(
        np.load(tmp_path / "depth.npy"), first.estimate([frame])[0].depth_m
    )


def test_cpu_runs_on_onnx_and_a_model_it_cannot_export_falls_back_to_torch(
    tiny_depth_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = DepthSettings(depth_model=str(tiny_depth_model), cache_dir=tmp_path / "cache")
    assert isinstance(load_depth_estimator(settings, "cpu"), OnnxDepthEstimator)
    torch_only = settings.model_copy(update={"depth_backend": "torch"})
    assert isinstance(load_depth_estimator(torch_only, "cpu"), DepthEstimator)

    bicubic = tmp_path / "bicubic"
    shutil.copytree(tiny_depth_model, bicubic)
    config = json.loads((bicubic / "preprocessor_config.json").read_text())
    (bicubic / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 3}))
    other = settings.model_copy(update={"depth_model": str(bicubic)})
    with caplog.at_level(logging.WARNING, logger="tasks.depth.depth_loader"):
        assert isinstance(load_depth_estimator(other, "cpu"), DepthEstimator)
    assert "cannot run on ONNX Runtime" in caplog.text and "not bilinear" in caplog.text
    with pytest.raises(OnnxUnsupportedError, match="not bilinear"):
        load_depth_estimator(other.model_copy(update={"depth_backend": "onnx"}), "cpu")


def test_the_onnx_backend_refuses_a_gpu_instead_of_running_on_the_cpu(
    tiny_depth_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    settings = DepthSettings(
        depth_model=str(tiny_depth_model), depth_backend="onnx", cache_dir=tmp_path
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node (none here)
    with pytest.raises(ValueError, match="CPU only"):
        load_depth_estimator(settings, "cuda")


def test_a_gpu_actor_whose_torch_sees_no_gpu_runs_onnx_with_its_threads(
    tiny_depth_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An actor placed on a GPU (Ray saw one) whose torch cannot use it (a CPU-only build, a
    driver mismatch) ran torch on the CPU with every core of the node, holding no CPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on such a node
    settings = DepthSettings(depth_model=str(tiny_depth_model), cache_dir=tmp_path)
    with caplog.at_level("WARNING"):
        estimator = load_depth_estimator(settings, "cuda", threads=3)
    assert isinstance(estimator, OnnxDepthEstimator)
    options = estimator.session.get_session_options()
    assert options.intra_op_num_threads == 3  # its threads, not every core of the node
    assert "no CUDA GPU is usable" in caplog.text  # and it says so


def test_exporters_started_together_export_the_model_once(
    tiny_depth_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CPU depth actors that started together each traced and exported the full model at
    once (several GB of memory each): the others now wait and find the export made."""
    import threading

    made: list[Path] = []
    # What an exporter killed mid-export (an OOM kill) left: ~2 GB for good, for the full model.
    left = tmp_path / "cache" / f".depth-pro-{export_key(tiny_depth_model)}.k1ll3d"
    left.mkdir(parents=True)
    (left / "model.onnx").write_bytes(b"half a graph")

    def export() -> None:
        made.append(export_depth_onnx(tiny_depth_model, tmp_path / "cache"))

    with caplog.at_level(logging.INFO, logger="tasks.depth.depth_onnx"):
        exporters = [threading.Thread(target=export) for _ in range(2)]
        for exporter in exporters:
            exporter.start()
        for exporter in exporters:
            exporter.join(180)
    assert len(made) == 2 and made[0] == made[1] and made[0].is_file()
    assert caplog.text.count("exporting depth model") == 1, caplog.text
    assert not left.exists()
