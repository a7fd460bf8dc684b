"""`vidflow depth` as a user runs it: no Prefect server configured, a progress bar, an exit
code that says whether every video made it."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import lance
import psutil
import pytest

from common.net import free_port
from devstack.local_stack import LocalStack
from devstack.video_server import Drip, Serve, VideoServer
from tests.conftest import VIDEOS, copy_prefect_home


def _vidflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vidflow.cli", "depth", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.fixture
def cli_env(tmp_path: Path, prefect_home_template: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = copy_prefect_home(prefect_home_template, tmp_path / "prefect-home")
    return env


@pytest.mark.slow
def test_a_prefect_api_that_refuses_the_login_or_is_not_there_is_said_in_one_line(
    tmp_path: Path, tiny_depth_model: Path, cli_env: dict[str, str], prefect_home_template: Path
) -> None:
    """PREFECT_API_URL set, its login wrong (or expired), or the server down: the command said
    it at the flow's first call, after Ray had started, in a traceback with exit 1, read as
    "videos failed" (found in review, stop 59). Now one line, exit 2."""
    home = Path(copy_prefect_home(prefect_home_template, tmp_path / "server-home"))
    stack = LocalStack(
        logs_dir=tmp_path, prefect_home=home, ui_port=free_port(),
        extra_env={"PREFECT_SERVER_API_AUTH_STRING": "vidflow:right"},
    )  # fmt: skip
    stack.start_server()
    urls = tmp_path / "urls.txt"
    urls.write_text(f"http://127.0.0.1:{free_port()}/clip.mp4\n")
    try:
        for api_url, said in (
            (stack.api_url, f"the Prefect API at {stack.api_url} refused this client: 401"),
            (f"http://127.0.0.1:{free_port()}/api", "cannot be reached: ConnectError"),
            # A login in the URL (httpx sends it as basic auth) is not said (stop 62's review)
            (f"http://admin:s3cret@127.0.0.1:{free_port()}/api", "http://127.0.0.1:"),
        ):
            env = cli_env | {"PREFECT_API_URL": api_url, "PREFECT_API_AUTH_STRING": "vidflow:no"}
            run = _vidflow(
                "--urls", str(urls), "--output", str(tmp_path / "out"),
                "--depth-model", str(tiny_depth_model), "--ray-num-cpus", "1", env=env,
            )  # fmt: skip
            assert run.returncode == 2, run.stderr[-3000:]
            assert said in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
            assert "s3cret" not in run.stderr
    finally:
        stack.stop()


@pytest.mark.slow
def test_the_cli_runs_the_flow_with_its_own_prefect_server(
    tmp_path: Path, tiny_depth_model: Path, cli_env: dict[str, str]
) -> None:
    cli_env["PREFECT_HOME"] = str(tmp_path / "new-prefect-home")  # a first run: no database yet
    # A laptop's proxy that is down, and no no_proxy (found in review): the run's calls to its
    # own Prefect server went to the proxy, and the run failed after 120 s in a traceback.
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("no_proxy", "NO_PROXY"):
        cli_env.pop(name, None)
    cli_env |= {"http_proxy": dead_proxy, "HTTP_PROXY": dead_proxy}
    routes = {"a/clip.mp4": Serve(VIDEOS / "pool_cleaning.mp4"),
              "b/clip.mp4": Serve(VIDEOS / "k400_arm_wrestling.mp4")}  # fmt: skip
    with VideoServer(routes) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text("\n".join([server.url("a/clip.mp4"), server.url("b/clip.mp4"),
                                   server.url("gone.mp4")]))  # fmt: skip
        run = _vidflow(
            "--urls", str(urls), "--output", str(tmp_path / "out"),
            "--depth-model", str(tiny_depth_model), "--ray-num-cpus", "2",
            env=cli_env,
        )  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]  # one video failed
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["ok"], summary["failed"], summary["failed_at"]) == (2, 1, {"download": 1})
    assert "started a temporary Prefect server" in run.stderr
    # Its "View at" link dies with the temporary server: where to find the run afterwards.
    after = f"after `prefect server start`, http://127.0.0.1:4200/runs/flow-run/{summary['flow_run_id']}"
    assert after in run.stderr, run.stderr[-3000:]
    assert "depth-extraction: 100%" in run.stderr and "3/3" in run.stderr
    rows = lance.dataset(summary["lance"]).to_table(columns=["video_id", "status"]).to_pylist()
    status = {row["video_id"].rsplit("_", 1)[0]: row["status"] for row in rows}
    assert status == {"gone": "failed", "clip": "ok"} and len(rows) == 3
    clips = [row["video_id"] for row in rows if row["video_id"].startswith("clip_")]
    assert len(set(clips)) == 2  # same file name, other URL: its own id
    # The failure and its reason on the console: the run's artifacts end with its server.
    [gone] = [row["video_id"] for row in rows if row["status"] == "failed"]
    [line] = [line for line in run.stderr.splitlines() if f"{gone}: download failed: " in line]
    assert "404" in line and "WARNING" in line, line
    # Its two videos again, done already, with the export's place taken (a folder stands in for
    # a full disk; found in review, stop 57): exit 2, a traceback and no summary, its rows in.
    (tmp_path / "out" / "videos.parquet").unlink()
    (tmp_path / "out" / "videos.parquet" / "in-the-way").mkdir(parents=True)
    urls.write_text("\n".join(urls.read_text().splitlines()[:2]))
    again = _vidflow("--urls", str(urls), "--output", str(tmp_path / "out"),
                     "--depth-model", str(tiny_depth_model), env=cli_env)  # fmt: skip
    assert again.returncode == 1, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert (summary["skipped"], summary["failed"], summary["parquet"]) == (2, 0, None)
    assert "the Parquet export to" in again.stderr and "run again to export" in again.stderr
    assert "Traceback" not in again.stderr, again.stderr[-3000:]


@pytest.mark.slow
def test_a_run_with_no_video_done_ends_failed_and_still_reports_them(
    tmp_path: Path, tiny_depth_model: Path, cli_env: dict[str, str]
) -> None:
    """Every video failed: the flow run is Failed (it read Completed, as a run that did its
    work, to anything watching Prefect's states), and the command still prints its summary."""
    with VideoServer({}) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text(f"{server.url('gone.mp4')}\n{server.url('lost.mp4')}\n")
        run = _vidflow(
            "--urls", str(urls), "--output", str(tmp_path / "out"),
            "--depth-model", str(tiny_depth_model), "--ray-num-cpus", "1",
            env=cli_env,
        )  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["ok"], summary["failed"], summary["failed_at"]) == (0, 2, {"download": 2})
    assert "Finished in state Failed('2 of 2 videos failed" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


# A client of the run's temporary server, as `vidflow depth` starts it (in a process of its own:
# the suite's Prefect settings would otherwise name the session's server).
_TEMPORARY_SERVER_PROBE = """
import asyncio, json, os, httpx
from devstack.prefect_api import prefect_api
from prefect.client.orchestration import get_client

async def flow_count() -> int:
    async with get_client() as client:
        return len(await client.read_flows())

with prefect_api() as url:
    flows = f"{url}/flows/filter"
    print(json.dumps({
        "anonymous": httpx.post(flows, json={}).status_code,
        "wrong_login": httpx.post(flows, json={}, auth=("vidflow", "x")).status_code,
        "health": httpx.get(f"{url}/health").status_code,
        "flows_seen_by_the_run": asyncio.run(flow_count()),
        "login_in_worker_env": os.environ.get("PREFECT_API_AUTH_STRING", "").startswith("vidflow:"),
        "server_login_in_worker_env": "PREFECT_SERVER_API_AUTH_STRING" in os.environ,
    }))
print(json.dumps({"caller_s_login_after": os.environ.get("PREFECT_API_AUTH_STRING")}))
"""


def test_the_temporary_prefect_server_answers_only_its_run(cli_env: dict[str, str]) -> None:
    """It binds loopback, where any local account could read the run's records and create
    flow runs on it: it wants a login made for the run, which the run's clients send."""
    # A login the caller had for another server is theirs again after the run.
    env = {**cli_env, "PREFECT_API_AUTH_STRING": "someone:else"}
    probe = subprocess.run(
        [sys.executable, "-c", _TEMPORARY_SERVER_PROBE],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    during, after = (json.loads(line) for line in probe.stdout.strip().splitlines()[-2:])
    assert during == {
        "anonymous": 401,
        "wrong_login": 401,
        "health": 200,  # probes stay open, as Prefect keeps them
        "flows_seen_by_the_run": 0,
        "login_in_worker_env": True,
        "server_login_in_worker_env": False,
    }
    assert after == {"caller_s_login_after": "someone:else"}


_FAILING_RUN = """
from devstack.prefect_api import prefect_api
from prefect import flow, get_run_logger

@flow
def failing() -> None:
    get_run_logger().warning("about to fail")
    raise RuntimeError("the run failed")

try:
    with prefect_api():
        failing()
except RuntimeError as exc:
    print(exc)
"""


def test_a_failed_run_sends_its_logs_before_the_temporary_server_stops(
    cli_env: dict[str, str],
) -> None:
    """Found in a walk through the README: `stream-benchmark` with a broker it cannot reach said
    so, then hung ~70 s retrying its last log lines against the server it had stopped."""
    run = subprocess.run(
        [sys.executable, "-c", _FAILING_RUN],
        capture_output=True, text=True, env=cli_env, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "the run failed", run.stderr[-3000:]
    assert "about to fail" in run.stderr
    assert "Error logging to API" not in run.stderr, run.stderr[-3000:]
    # And they reached it: the run's database (kept in PREFECT_HOME) holds the line.
    with sqlite3.connect(Path(cli_env["PREFECT_HOME"]) / "prefect.db") as database:
        logged = [row[0] for row in database.execute("SELECT message FROM log")]
    assert "about to fail" in logged, logged[-20:]


def test_bad_input_is_refused_before_anything_starts(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    csv_path = VIDEOS.parent / "kinetics" / "kinetics-400_val.csv"
    no_template = _vidflow("--kinetics-csv", str(csv_path), env=cli_env)
    assert no_template.returncode == 2 and "url_template" in no_template.stderr
    urls = tmp_path / "urls.txt"
    urls.write_text("https://host/a.mp4\n")
    bad_frames = _vidflow("--urls", str(urls), "--frames", "last", env=cli_env)
    assert bad_frames.returncode == 2 and "--frames 'last': must be" in bad_frames.stderr
    missing = _vidflow("--urls", str(tmp_path / "none.txt"), env=cli_env)
    assert missing.returncode == 2 and "cannot read the input list" in missing.stderr
    for refused in (no_template, bad_frames, missing):  # before a Prefect server or Ray
        assert "temporary Prefect server" not in refused.stderr, refused.stderr
        assert "Ray" not in refused.stderr, refused.stderr


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--transcode-timeout-s", "inf", "Input should be a finite number"),
        ("--connect-timeout-s", "1e9", "Input should be less than or equal to 86400"),
    ],
)
def test_a_timeout_of_inf_or_past_a_day_is_refused_in_one_line(
    tmp_path: Path, cli_env: dict[str, str], flag: str, value: str, says: str
) -> None:
    """Found in review, stop 55: such a run started, and every transcode or download crashed
    with OverflowError."""
    urls = tmp_path / "urls.txt"
    urls.write_text("https://host/a.mp4\n")
    run = _vidflow("--urls", str(urls), "--output", str(tmp_path / "out"), flag, value,
                   env=cli_env)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    [line] = run.stderr.strip().splitlines()
    assert line.endswith(f"{flag} {value!r}: {says}"), line
    assert not (tmp_path / "out").exists()  # refused before anything started


@pytest.mark.slow
def test_a_stage_that_asks_for_more_cpus_than_a_node_has_is_refused(
    tmp_path: Path, tiny_depth_model: Path, cli_env: dict[str, str]
) -> None:
    """Found in review: `--transcode-cpus 3` on 2 CPUs sat at 0 % for ever, saying nothing
    (Ray holds a task no node can take as pending)."""
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:1/a.mp4\n")
    run = _vidflow(
        "--urls", str(urls), "--output", str(tmp_path / "out"), "--depth-model",
        str(tiny_depth_model), "--ray-num-cpus", "2", "--transcode-cpus", "3",
        env=cli_env,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert "--transcode-cpus 3: no node of this Ray cluster has that many CPUs" in run.stderr
    assert "the largest has 2" in run.stderr
    assert not (tmp_path / "out" / "videos.lance").exists()  # nothing recorded for the folder
    # The run's failure in one line, as for other input it cannot take: it was the engine's
    # "encountered an exception" with a traceback, then the same line again.
    assert "Traceback" not in run.stderr and "encountered an exception" not in run.stderr


def _left_behind(group: int, prefect_home: str, wait_s: float = 20.0) -> list[str]:
    """The processes of the command's process group, or run with its PREFECT_HOME, still
    there after up to `wait_s` (each process ends on its own time after its parent)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for process in psutil.process_iter(["pid", "name", "status"]):
            with contextlib.suppress(psutil.Error, OSError):  # gone meanwhile, or not ours
                if process.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                ours = os.getpgid(process.pid) == group
                if ours or process.environ().get("PREFECT_HOME") == prefect_home:
                    left.append(f"{process.pid} {process.info['name']}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("ended_by", ["ctrl-c", "terminal-closed", "nohup"])
def test_ctrl_c_in_a_terminal_ends_the_run_at_once_and_records_its_end(
    tmp_path: Path, tiny_depth_model: Path, cli_env: dict[str, str], ended_by: str
) -> None:
    """A terminal's Ctrl-C goes to the whole process group: the temporary Prefect server ended
    with it, and the command then retried recording the run's end against it for minutes,
    leaving the run Running in the database. A closed terminal or a dropped SSH session
    (SIGHUP to the group) killed the command silently, the run Running for good; under `nohup`
    (SIGHUP ignored) the run goes on, until a Ctrl-C."""
    slow = Drip(VIDEOS / "pool_cleaning.mp4", chunk=1000, every_s=0.5)  # a download that lasts
    with VideoServer({"slow.mp4": slow}) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text(server.url("slow.mp4"))
        command = [
            sys.executable,
            "-m",
            "vidflow.cli",
            "depth",
            "--urls",
            str(urls),
            "--output",
            str(tmp_path / "out"),
            "--depth-model",
            str(tiny_depth_model),
        ]
        ignore_hang_up = functools.partial(signal.signal, signal.SIGHUP, signal.SIG_IGN)
        run = subprocess.Popen(
            command, env=cli_env, stderr=subprocess.PIPE, text=True, start_new_session=True,
            preexec_fn=ignore_hang_up if ended_by == "nohup" else None,
        )  # a group of its own, as a terminal's  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while server.requests["slow.mp4"] == 0:  # the run is under way
                assert run.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            if ended_by != "ctrl-c":
                os.killpg(run.pid, signal.SIGHUP)
            if ended_by == "nohup":
                time.sleep(3)
                assert run.poll() is None  # it outlives its terminal
            if ended_by != "terminal-closed":
                os.killpg(run.pid, signal.SIGINT)
            signalled = time.monotonic()
            _, err = run.communicate(timeout=90)
            took_s = time.monotonic() - signalled
            left = _left_behind(run.pid, cli_env["PREFECT_HOME"])
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
    # Its private Ray (in its process group) and its temporary Prefect server (a session of
    # its own) end with it: the kill above would have hidden them (found in review, stop 59).
    assert left == [], left
    hung_up = ended_by == "terminal-closed"
    assert run.returncode == (-signal.SIGTERM if hung_up else 130), err[-3000:]
    with sqlite3.connect(Path(cli_env["PREFECT_HOME"]) / "prefect.db") as database:
        states = [row[0] for row in database.execute("SELECT state_type FROM flow_run")]
    assert took_s < 60, took_s  # at once: not minutes of retries against a dead server
    assert states and set(states) <= {"CANCELLED", "CRASHED", "FAILED"}, states
