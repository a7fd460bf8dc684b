"""A CLI run with a known Prefect API starts Ray before it imports Prefect, and its first
shards' Ray workers import the flow's tasks meanwhile (flows/ray_start.py): a real private Ray,
a real Prefect API, the real `vidflow depth`."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from prefect import flow, task
from prefect.settings import PREFECT_API_URL
from ray._private import ray_constants

from devstack.video_server import Serve, VideoServer
from flows.ray_runner import ray_task_runner
from flows.ray_start import early_ray
from tests.conftest import VIDEOS


@task
def what_this_worker_holds() -> tuple[int, bool, int, bool]:
    """This worker's pid, whether the shard tasks were imported before this run, how many
    objects its imports left frozen, and whether its garbage collector runs."""
    imported = "tasks.depth.shard_tasks" in sys.modules
    return os.getpid(), imported, gc.get_freeze_count(), gc.isenabled()


@flow(task_runner=ray_task_runner(num_cpus=2))
def two_task_runs() -> list[tuple[int, bool, int, bool]]:
    futures = [what_this_worker_holds.submit() for _ in range(2)]
    return [future.result() for future in futures]


@pytest.mark.usefixtures("prefect_api")
def test_the_first_task_runs_get_workers_that_imported_the_tasks_while_the_driver_did_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "local")
    cluster_mode_before = ray_constants.ENABLE_RAY_CLUSTER
    sigterm_before = signal.getsignal(signal.SIGTERM)
    with early_ray(2, lambda cpus: cpus) as wait_for_workers:
        assert ray.is_initialized()
        # Found in review (stop 57): Ray's own handler (sys.exit(15)) stayed in place, and a
        # SIGTERM that Prefect passed on ended the command with exit 15, not 143.
        assert signal.getsignal(signal.SIGTERM) is sigterm_before
        wait_for_workers()
        seen = two_task_runs()
        assert ray.is_initialized()  # the flow's runner used this Ray and left it running
    assert all(imported for _, imported, _, _ in seen), seen
    assert len({pid for pid, *_ in seen}) == 2, seen
    # The imports ran with the collector paused and left their objects frozen (Prefect's alone
    # leave ~100,000); the collector runs again for the tasks.
    assert all(frozen > 100_000 and collecting for *_, frozen, collecting in seen), seen
    assert not ray.is_initialized()
    assert ray_constants.ENABLE_RAY_CLUSTER is cluster_mode_before


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_the_cli_starts_ray_first_where_the_prefect_api_is_known(
    tmp_path: Path, tiny_depth_model: Path
) -> None:
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "RAY_ADDRESS": "local"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    routes = {f"v{i}.mp4": Serve(VIDEOS / "k400_arm_wrestling.mp4") for i in range(4)}
    with VideoServer(routes) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text("\n".join(server.url(f"v{i}.mp4") for i in range(4)))
        run = subprocess.run(
            [sys.executable, "-m", "vidflow.cli", "depth", "--urls", str(urls),
             "--output", str(tmp_path / "out"), "--depth-model", str(tiny_depth_model),
             "--ray-num-cpus", "2", "--shard-size", "2"],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Ray is up; 2 of its workers import the flow's tasks meanwhile" in run.stderr
    assert "started a temporary Prefect server" not in run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["ok"], summary["failed"], summary["shards"]) == (4, 0, 2)
