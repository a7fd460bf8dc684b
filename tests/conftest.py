from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.inference.launcher import ServerProcess, start_server

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
VIDEOS = SHARED_DATA / "videos"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache for the whole run, so the model is exported once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def onnx_server(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Iterator[ServerProcess]:
    """The default service (EfficientNet-Lite0, ONNX Runtime, dynamic batching) on 127.0.0.1."""
    server = start_server(
        tmp_path_factory.mktemp("onnx-server"), model_cache, "--backend", "onnx",
        "--max-batch-delay-ms", "5",
    )  # fmt: skip
    try:
        server.wait_serving()
        yield server
    finally:
        server.terminate()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Real photos that ship inside scikit-image, with the ImageNet classes a person would name."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    return {
        name: (data / file).read_bytes()
        for name, file in {
            "cat": "chelsea.png",
            "coffee": "coffee.png",
            "rocket": "rocket.jpg",
            "motorcycle": "motorcycle_left.png",
        }.items()
    }


# What a person would call each photo, in ImageNet's words.
EXPECTED_CLASSES = {
    "cat": {"tabby", "tiger cat", "Egyptian cat"},
    "coffee": {"espresso", "cup", "coffee mug"},
    "rocket": {"missile", "projectile", "space shuttle"},
    "motorcycle": {"moped", "motor scooter", "crash helmet"},
}


@pytest.fixture(scope="session")
def video_frames() -> list[bytes]:
    """Real video frames (a Kinetics-400 clip), JPEG-encoded."""
    from vidflow.frames import load_encoded_images

    return load_encoded_images(VIDEOS / "k400_arm_wrestling.mp4", max_frames=16)
