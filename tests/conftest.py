from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import settings as hypothesis_settings

from common.net import free_port
from common.settings import SAMPLE_VIDEOS_DIR
from devstack.broker import LocalBroker, start_broker
from devstack.launcher import ServerProcess, start_server
from tasks.stream.settings import KafkaSettings
from tasks.stream.topics import ensure_topics

# Prefect, Ray and the depth model's export cache keep state under these; tests must not
# touch the user's (set before import).
_STATE = Path(tempfile.mkdtemp(prefix="vidflow-tests-"))
# Removed when the session ends (each left ~11 MB of Prefect database and Ray logs behind).
atexit.register(shutil.rmtree, _STATE, ignore_errors=True)
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_TMPDIR", str(_STATE / "ray"))
# Ray's token auth with a token of the session's own, as a run's private Ray has it
# (flows.ray_start.private_ray_auth); the tests' `ray start` clusters take it too.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("VIDFLOW_DEPTH_CACHE_DIR", str(_STATE / "depth-cache"))
# Hugging Face's cache and the user's depth model too, and no test fetches from the hub: after
# an online `make demo` stored the real Depth Pro (1.9 GB) in the user's cache, the demo's
# tests ran it on the CPU and timed out, and the PostgreSQL test fetched it where it was not
# there yet (found in review, stop 57). Tests of the hub serve one of their own on loopback.
os.environ["HF_HOME"] = str(_STATE / "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
for _name in ("VIDFLOW_DEPTH_DEPTH_MODEL", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    os.environ.pop(_name, None)

# No per-example time limit for property tests: speed is measured in bench/, and on a shared
# 2-core CI machine one example of plain arithmetic took 289 ms (the default limit is 200).
hypothesis_settings.register_profile("vidflow", deadline=None)
hypothesis_settings.load_profile("vidflow")

VIDEOS = SAMPLE_VIDEOS_DIR


@pytest.fixture(autouse=True)
def _signal_handlers_as_they_were() -> Iterator[None]:
    """Commands run in-process (`main([...])`) set handlers for SIGINT, SIGTERM and SIGHUP:
    left behind, the session ignored a CI runner's SIGTERM and took two Ctrl-C."""
    kept = {number: signal.getsignal(number) for number in SIGNALS_A_COMMAND_SETS}
    yield
    for number, handler in kept.items():
        signal.signal(number, handler)


SIGNALS_A_COMMAND_SETS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test() -> Iterator[None]:
    """Kill a `vidflow serve` that a test started and left running (it failed before its
    stop): else it held a core of the two for the rest of the session. Servers of session
    fixtures are up before this runs, and are left be."""
    here = psutil.Process()
    before = {child.pid for child in here.children()}
    yield
    for child in here.children():
        with contextlib.suppress(psutil.Error):
            if child.pid not in before and "serve" in child.cmdline():
                child.kill()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache for the whole run, so the model is exported once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def onnx_server(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Iterator[ServerProcess]:
    """The service (EfficientNet-Lite0, ONNX Runtime) on 127.0.0.1, with dynamic batching on:
    `--batching auto` finds it does not pay on this CPU, and batch behaviour must be exercised
    (neighbours of a bad image in one batch, batch metrics) whatever the machine measures."""
    server = start_server(
        tmp_path_factory.mktemp("onnx-server"), model_cache, "--backend", "onnx",
        "--max-batch-delay-ms", "5", "--batching", "on",
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
    from common.frames import load_encoded_images

    return load_encoded_images(VIDEOS / "k400_arm_wrestling.mp4", max_frames=16)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A real Prefect API (temporary server with its own SQLite database) for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_home_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PREFECT_HOME whose database a real server has set up (migrations, block types), made
    once: a test that needs a Prefect history of its own starts from a copy (`copy_prefect_home`)
    instead of from nothing, since a server's first start on a new database takes ~10 s of the
    two cores and a later one ~4. The demo's test still starts from nothing, as a user does."""
    from devstack.local_stack import LocalStack

    made = tmp_path_factory.mktemp("prefect-home-template")
    stack = LocalStack(logs_dir=made, prefect_home=made / "home", ui_port=free_port())
    try:
        stack.start_server()
    finally:
        stack.stop()
    return made / "home"


def copy_prefect_home(template: Path, home: Path) -> str:
    """`home` as a copy of `template` (see prefect_home_template); its path, for PREFECT_HOME."""
    shutil.copytree(template, home)
    return str(home)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    broker = start_broker(free_port(), log_path=tmp_path_factory.mktemp("broker") / "tansu.log")
    yield broker
    assert broker.stop() in (0, -signal.SIGTERM)


def fresh_topics(broker: LocalBroker, partitions: int = 2) -> KafkaSettings:
    """Kafka settings naming new topics on `broker`, created now."""
    suffix = uuid.uuid4().hex[:8]
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap_servers,
        frames_topic=f"frames-{suffix}",
        results_topic=f"predictions-{suffix}",
        dlq_topic=f"frames-{suffix}.dlq",
        partitions=partitions,
    )
    ensure_topics(settings)
    return settings


@pytest.fixture
def kafka(broker: LocalBroker) -> KafkaSettings:
    """Fresh topics for each test, on the shared broker."""
    return fresh_topics(broker)


@pytest.fixture(scope="session")
def tiny_depth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Depth Pro of toy size with random weights, saved like a downloaded model (no depth
    weights can be had offline); loading it goes through the real transformers path."""
    from devstack.tiny_depth_pro import save_tiny_depth_pro

    return save_tiny_depth_pro(tmp_path_factory.mktemp("tiny-depth-pro"))


@pytest.fixture(scope="session")
def tiny_depth_anything(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Depth Anything of random weights, made here: its processor keeps each frame's aspect
    ratio (as DPT's does), unlike Depth Pro's, which resizes every frame to one square."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    folder = tmp_path_factory.mktemp("tiny-depth-anything")
    backbone = Dinov2Config(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
        image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=backbone, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8,
        head_hidden_size=8, reassemble_hidden_size=16, patch_size=14,
    )  # fmt: skip
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(
        size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14
    ).save_pretrained(folder)
    return folder


@pytest.fixture
def restore_root_logging():
    """setup_logging replaces the root handlers and exports its level; put pytest's back
    afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    exported = os.environ.get("VIDFLOW_LOG_LEVEL")
    yield
    if exported is None:
        os.environ.pop("VIDFLOW_LOG_LEVEL", None)
    else:
        os.environ["VIDFLOW_LOG_LEVEL"] = exported
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


# Holds an output folder's run lock in a process of its own until killed (tests/conftest.py).
_HOLD_OUTPUT = """
import sys, time
from pathlib import Path
from tasks.depth.output_lock import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def output_held_by_another_run(folder: Path) -> Iterator[subprocess.Popen[str]]:
    """`folder` locked by another process, as a run writing to it holds it; that process is
    killed with SIGKILL afterwards (or by the caller, to see the lock go with it)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_OUTPUT, str(folder)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
