"""The inference image really builds, serves, reports healthy and stops on SIGTERM.

(The static checks of the Dockerfile and the compose file are in tests/test_packaging.py.)

The last test builds and runs the image with podman (no Docker engine is needed; see
ci/podman-setup.sh, which installs and configures it and builds the local Debian base image).
Where podman or the base image is missing, or podman cannot run a container, it skips and
says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.frames import encode_jpeg, iter_video_frames
from common.net import free_ports
from common.settings import SAMPLE_VIDEO
from services.inference.client import classify_files, health_status
from services.inference.models import imagenet_class_names
from tests.conftest import EXPECTED_CLASSES

REPO = Path(__file__).resolve().parent.parent
# The base image ci/podman-setup.sh builds with debootstrap (no registry can be pulled from).
BASE_IMAGE = os.environ.get("VIDFLOW_BASE_IMAGE", "localhost/debian:bookworm-slim")


def _run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


# ---------------------------------------------------------------------------------------------
# A real build and run (podman)


def _podman() -> str:
    """The podman binary, or a skip that says what is missing."""
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed (as root: bash ci/podman-setup.sh)")
    info = subprocess.run([podman, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-500:]}")
    exists = subprocess.run([podman, "image", "exists", BASE_IMAGE], timeout=60)
    if exists.returncode != 0:
        pytest.skip(f"base image {BASE_IMAGE} is missing (as root: bash ci/podman-setup.sh)")
    probe = subprocess.run(
        [podman, "run", "--rm", "--network", "none", BASE_IMAGE, "true"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-500:]}")
    return podman


def _pip_ca_bundle() -> Path | None:
    """The CA bundle the host's pip trusts (a TLS-inspecting proxy's CA lives in it)."""
    candidates = [os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE")]
    pip_config = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.cert"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if pip_config.returncode == 0:
        candidates.append(pip_config.stdout.strip())
    candidates.append("/etc/ssl/certs/ca-certificates.crt")
    try:
        import certifi

        candidates.append(certifi.where())
    except ImportError:
        pass
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def _real_frame(path: Path) -> Path:
    """A JPEG of one frame of the real sample clip (a second in, past any fade-in)."""
    frames = list(iter_video_frames(SAMPLE_VIDEO, max_frames=30))
    assert frames, f"no frames in {SAMPLE_VIDEO}"
    path.write_bytes(encode_jpeg(frames[-1]))
    return path


@pytest.fixture
def inference_image(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Iterator[str]:
    """The runtime stage built from this checkout under a unique tag; removed afterwards."""
    podman = _podman()
    tag = f"localhost/vidflow-inference-test:{uuid.uuid4().hex[:12]}"
    args = [
        podman, "build", "--format", "docker", "--target", "runtime",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--tag", tag,
    ]  # fmt: skip
    if (ca := _pip_ca_bundle()) is not None:
        args += ["--secret", f"id=pip_ca,src={ca}"]
    log_file = tmp_path / "build.log"
    start = time.monotonic()
    with log_file.open("w") as log:
        build = subprocess.run(
            [*args, "."], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=1500
        )
    build_s = time.monotonic() - start
    if build.returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-60:])
        pytest.fail(f"podman build exited {build.returncode} after {build_s:.0f} s:\n{tail}")
    try:
        size = int(_run(podman, "image", "inspect", "--format", "{{.Size}}", tag).stdout)
        with capsys.disabled():
            print(
                f"\n[container] built {tag} (target runtime) in {build_s:.0f} s; "
                f"image size {size / 1e6:.0f} MB"
            )
        # No torch (PyPI's is a CUDA build of ~3 GB): the service image stays small.
        assert size < 1_000_000_000, f"runtime image is {size / 1e6:.0f} MB"
        yield tag
    finally:
        subprocess.run([podman, "rmi", "--force", tag], capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_inference_image_serves_reports_health_and_stops_on_sigterm(
    inference_image: str, tmp_path: Path, photos: dict[str, bytes]
) -> None:
    podman = shutil.which("podman")
    assert podman is not None
    config = json.loads(_run(podman, "image", "inspect", inference_image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert {"50051/tcp", "8000/tcp"} <= set(config["ExposedPorts"])
    # The image holds this checkout's code: a layer reused from an earlier build (a bind mount
    # is not in podman 4's cache key) shipped the previous code.
    code = (
        "import hashlib, services.inference.server as m; "
        "print(hashlib.sha256(open(m.__file__, 'rb').read()).hexdigest())"
    )
    shipped = _run(podman, "run", "--rm", "--network", "none", "--entrypoint", "python",
                   inference_image, "-c", code).stdout.strip()  # fmt: skip
    local = hashlib.sha256((REPO / "services" / "inference" / "server.py").read_bytes())
    assert shipped == local.hexdigest()

    name = f"vidflow-inference-test-{uuid.uuid4().hex[:8]}"
    grpc_port, http_port = free_ports(2)
    target = f"127.0.0.1:{grpc_port}"
    # As compose runs it (read-only, no capabilities, a cache volume: a change that writes
    # elsewhere, or needs a capability, kept the compose service from ever getting healthy),
    # with its HTTP port moved by a flag, which the image's health check must follow.
    _run(
        podman, "run", "--detach", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "--tmpfs", "/var/cache/vidflow",
        "--env", "VIDFLOW_INFERENCE_CACHE_DIR=/var/cache/vidflow/models",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--publish", f"127.0.0.1:{grpc_port}:50051", "--publish", f"127.0.0.1:{http_port}:9000",
        inference_image, "serve", "--http-port", "9000",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while (status := health_status(target)) != "SERVING":
            state = _run(podman, "inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = _run(podman, "logs", name, check=False)
                pytest.fail(f"container {state}, health {status}:\n{logs.stdout}{logs.stderr}")
            time.sleep(0.5)

        # A real frame through the container's gRPC port, answered with real ImageNet labels.
        (result,) = classify_files(target, [_real_frame(tmp_path / "frame.jpg")], top_k=5)
        assert result.error is None, result.error
        predictions = list(result.response.predictions)
        assert len(predictions) == 5
        classes = set(imagenet_class_names())
        for prediction in predictions:
            assert prediction.label in classes
            assert 0.0 < prediction.score <= 1.0
        assert [p.score for p in predictions] == sorted(
            (p.score for p in predictions), reverse=True
        )
        assert result.response.model_name == "efficientnet_lite0"
        # Right, not only valid: an export with random weights, or preprocessing that swapped
        # the colours, still answered five ImageNet labels in order.
        cat = tmp_path / "cat.png"
        cat.write_bytes(photos["cat"])
        (named,) = classify_files(target, [cat], top_k=1)
        assert (
            named.error is None and named.response.predictions[0].label in EXPECTED_CLASSES["cat"]
        ), named
        print(
            f"top-5 of {SAMPLE_VIDEO.name}: {[(p.label, round(p.score, 3)) for p in predictions]}"
        )

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no host proxy
        with direct.open(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
        # The calls above counted, by code: the metric's name alone is on any /metrics page.
        ok_calls = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("vidflow_inference_requests_total{") and 'code="OK"' in line
        )
        assert ok_calls >= 2, metrics[-3000:]

        # The image's HEALTHCHECK (podman runs it on demand: no systemd timers here).
        check = _run(podman, "healthcheck", "run", name, check=False)
        assert check.returncode == 0, check.stdout + check.stderr

        # SIGTERM: the server drains and exits 0 itself, well before the SIGKILL fallback.
        start = time.monotonic()
        _run(podman, "stop", "--time", "40", name, timeout=90)
        stop_s = time.monotonic() - start
        exit_code = _run(podman, "inspect", "--format", "{{.State.ExitCode}}", name).stdout
        logs = _run(podman, "logs", name, check=False)
        # Exit 0, not 137: SIGTERM was handled, the server drained and ended itself.
        assert int(exit_code) == 0, f"{logs.stdout}{logs.stderr} (stop took {stop_s:.1f} s)"
        # Nothing was in flight: not the whole 30-s drain grace waited out (podman's own
        # teardown counts here too, seconds on a loaded machine).
        assert stop_s < 28, f"stop took {stop_s:.1f} s"
    finally:
        subprocess.run([podman, "rm", "--force", name], capture_output=True, timeout=120)
