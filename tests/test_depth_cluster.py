"""depth-extraction on a Ray cluster of two nodes (two `ray start` on this machine, one CPU
each, loopback only): shards run on both nodes, and each row says which."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import lance
import pytest

from devstack.launcher import free_port
from flows.depth_extraction import depth_extraction
from flows.ray_runner import ray_task_runner
from tasks.depth.settings import DepthSettings
from tests.conftest import VIDEOS
from tests.video_server import Serve, VideoServer

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def two_node_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # Ray's socket paths live under --temp-dir and must fit in 107 bytes: keep it short.
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    address = f"127.0.0.1:{free_port()}"
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]

    def start(*args: str) -> None:
        started = subprocess.run([RAY, "start", *args, *common], env=env, capture_output=True,
                                 text=True, timeout=180, check=False)  # fmt: skip
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]

    try:
        start("--head", "--port", address.split(":")[1], "--include-dashboard", "false",
              "--temp-dir", str(temp / "head"))  # fmt: skip
        start("--address", address, "--temp-dir", str(temp / "second"))
        monkeypatch.setenv("RAY_ADDRESS", address)
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_shards_run_on_both_nodes_and_rows_name_their_node(
    two_node_cluster: str, prefect_api: None, tiny_depth_model: Path, tmp_path: Path
) -> None:
    import ray

    videos = 8
    routes = {f"v{i}.mp4": Serve(VIDEOS / "k400_arm_wrestling.mp4") for i in range(videos)}
    settings = DepthSettings(
        output=tmp_path / "out", depth_model=str(tiny_depth_model), shard_size=1, device="cpu"
    )
    with VideoServer(routes) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text("\n".join(server.url(f"v{i}.mp4") for i in range(videos)))
        flow = depth_extraction.with_options(task_runner=ray_task_runner())
        summary = flow(urls=str(urls), settings=settings)

    assert summary["ok"] == videos and summary["shards"] == videos
    rows = lance.dataset(tmp_path / "out" / "videos.lance").to_table().to_pylist()
    nodes = {row["node_id"] for row in rows}
    ray.init(address=two_node_cluster)
    try:
        alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    finally:
        ray.shutdown()
    assert len(alive) == 2 and nodes == alive  # every shard's node, and both nodes used
