"""Faults of the depth pipeline's surroundings, made for real: a local Ray reachable from the
network, a server that drips bytes, a reordered re-run."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import lance
import pytest

from common.files import STALE_PARTIAL_S, partial_path
from devstack.video_server import Body, Drip, Serve, Stall, VideoServer
from flows.depth_extraction import depth_extraction
from flows.ray_runner import ray_task_runner
from flows.ray_start import RAY_CLUSTER_ENV
from tasks.depth.download import DownloadError, RateFloor, download_many
from tasks.depth.settings import DepthSettings
from tasks.depth.video_record import VideoRecord
from tests.conftest import VIDEOS

ROOT = Path(__file__).resolve().parent.parent
CLIP = VIDEOS / "pool_cleaning.mp4"
OTHER_CLIP = VIDEOS / "k400_arm_wrestling.mp4"

# Runs in a fresh interpreter, so no Ray state of the test process is involved: the flow's own
# runner starts a local Ray, a task and an actor run, and every process of the Ray session
# reports its command line and listening TCP sockets.
RAY_LISTENERS = textwrap.dedent(
    """
    import json, os, time
    from flows.ray_runner import ray_task_runner
    from flows.ray_start import RAY_CLUSTER_ENV
    import ray
    import psutil

    # The session's raylets, and its worker processes: the raylet's children but its agents.
    def workers(session: str) -> tuple[int, list[str]]:
        commands = {p: " ".join(p.info["cmdline"] or []) for p in
                    psutil.process_iter(["cmdline"])}
        raylets = [p for p, c in commands.items() if "raylet" in c and session in c]
        names = [" ".join(c.cmdline()) for r in raylets for c in r.children()]
        agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
        return len(raylets), [name for name in names if not name.startswith(agents)]

    # Whether the driver's read of its node's record (Ray sleeps a second and retries when the
    # node is not registered yet) finds the node registered already.
    from ray._private import services, state
    read_registered, ray_get_node = [], services.get_node
    def get_node(gcs_address, node_id):
        nodes = state.GlobalState()
        nodes._initialize_global_state(services._get_gcs_client_options(gcs_address))
        read_registered.append(any(n["NodeID"] == node_id for n in nodes.node_table()))
        nodes.disconnect()
        return ray_get_node(gcs_address, node_id)
    services.get_node = get_node

    with ray_task_runner(1):
        session = ray._private.worker._global_node.get_session_dir_path()
        time.sleep(1.5)  # a prestarted worker would be up by now
        raylets, idle_workers = workers(session)
        @ray.remote
        def pid() -> int:
            return os.getpid()

        @ray.remote
        class Holder:
            def pid(self) -> int:
                return os.getpid()

        holder = Holder.remote()
        ran = [ray.get(pid.remote()), ray.get(holder.pid.remote())]
        busy_workers = workers(session)[1]  # the same look sees the workers that ran them
        processes = {p.pid: p for p in psutil.Process().children(recursive=True)}
        for p in psutil.process_iter(["cmdline"]):
            command = " ".join(p.info["cmdline"] or [])
            if session in command or command.startswith("ray::"):
                processes.setdefault(p.pid, p)
        listening, commands = [], []
        for p in processes.values():
            try:
                commands.append(" ".join(p.cmdline()))
                for c in p.net_connections(kind="tcp"):
                    if c.status == psutil.CONN_LISTEN:
                        listening.append([p.name(), c.laddr.ip, c.laddr.port])
            except psutil.Error:
                pass
        agent_log = os.path.join(session, "logs", "dashboard_agent.log")
        bind_failures = open(agent_log).read().count("Failed to bind")
        # What the instance's GCS answers a caller without its token, with another, with it.
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
        gcs = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(
            grpc.insecure_channel(ray.get_runtime_context().gcs_address))
        gcs_answers = []
        for token in (None, "another", os.environ.get("RAY_AUTH_TOKEN")):
            metadata = [("authorization", f"Bearer {token}")] if token else []
            try:
                gcs.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10,
                                   metadata=metadata)
                gcs_answers.append("OK")
            except grpc.RpcError as error:
                gcs_answers.append(error.code().name)
    print(json.dumps({"ran": ran, "listening": listening, "commands": commands,
                      "agent_bind_failures": bind_failures,
                      "env_after": os.environ.get(RAY_CLUSTER_ENV),
                      "auth_env_after": [os.environ.get("RAY_AUTH_MODE"),
                                         os.environ.get("RAY_AUTH_TOKEN")],
                      "idle_workers": idle_workers, "raylets": raylets,
                      "busy_workers": busy_workers,
                      "params_after": ray._private.parameter.RayParams.__name__,
                      "api_server_after": ray._private.node.Node.start_api_server.__name__,
                      "read_registered": read_registered,
                      "gcs_answers": gcs_answers,
                      "token_files": os.listdir(os.path.expanduser("~")),
                      "get_node_after": services.get_node is get_node}))
    """
)


RAY_DEFAULT_AGENT_PORT = 52365  # ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "token"])  # token: set by the user, with no token
def test_a_local_ray_listens_on_loopback_only_wants_its_own_token_and_starts_at_once(
    tmp_path: Path, mode: str | None
) -> None:
    unset = ("RAY_ADDRESS", RAY_CLUSTER_ENV, "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["HOME"] = str(tmp_path)  # where Ray would keep a token of its own (~/.ray/auth_token)
    if mode is not None:  # Ray wrote one there for good, readable by every account
        env["RAY_AUTH_MODE"] = mode
    # Ray's default port for a node agent, taken as another Ray on the machine takes it.
    with _port_taken(RAY_DEFAULT_AGENT_PORT):
        done = subprocess.run(
            [sys.executable, "-c", RAY_LISTENERS],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["ran"]) == 2
    listening = report["listening"]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the check sees Ray's servers
    exposed = [entry for entry in listening if not _loopback(entry[1])]
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
    # A private instance has no use for the autoscaler's monitor, the log monitor or the API
    # server (whose only module with the dashboard off reports usage statistics).
    commands = report["commands"]
    assert any("gcs_server" in command for command in commands), commands
    assert any("dashboard/agent.py" in command for command in commands), commands  # it sees it
    unwanted = ("monitor.py", "log_monitor", "dashboard/dashboard.py")
    assert not [c for c in commands if any(name in c for name in unwanted)], commands
    # Nor for workers started before any work: the depth actor would take one of them and the
    # shards start others anyway (each an idle process that imported Ray).
    assert report["idle_workers"] == [], report["idle_workers"]
    assert report["raylets"] == 1 and report["busy_workers"], report  # the look finds them
    assert report["env_after"] is None  # the process is left as it was
    assert report["auth_env_after"] == [mode, None]  # the run's token goes with its Ray
    assert report["params_after"] == "RayParams"
    assert report["api_server_after"] == "start_api_server"
    # The driver read its node's record once the raylet had registered it, not before (when
    # Ray sleeps a second before it reads again).
    assert report["read_registered"] == [True], report["read_registered"]
    assert report["get_node_after"]
    # The agent took a free port at once (it retried the taken default for ~3.5 s, and the
    # raylet, so the run, waited for it).
    assert report["agent_bind_failures"] == 0
    assert RAY_DEFAULT_AGENT_PORT not in {port for _, _, port in listening}
    # Token auth, with a token of the run's own: another local account, with no token or
    # another, is refused; nothing is left in the user's home to reuse.
    assert report["gcs_answers"] == ["UNAUTHENTICATED", "UNAUTHENTICATED", "OK"]
    assert report["token_files"] == []


@contextlib.contextmanager
def _port_taken(port: int) -> Iterator[None]:
    """`port` on 127.0.0.1 held by a listening socket meanwhile (or by whatever holds it)."""
    with socket.socket() as holder:
        with contextlib.suppress(OSError):  # already taken: as good
            holder.bind(("127.0.0.1", port))
            holder.listen()
        yield


# ---- downloads that never end ------------------------------------------------------------


def _download_pair(
    tmp_path: Path, slow: object, settings: DepthSettings
) -> tuple[VideoRecord, VideoRecord, float, int]:
    """A misbehaving download and a normal one from the same server in one run: both records,
    the seconds the run took, and the requests the misbehaving route got."""
    with VideoServer({"slow.mp4": slow, "ok.mp4": Serve(CLIP)}) as server:
        records = [
            VideoRecord(video_id="slow", source_url=server.url("slow.mp4")),
            VideoRecord(video_id="ok", source_url=server.url("ok.mp4")),
        ]
        started = time.monotonic()
        failed, fine = download_many(records, tmp_path, settings)
        took = time.monotonic() - started
        requests = server.requests["slow.mp4"]
    assert not fine.failed, fine.error
    assert Path(fine.raw_path).read_bytes() == CLIP.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.mp4", "ok.url"]  # no partial file
    return failed, fine, took, requests


@pytest.mark.faults
def test_a_dripping_server_is_dropped_as_too_slow_and_the_run_goes_on(tmp_path: Path) -> None:
    settings = DepthSettings(download_min_rate_bps=100, download_rate_window_s=1.0)
    drip = Drip(CLIP, chunk=1, every_s=0.2)  # 5 B/s, each byte well inside the read timeout
    failed, _, _, requests = _download_pair(tmp_path, drip, settings)
    assert (failed.status, failed.failed_stage) == ("failed", "download")
    # over 1 s, or 2 where a pause on a loaded machine put the first check past 1.5 s
    assert re.search(r"too slow: [\d.]+ B/s over [12] s", failed.error), failed.error
    assert requests == 1 and failed.download_attempts == 1  # not retried: it would crawl again
    assert failed.download_s is not None and 1.0 <= failed.download_s < 3.0


@pytest.mark.faults
@pytest.mark.parametrize(
    ("slow", "settings"),
    [
        # Fast enough for the rate rule (4 kB/s) but never done in time.
        (Drip(CLIP, chunk=200, every_s=0.05), {"download_min_rate_bps": 100}),
        # Every attempt times out; the retries would take far longer than the deadline.
        (
            Stall(CLIP, stall_s=10),
            {"read_timeout_s": 0.4, "download_retries": 20, "retry_backoff_s": 0.1},
        ),
    ],
    ids=["endless-body", "endless-retries"],
)
def test_the_deadline_ends_a_download_retries_included(
    tmp_path: Path, slow: object, settings: dict[str, float]
) -> None:
    settings = DepthSettings(download_deadline_s=1.5, **settings)
    failed, _, _, _ = _download_pair(tmp_path, slow, settings)
    assert failed.failed and "deadline" in failed.error, failed.error
    # Ended at the deadline, or earlier when the next retry could not start before it.
    assert failed.download_s is not None and 1.0 <= failed.download_s < 3.0


def test_the_default_limits_end_a_1_byte_per_2_s_drip_within_60_s_and_keep_a_slow_link() -> None:
    """The defaults, run on a clock: a byte every 2 s fails within 60 s; 10 MB at 50 kB/s (a
    slow link) is never judged too slow and ends well before the deadline."""
    settings = DepthSettings()
    assert settings.read_timeout_s > 2  # the drip is not ended by the read timeout
    floor = RateFloor(settings.download_min_rate_bps, settings.download_rate_window_s, 0.0)
    ended_at = None
    for second in range(2, 600, 2):
        try:
            floor.check(second // 2, float(second))
        except DownloadError as exc:
            message, ended_at = str(exc), second
            break
    # At the end of the first 30-s window (the default), with the rate it measured.
    assert ended_at == settings.download_rate_window_s == 30
    assert "too slow: 0.5 B/s over 30 s (minimum 1024 B/s" in message, message

    size, rate, chunk = 10_000_000, 50_000, 16_384
    floor = RateFloor(settings.download_min_rate_bps, settings.download_rate_window_s, 0.0)
    for received in range(chunk, size + chunk, chunk):
        floor.check(received, received / rate)  # raises if judged too slow
    assert size / rate < settings.download_deadline_s / 2


# ---- a reordered re-run --------------------------------------------------------------------


@pytest.mark.faults
@pytest.mark.slow
def test_a_rerun_of_a_reordered_list_finds_each_url_its_own_row(
    prefect_api: None, tiny_depth_model: Path, tmp_path: Path
) -> None:
    """Two URLs with the same file name; the second serves a broken file (a body cut at its
    end: the download passes, the transcode fails), then the list is swapped and it serves
    the whole video: the re-run skips the first (done) and redoes the second from its
    download (it kept the broken file, and failed on every run), two rows in all."""
    settings = DepthSettings(
        output=tmp_path / "out", depth_model=str(tiny_depth_model), device="cpu", shard_size=1
    )
    flow = depth_extraction.with_options(task_runner=ray_task_runner(num_cpus=2))
    broken = Body(OTHER_CLIP.read_bytes()[:4096], "video/mp4")
    with VideoServer({"x/clip.mp4": Serve(CLIP), "y/clip.mp4": broken}) as server:
        first, second = (server.url("x/clip.mp4"), server.url("y/clip.mp4"))
        listing = tmp_path / "urls.txt"
        listing.write_text(f"{first}\n{second}\n")
        one = flow(urls=str(listing), settings=settings)
        before = lance.dataset(settings.output / "videos.lance").to_table().to_pylist()

        server.routes["y/clip.mp4"] = Serve(OTHER_CLIP)
        listing.write_text(f"{second}\n{first}\n")
        # What a run killed with SIGKILL an hour ago left half written: the next run sweeps it.
        orphan = partial_path(settings.output / "raw" / "gone.mp4")
        orphan.write_bytes(b"half a video")
        table_copy = partial_path(settings.output / "videos.parquet")  # killed as it exported
        table_copy.write_bytes(b"half a table")
        for left in (orphan, table_copy):
            os.utime(left, (time.time() - STALE_PARTIAL_S - 60,) * 2)
        two = flow(urls=str(listing), settings=settings)
        assert not orphan.exists() and not table_copy.exists()
        after = lance.dataset(settings.output / "videos.lance").to_table().to_pylist()
        requests = dict(server.requests)

    assert (one["ok"], one["failed"]) == (1, 1)
    failed_first = next(row for row in before if row["source_url"] == second)
    assert failed_first["failed_stage"] == "transcode", failed_first["error"]
    assert (two["ok"], two["failed"], two["skipped"]) == (1, 0, 1)
    assert len(after) == 2 and len({row["video_id"] for row in after}) == 2
    rows = {row["source_url"]: row for row in after}
    done_first = next(row for row in before if row["source_url"] == first)
    assert rows[first]["processed_at"] == done_first["processed_at"]  # skipped, not redone
    assert rows[first]["raw_bytes"] == CLIP.stat().st_size
    assert rows[second]["status"] == "ok" and rows[second]["attempts"] == 2
    assert rows[second]["raw_bytes"] == OTHER_CLIP.stat().st_size  # its own video, not x's
    assert requests == {"x/clip.mp4": 1, "y/clip.mp4": 2}
