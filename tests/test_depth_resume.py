"""A `vidflow depth` run killed with SIGKILL and started again: one row per input, nothing
finished done twice, and no process of the killed run left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import lance
import psutil
import pytest

from devstack.processes import kill_marked_processes, marked_processes
from devstack.video_server import Serve, VideoServer
from tests.conftest import VIDEOS, copy_prefect_home

CLIPS = [VIDEOS / "k400_arm_wrestling.mp4", VIDEOS / "pool_cleaning.mp4"]
ORPHAN_GRACE_S = 180


def _processes_marked(marker: str) -> list[str]:
    """Command lines of live processes whose environment carries `marker` (zombies hold
    nothing; their parent reaps them)."""
    found = []
    for pid in marked_processes(*marker.split("=", 1)):
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                found.append(" ".join(process.cmdline())[:150])
    return found


def _ok_rows(table: Path) -> dict[str, object]:
    if not (table / "_versions").is_dir():
        return {}
    rows = lance.dataset(table).to_table(columns=["video_id", "status", "processed_at"])
    return {r["video_id"]: r["processed_at"] for r in rows.to_pylist() if r["status"] == "ok"}


def _ok_rows_so_far(table: Path) -> dict[str, object]:
    """`_ok_rows` of a table the run may be making right now: its `_versions` folder comes
    before the first manifest in it, and a read between the two raised."""
    try:
        return _ok_rows(table)
    except (ValueError, OSError):
        return {}


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.timeout(1200)  # its own waits add up past the suite's 600 s: they say more
def test_a_killed_run_resumes_without_duplicates_repeats_or_orphans(
    tmp_path: Path, tiny_depth_model: Path, prefect_home_template: Path
) -> None:
    videos = 12
    routes = {f"v{i}.mp4": Serve(CLIPS[i % 2]) for i in range(videos)}
    first_marker, second_marker = (f"VIDFLOW_TEST_RUN={uuid.uuid4().hex}" for _ in range(2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = copy_prefect_home(prefect_home_template, tmp_path / "prefect-home")
    try:
        _kill_resume_and_check(routes, tmp_path, tiny_depth_model, env, first_marker, second_marker)
    finally:  # a failed check leaves no run going (on success nothing is left to end)
        for marker in (first_marker, second_marker):
            kill_marked_processes(*marker.split("=", 1), grace_s=5)


def _kill_resume_and_check(
    routes: dict[str, Serve],
    tmp_path: Path,
    tiny_depth_model: Path,
    env: dict[str, str],
    first_marker: str,
    second_marker: str,
) -> None:
    videos = len(routes)
    output = tmp_path / "out"
    table = output / "videos.lance"
    with VideoServer(routes) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text("\n".join(server.url(f"v{i}.mp4") for i in range(videos)))
        command = [
            sys.executable, "-m", "vidflow.cli", "depth", "--urls", str(urls),
            "--output", str(output), "--depth-model", str(tiny_depth_model),
            "--ray-num-cpus", "2", "--shard-size", "2",
        ]  # fmt: skip
        # The run's own temporary Prefect server and local Ray start under it: all must go.
        log = tmp_path / "first.log"
        with log.open("wb") as stderr:
            first = subprocess.Popen(
                command, env=_marked(env, first_marker), stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + 240
        while not _ok_rows_so_far(table) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, log.read_text()[-3000:]
        running = _processes_marked(first_marker)
        assert any("prefect" in c or "uvicorn" in c for c in running), running
        assert any("raylet" in c for c in running), running  # the check sees the run's tree
        first.send_signal(signal.SIGKILL)
        first.wait()
        before = _ok_rows(table)
        assert 0 < len(before) < videos  # killed mid-way, with finished shards committed
        requests_before = dict(server.requests)

        # Started again at once, as a user would, while what is left of the killed run ends.
        second = subprocess.run(
            command, env=_marked(env, second_marker), capture_output=True, text=True, timeout=600
        )
        assert second.returncode == 0, second.stderr[-3000:]
        requests_after = dict(server.requests)

    # Ray's agents see through a pipe that their raylet is gone, then wait up to a minute
    # reporting it to a GCS that died with the run (Ray's own timeout) before they end.
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while (left := _processes_marked(first_marker)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"processes of the killed run still alive: {left}"
    # The finished run's Ray workers and agents end on their own time after their raylet.
    deadline = time.monotonic() + 30
    while (left := _processes_marked(second_marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the finished run still alive: {left}"

    rows = lance.dataset(table).to_table(columns=["video_id", "status", "processed_at"])
    ids = rows.column("video_id").to_pylist()
    assert len(ids) == len(set(ids)) == videos  # exactly one row per input
    assert set(rows.column("status").to_pylist()) == {"ok"}
    after = _ok_rows(table)
    for video_id, processed_at in before.items():
        assert after[video_id] == processed_at  # a finished video is not processed again
    finished_names = {f"v{i}.mp4" for i in range(videos)} & {
        name for name, count in requests_before.items() if count
    }
    downloaded_again = [
        name for name in finished_names
        if requests_after[name] > requests_before[name] and _id_of(name, after, before)
    ]  # fmt: skip
    assert not downloaded_again


def _marked(env: dict[str, str], marker: str) -> dict[str, str]:
    """`env` with `marker` (NAME=value) added: every process the run starts inherits it."""
    name, value = marker.split("=")
    return {**env, name: value}


def _id_of(name: str, after: dict[str, object], before: dict[str, object]) -> bool:
    """Whether the video served as `name` had a row before the kill."""
    stem = name.removesuffix(".mp4") + "_"
    return any(video_id.startswith(stem) for video_id in before)
