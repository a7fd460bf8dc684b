"""`make demo` as a user runs it, and the Prefect UI in a real browser afterwards.

One demo run (a real Prefect server, work pool, worker, broker, inference service and sample
mirror, both deployments run with `prefect deployment run --watch`) with `--keep-ui`, so that
headless Chromium can look at the flow runs it made before Ctrl-C ends it. Every process the demo
starts inherits a marker in its environment; none may be left once it exits.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lance
import psutil
import pytest

from devstack.launcher import REPO_ROOT
from devstack.processes import kill_marked_processes, marked_processes
from services.inference.settings import ModelSource
from tests.conftest import copy_prefect_home
from tests.proc_helpers import listening_sockets
from vidflow.demo import depth_model_for_demo, read_artifacts

pytestmark = pytest.mark.slow

MARKER = "VIDFLOW_DEMO_TEST_ID"
SCREENSHOTS = REPO_ROOT / "runs" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLOW_RUN_URL = re.compile(r"(http://127\.0\.0\.1:\d+)/runs/flow-run/([0-9a-f-]{36})")


@dataclass
class DemoRun:
    process: subprocess.Popen[str]
    marker: str
    runs_dir: Path
    lines: list[str] = field(default_factory=list)
    exit_code: int | None = None

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _wait_for(demo: DemoRun, pending: queue.Queue[str | None], text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = pending.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        demo.lines.append(line)
        if text in line:
            return
    pytest.fail(f"the demo never printed {text!r}; its output:\n{demo.output[-6000:]}")


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """`demo.main` makes this process's environment the demo's (RAY_ADDRESS=local, loopback
    without a proxy, the user's service settings dropped): put back after each test, or the
    tests after these took another path in the whole suite than alone."""
    saved = dict(os.environ)
    yield
    for name in [name for name in os.environ if name not in saved]:  # only what changed: a
        del os.environ[name]  # whole clear-and-refill raced other threads' getenv
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _ended(process: psutil.Process) -> bool:
    """Whether `process` has ended (reaped, or a zombie): psutil raises for one reaped between
    two of its own calls."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _start_demo(
    runs_dir: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[DemoRun, queue.Queue[str | None]]:
    """`python -m vidflow.demo` with the untrained stand-in, its output lines fed to a queue
    (`env`: variables of its own on top of this process's)."""
    marker = uuid.uuid4().hex
    env = {**os.environ, **(env or {}), MARKER: marker, "HF_HUB_OFFLINE": "1"}  # untrained
    command = [sys.executable, "-m", "vidflow.demo", *args, "--stream-seconds", "6",
               "--runs-dir", str(runs_dir)]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    pending: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            pending.put(line)
        pending.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return DemoRun(process, marker, runs_dir), pending


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    # The user's own model cache, by its variable: a link to the usual one (its export kept).
    models = ModelSource.model_fields["cache_dir"].default
    models.mkdir(parents=True, exist_ok=True)
    (users_cache := tmp_path_factory.mktemp("user-cache") / "models").symlink_to(models)
    run, pending = _start_demo(
        tmp_path_factory.mktemp("demo-runs"), "--keep-ui", "--videos", "2",
        env={"VIDFLOW_INFERENCE_CACHE_DIR": str(users_cache)},
    )  # fmt: skip
    process, marker = run.process, run.marker
    try:
        _wait_for(run, pending, "The Prefect UI stays up", timeout_s=600)
        yield run
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            run.exit_code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            run.exit_code = process.wait()
            kill_marked_processes(MARKER, marker)  # what the killed demo could not stop
        while (line := pending.get(timeout=5)) is not None:
            run.lines.append(line)


def test_the_demo_runs_both_deployments_and_labels_untrained_depth(demo: DemoRun) -> None:
    assert "Flow run finished in state 'Failed'" not in demo.output
    runs = FLOW_RUN_URL.findall(demo.output)
    assert len(runs) == 2, demo.output[-4000:]
    api_url = runs[0][0] + "/api"

    # depth-extraction/local: one row per Kinetics row asked for, all ok, labelled untrained.
    lance_path = next(demo.runs_dir.glob("demo-*/depth-extraction/videos.lance"))
    rows = lance.dataset(lance_path).to_table().to_pylist()
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert all(row["depth_untrained"] is True and row["height"] == 360 for row in rows)
    assert all(row["label"] and row["youtube_id"] for row in rows)
    depth_artifacts = read_artifacts(api_url, runs[0][1])
    assert depth_artifacts["depth-extraction-summary"]["description"].startswith("UNTRAINED")
    assert "UNTRAINED" in demo.output and str(lance_path) in demo.output
    # Each run's log as it goes, not a silent wait for its end.
    assert "  depth-extraction | 2 videos: 0 already done" in demo.output, demo.output[-4000:]
    assert "  stream-benchmark | " in demo.output

    # stream-benchmark/local: figures as artifacts, printed too.
    report = read_artifacts(api_url, runs[1][1])["stream-benchmark-report"]["data"]
    fps = re.search(r"Throughput: ([\d.]+) frames/s", report)
    assert fps and float(fps.group(1)) > 0
    assert f"Throughput: {fps.group(1)} frames/s" in demo.output
    assert "Log file:" in demo.output


def _chromium(url: str, *flags: str, budget_ms: int = 30000) -> str:
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"chromium-{uuid.uuid4().hex}"
    try:
        result = subprocess.run(
            [
                CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}", "--window-size=1400,1100", *flags, url,
            ],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (ci/chromium-setup.sh installs it)")
def test_the_prefect_ui_shows_the_stream_run_and_its_figures(demo: DemoRun) -> None:
    base_url, stream_run = FLOW_RUN_URL.findall(demo.output)[1]
    artifacts = read_artifacts(base_url + "/api", stream_run)
    report = artifacts["stream-benchmark-report"]
    fps = re.search(r"Throughput: ([\d.]+) frames/s", report["data"]).group(1)

    run_page = _chromium(f"{base_url}/runs/flow-run/{stream_run}", "--dump-dom")
    assert "stream-benchmark" in run_page and "Completed" in run_page, run_page[-3000:]
    artifact_page = _chromium(f"{base_url}/artifacts/artifact/{report['id']}", "--dump-dom")
    assert f"{fps} frames/s" in artifact_page, artifact_page[-3000:]
    assert "e2e" in artifact_page and "p99" in artifact_page

    # Screenshots kept as test artifacts, for a person to look at.
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name, url in (
        ("stream-benchmark-flow-run", f"{base_url}/runs/flow-run/{stream_run}"),
        ("stream-benchmark-report", f"{base_url}/artifacts/artifact/{report['id']}"),
    ):
        path = SCREENSHOTS / f"{name}.png"
        path.unlink(missing_ok=True)
        _chromium(url, f"--screenshot={path}")
        assert path.stat().st_size > 10_000  # a rendered page, not a blank one


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_every_port_of_the_local_stack_listens_on_loopback_only(demo: DemoRun) -> None:
    """Secure default: nothing the demo started (Prefect server and worker, broker, service,
    their children) can be reached from another machine."""
    listening = [
        (pid, address)
        for pid in {demo.process.pid, *marked_processes(MARKER, demo.marker)}
        for address in listening_sockets(pid)
    ]
    assert len(listening) >= 4, listening  # UI/API, broker, gRPC, the service's HTTP port
    assert all(address.rsplit(":", 1)[0] in LOOPBACK for _, address in listening), listening


def test_the_demo_s_service_keeps_its_models_where_the_user_said(demo: DemoRun) -> None:
    """VIDFLOW_INFERENCE_CACHE_DIR (a small or read-only home) was beaten by the flag the demo
    gave its service, ~/.cache/vidflow/models always; the depth flow's own variable was kept."""
    commands = [psutil.Process(pid).cmdline() for pid in marked_processes(MARKER, demo.marker)]
    [serve] = [c for c in commands if "serve" in c and "vidflow.cli" in c]
    folder = Path(serve[serve.index("--cache-dir") + 1])  # the fixture's variable
    assert folder.name == "models" and folder.parent.name.startswith("user-cache"), serve


def test_ctrl_c_ends_the_demo_with_nothing_left_behind(demo: DemoRun) -> None:
    """Runs last (file order): the fixture's Ctrl-C happens at module teardown, so stop here."""
    demo.process.send_signal(signal.SIGINT)
    demo.exit_code = demo.process.wait(timeout=120)
    assert demo.exit_code == 0
    time.sleep(1)
    assert marked_processes(MARKER, demo.marker) == []


def _marked_with(text: str, marker: str) -> list[int]:
    """The demo's marked processes whose command line holds `text`."""
    found = []
    for pid in marked_processes(MARKER, marker):
        with contextlib.suppress(psutil.Error):
            if text in " ".join(psutil.Process(pid).cmdline()):
                found.append(pid)
    return found


@pytest.mark.faults
@pytest.mark.parametrize("stopping", [False, True], ids=["running", "while-stopping"])
def test_a_sigkilled_demo_leaves_nothing_behind(
    tmp_path: Path, prefect_home_template: Path, stopping: bool
) -> None:
    """SIGKILL runs no `finally`: the demo's watcher must end the server, worker, broker and
    service it started, each in its own session; also when the kill comes as the demo stops
    after a Ctrl-C (found in review: the watcher stood down before the Prefect server and
    worker were stopped, and they outlived a demo killed then)."""
    copy_prefect_home(prefect_home_template, tmp_path / "prefect")  # the demo's history
    run, pending = _start_demo(tmp_path, "--videos", "1")
    process, marker = run.process, run.marker
    try:
        _wait_for(run, pending, "running depth-extraction/local", timeout_s=600)
        if not stopping:  # killed once the flow run has started its Ray, not before it
            deadline = time.monotonic() + 180
            while not _marked_with("raylet", marker):
                assert time.monotonic() < deadline, "the depth run never started its Ray"
                time.sleep(0.2)
        started = marked_processes(MARKER, marker)
        assert len(started) >= 4, started  # server, worker, service, broker (and the watcher)
        if stopping:  # killed in its stop, once the first of its watcher or worker ends

            def started_as(text: str) -> psutil.Process:
                found = []
                for pid in started:  # a short-lived one (a probe) may have ended meanwhile
                    with contextlib.suppress(psutil.NoSuchProcess):
                        if text in " ".join((process := psutil.Process(pid)).cmdline()):
                            found.append(process)
                [one] = found
                return one

            watcher, worker = started_as("local_stack reap"), started_as("worker start")
            process.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 60
            while not (_ended(watcher) or _ended(worker)):
                assert time.monotonic() < deadline, "the demo's stop ended neither"
                time.sleep(0.005)
            assert process.poll() is None, "the demo ended before the kill: no test"
        process.kill()
        process.wait()
        deadline = time.monotonic() + 60
        while (left := marked_processes(MARKER, marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == [], f"{len(left)} processes outlived the SIGKILLed demo"
    finally:
        kill_marked_processes(MARKER, marker)


WATCHED_PARENT = """
import os, signal, subprocess, sys
from devstack.local_stack import start_reaper
variable, value = sys.argv[1], sys.argv[2]
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                 env={**os.environ, variable: value})
start_reaper(variable, value)
os.kill(os.getpid(), signal.SIGKILL)  # at once: the watcher is still importing its modules
"""


@pytest.mark.faults
def test_a_parent_killed_as_its_watcher_starts_is_still_swept() -> None:
    """The watcher's SIGTERM handler was set only after its imports (~0.3 s): a demo SIGKILLed
    in that window killed its watcher by the signal's default action, and what it had started
    (a Prefect server, in a session of its own) outlived both."""
    marker = uuid.uuid4().hex
    parent = subprocess.run([sys.executable, "-c", WATCHED_PARENT, MARKER, marker], cwd=REPO_ROOT)
    try:
        assert parent.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while (left := marked_processes(MARKER, marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == [], "the marked child outlived its SIGKILLed parent"
    finally:
        kill_marked_processes(MARKER, marker)


@pytest.mark.faults
def test_sigterm_stops_the_demo_with_the_shell_s_code_and_nothing_left_behind(
    tmp_path: Path, prefect_home_template: Path
) -> None:
    """SIGTERM (a CI runner, `kill`) ended the demo with 130, Ctrl-C's code: a supervisor could
    not tell which it was sent."""
    copy_prefect_home(prefect_home_template, tmp_path / "prefect")
    run, pending = _start_demo(tmp_path, "--videos", "1")
    try:
        _wait_for(run, pending, "inference service SERVING", timeout_s=300)
        run.process.send_signal(signal.SIGTERM)
        assert run.process.wait(timeout=120) == 128 + signal.SIGTERM
        while (line := pending.get(timeout=5)) is not None:
            run.lines.append(line)
        assert "interrupted: stopping everything this demo started" in run.output
        assert marked_processes(MARKER, run.marker) == []
    finally:
        run.process.kill()
        kill_marked_processes(MARKER, run.marker)


def test_keep_ui_ends_with_an_error_once_its_prefect_server_exits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--keep-ui waited for Ctrl-C for good after its Prefect server had died, with no UI left
    to keep. Here the server is a process that exits with 3 after a second."""
    from devstack.local_stack import LocalStack
    from vidflow.demo import hold_ui_or_say_how

    stack = LocalStack(tmp_path / "logs", prefect_home=tmp_path / "prefect")
    server = subprocess.Popen(
        [sys.executable, "-c", "import time, sys; time.sleep(1); sys.exit(3)"]
    )
    stack.processes["prefect-server"] = server
    started = time.monotonic()
    assert hold_ui_or_say_how(stack, keep_ui=True) is False
    assert server.returncode == 3 and time.monotonic() - started < 10
    assert f"the Prefect server exited with 3; see {tmp_path / 'logs'}" in caplog.text


def test_the_demo_without_its_sample_data_says_where_to_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clone from GitHub has no ../shared/data: the demo named two paths (one of them there)
    and left an empty run folder behind each time."""
    from vidflow import demo

    missing = tmp_path / "no-videos"
    monkeypatch.setattr(demo, "SAMPLE_VIDEOS_DIR", missing)
    assert demo.main(["--runs-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert f"sample data not found: {missing}." in err and "../shared/data" in err
    assert str(demo.KINETICS_VAL_CSV) not in err  # that one is there
    assert not (tmp_path / "runs").exists()
    # The stream run's own clip: missing, the demo failed only after the whole depth run
    monkeypatch.setattr(demo, "SAMPLE_VIDEOS_DIR", tmp_path)
    monkeypatch.setattr(demo, "SAMPLE_VIDEO", tmp_path / "no-clip.mp4")
    assert demo.main(["--runs-dir", str(tmp_path / "runs")]) == 1
    assert f"sample data not found: {tmp_path / 'no-clip.mp4'}." in capsys.readouterr().err


def test_a_demo_with_an_unknown_log_level_says_so_and_makes_no_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`VIDFLOW_LOG_LEVEL=verbose make demo` ended in a traceback ("Unknown level") once the
    root logger was set, its run folder already made and left empty."""
    from vidflow import demo

    monkeypatch.setenv("VIDFLOW_LOG_LEVEL", "verbose")
    assert demo.main(["--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "VIDFLOW_LOG_LEVEL 'verbose': not a log level" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("restore_root_logging")  # the demo sets up logging
def test_a_second_demo_on_the_same_prefect_history_is_refused(tmp_path: Path) -> None:
    """Two demos shared one Prefect database and work pool: each one's worker could take the
    other's flow runs, and the first to end killed them."""
    from tasks.depth.output_lock import output_lock
    from vidflow import demo

    runs = tmp_path / "runs"
    with output_lock(runs / "prefect"):  # the first demo holds the history
        assert demo.main(["--runs-dir", str(runs)]) == 1
    (log_file,) = runs.glob("demo-*/vidflow.log")
    said = log_file.read_text()
    assert f"another demo is running on {runs / 'prefect'}" in said and "--runs-dir DIR" in said
    assert not list(runs.glob("demo-*/logs/*"))  # nothing was started


def test_a_stack_whose_port_another_server_answers_on_fails_instead_of_using_it(
    tmp_path: Path,
) -> None:
    """Two demos started moments apart both chose port 4200: the second's health check got
    the first's answer, so it deployed to, and cancelled the runs of, the other's server."""
    from aiohttp import web

    from devstack.http_thread import serve_in_thread
    from devstack.local_stack import LocalStack

    async def healthy(_request: web.Request) -> web.Response:
        return web.json_response(True)

    app = web.Application()
    app.router.add_get("/api/health", healthy)
    with serve_in_thread(app) as port:  # the other demo's server, already up on the port
        stack = LocalStack(tmp_path / "logs", prefect_home=tmp_path / "home", ui_port=port)
        (tmp_path / "logs").mkdir()
        stack.launch_server()
        try:
            with pytest.raises(RuntimeError, match="the Prefect server exited") as exited:
                stack.wait_for_server(timeout_s=120)
            # Its own words, not only where its log was (a benchmark's temporary folder, gone
            # by the time its reader looked).
            assert f"Port {port} is already in use" in str(exited.value), exited.value
            assert f"(see {tmp_path / 'logs' / 'prefect-server.log'})" in str(exited.value)
        finally:
            stack.stop()


@pytest.mark.slow
def test_a_run_watched_for_a_worker_that_died_fails_at_once_naming_its_log(
    tmp_path: Path,
) -> None:
    """The demo watched each run for up to 30 min: with its worker dead, the run stayed
    Scheduled and the demo waited all of it, then said "no flow run id or final state"."""
    from common.net import free_port
    from devstack.local_stack import LocalStack

    (tmp_path / "logs").mkdir()
    stack = LocalStack(tmp_path / "logs", prefect_home=tmp_path / "home", ui_port=free_port())
    try:
        stack.start_server()
        stack.deploy("stream-benchmark/local")
        stack.start_worker()
        worker = stack.processes["prefect-worker"]
        worker.kill()
        worker.wait(10)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"the prefect worker exited with -9; see .*worker"):
            stack.run_deployment("stream-benchmark/local", {}, timeout_s=600)
        assert time.monotonic() - started < 30
    finally:
        assert stack.stop() == []


def test_runs_an_ended_demo_left_open_are_cancelled_before_a_worker_starts(prefect_api) -> None:
    """A run still Scheduled when a demo was stopped stayed in its Prefect history, and the
    next demo's worker ran it with the dead broker, service and mirror of the one before."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    from devstack.local_stack import cancel_open_runs

    @flow
    def left_open() -> None:
        pass

    pool = f"pool-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = client.create_flow(left_open)
        deployment = client.create_deployment(
            flow_id=flow_id, name="local", work_pool_name=pool, entrypoint="x.py:left_open"
        )
        open_runs = [client.create_flow_run_from_deployment(deployment) for _ in range(2)]
        assert {run.state.type.value for run in open_runs} == {"SCHEDULED"}
        cancelled = cancel_open_runs(str(PREFECT_API_URL.value()), pool)
        assert sorted(cancelled) == sorted(str(run.id) for run in open_runs)
        states = {client.read_flow_run(run.id).state.type.value for run in open_runs}
    assert states == {"CANCELLED"}
    assert cancel_open_runs(str(PREFECT_API_URL.value()), pool) == []  # final runs stay


def test_the_demo_echoes_the_log_of_the_run_it_waits_on(
    prefect_api, capsys: pytest.CaptureFixture[str]
) -> None:
    """`prefect deployment run --watch` prints states only: the demo sat silent through each
    run. The run's log lines come through as they are written, each once, its first line,
    INFO and up, of the deployment's newest run only."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import LogCreate, WorkPoolCreate
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelled

    from devstack.run_echo import RunLogEcho

    @flow(name="echoed")
    def echoed() -> None:
        pass

    api_url = str(PREFECT_API_URL.value())
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        deployment = client.create_deployment(
            flow_id=client.create_flow(echoed), name="local", work_pool_name=pool,
            entrypoint="x.py:echoed",
        )  # fmt: skip
        echo = RunLogEcho(api_url, "echoed", "local", every_s=0.0)
        assert echo.echo_new() == 0  # no run yet
        run = client.create_flow_run_from_deployment(deployment)

        def write(
            *lines: tuple[int, str],
            stamped: datetime.datetime | None = None,
            task_run_id: uuid.UUID | None = None,
        ) -> None:
            client.create_logs([
                LogCreate(name="prefect.flow_runs", level=level, message=message,
                          timestamp=stamped or datetime.datetime.now(datetime.UTC),
                          flow_run_id=run.id, task_run_id=task_run_id)
                for level, message in lines
            ])  # fmt: skip

        first_at = datetime.datetime.now(datetime.UTC)
        write((20, "24 videos: 0 already done"), (10, "a debug line"),
              (40, "v3 failed at download: HTTP 404\nTraceback ..."), stamped=first_at)  # fmt: skip
        assert echo.echo_new() == 2
        assert echo.echo_new() == 0  # each line once
        # A Ray worker's line stamped before those shown, arriving after them (each process
        # sends its lines in batches of its own; found in review, stop 61: it was never shown)
        write((30, "v7 failed at transcode: no video stream"),
              stamped=first_at - datetime.timedelta(seconds=1))  # fmt: skip
        # A task run's lines carry its name; a task run that went well says nothing (one
        # "Finished in state Completed()" a task run buried the run's own lines)
        for name, last_line in (("download shard 1", "Finished in state Failed('HTTP 404')"),
                                ("download shard 2", "Finished in state Completed()")):  # fmt: skip
            task_run = client.create_task_run(task(name="download")(lambda: None), run.id,
                                              dynamic_key=name, name=name)  # fmt: skip
            write((20, f"{name} began"), (40, last_line), task_run_id=task_run.id)
        write((20, "depth extraction: 23 ok, 1 failed"))
        echo()
        # More lines than one page of the API's answer, all of them, once; and the run's last
        # lines, sent after it ended, within the wait for them
        write(*[(20, f"line {index}") for index in range(250)])
        threading.Timer(0.5, write, args=((20, "Finished in state Completed()"),)).start()
        echo.finish(wait_s=2.0)
        client.set_flow_run_state(run.id, Cancelled(), force=True)  # none left for a worker
    out = capsys.readouterr().out.splitlines()
    assert out[:7] == [
        "  echoed | 24 videos: 0 already done",
        "  echoed | v3 failed at download: HTTP 404",
        "  echoed | v7 failed at transcode: no video stream",
        "  echoed | download shard 1: download shard 1 began",
        "  echoed | download shard 1: Finished in state Failed('HTTP 404')",
        "  echoed | download shard 2: download shard 2 began",
        "  echoed | depth extraction: 23 ok, 1 failed",
    ]
    assert sorted(out[7:-1]) == sorted(f"  echoed | line {index}" for index in range(250))
    assert out[-1] == "  echoed | Finished in state Completed()"


@pytest.mark.slow
def test_a_stack_behind_basic_auth_answers_the_demo_s_own_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_home_template: Path
) -> None:
    """On a machine shared with other accounts the demo runs behind Prefect's basic auth
    (README: only PREFECT_SERVER_API_AUTH_STRING is exported): its CLI calls and its own REST
    calls (leftover runs, artifacts) carry the string too (they were refused with 401)."""
    import urllib.error

    from common.net import free_port
    from devstack.local_stack import WORK_POOL, LocalStack, cancel_open_runs, post_json

    auth = f"admin:{uuid.uuid4().hex}"
    copy_prefect_home(prefect_home_template, tmp_path / "prefect")
    stack = LocalStack(
        logs_dir=tmp_path, prefect_home=tmp_path / "prefect", ui_port=free_port(),
        extra_env={"PREFECT_SERVER_API_AUTH_STRING": auth},
    )  # fmt: skip
    try:
        stack.start_server()
        with pytest.raises(urllib.error.HTTPError, match="401"):  # no auth string: refused
            post_json(f"{stack.api_url}/flow_runs/filter", {})
        stack.prefect("work-pool", "create", WORK_POOL, "--type", "process")  # the CLI's own
        monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", auth)  # as the demo sees it
        assert cancel_open_runs(stack.api_url, WORK_POOL) == []
        assert read_artifacts(stack.api_url, str(uuid.uuid4())) == {}
    finally:
        stack.stop()


def test_a_depth_model_the_user_named_that_cannot_be_had_fails_the_demo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A mistyped folder or hub id in VIDFLOW_DEPTH_DEPTH_MODEL ran the demo on random weights
    in its place, and it exited 0; only the default model falls back to the stand-in."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub here
    # nor the weights a run of the demo online left in this machine's cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("VIDFLOW_DEPTH_DEPTH_MODEL", str(tmp_path / "DepthPro-hf-typo"))
    with pytest.raises(RuntimeError, match="DepthPro-hf-typo does not exist"):
        depth_model_for_demo(tmp_path)
    monkeypatch.setenv("VIDFLOW_DEPTH_DEPTH_MODEL", "apple/DepthPro-typo")
    with pytest.raises(RuntimeError, match=r"apple/DepthPro-typo \(VIDFLOW_DEPTH_DEPTH_MODEL\) "
                       "cannot be had: huggingface_hub is offline"):  # fmt: skip
        depth_model_for_demo(tmp_path)
    monkeypatch.setenv("VIDFLOW_DEPTH_DEPTH_MODEL", "apple/DepthPro-hf")  # the default, named
    with pytest.raises(RuntimeError, match="cannot be had: huggingface_hub is offline"):
        depth_model_for_demo(tmp_path)
    monkeypatch.delenv("VIDFLOW_DEPTH_DEPTH_MODEL")
    stand_in, untrained = depth_model_for_demo(tmp_path)  # the default, offline: the stand-in
    assert untrained and (Path(stand_in) / "config.json").is_file()


def test_an_untrained_folder_the_user_named_is_labelled_untrained(
    monkeypatch: pytest.MonkeyPatch, tiny_depth_model: Path, tmp_path: Path
) -> None:
    """A stand-in given as the model (as the README suggests) was reported as trained."""
    monkeypatch.setenv("VIDFLOW_DEPTH_DEPTH_MODEL", str(tiny_depth_model))
    assert depth_model_for_demo(tmp_path) == (str(tiny_depth_model), True)


def test_the_demo_reaches_its_services_past_a_proxy_and_uses_none_of_the_user_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With http_proxy set and no no_proxy (a corporate laptop), every call to the demo's own
    Prefect server went to the proxy; VIDFLOW_INFERENCE_HOST=0.0.0.0 opened its service."""
    from aiohttp import web

    from devstack.http_thread import serve_in_thread
    from devstack.local_stack import post_json
    from vidflow.demo import demo_environment

    for variable in list(os.environ):  # the developer's own (it deletes them: restored after)
        if variable.startswith(("VIDFLOW_INFERENCE_", "VIDFLOW_KAFKA_")):
            monkeypatch.delenv(variable)
    for variable in ("http_proxy", "HTTP_PROXY"):  # nothing listens there: a proxied call fails
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "corp.example")
    monkeypatch.setenv("no_proxy", "")  # recorded, so that what the demo sets goes after
    monkeypatch.setenv("VIDFLOW_INFERENCE_HOST", "0.0.0.0")
    monkeypatch.setenv("VIDFLOW_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("VIDFLOW_DEPTH_FRAMES", "first")  # the demo's own job: kept
    monkeypatch.setenv("VIDFLOW_INFERENCE_DEVICE", "cpu")  # how the service runs: kept
    # The user's own Prefect database: the demo used it, and cancelled its pool's open runs.
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://u@db/prefect")
    # The user's own Ray cluster: the demo's depth run used it (its actors left loaded there,
    # a remote cluster's workers unable to reach the demo's loopback mirror).
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"got": await request.json()})

    app = web.Application()
    app.router.add_post("/api/x", answer)
    # urlopen's opener reads the proxies once, when first built: an earlier call in this
    # process (with none set) made one that would pass whatever the demo sets.
    monkeypatch.setattr(urllib.request, "_opener", None)
    with serve_in_thread(app) as port:
        assert demo_environment() == [
            "PREFECT_API_DATABASE_CONNECTION_URL", "RAY_ADDRESS", "VIDFLOW_INFERENCE_HOST",
            "VIDFLOW_KAFKA_SECURITY_PROTOCOL",
        ]  # fmt: skip
        assert post_json(f"http://127.0.0.1:{port}/api/x", {"a": 1}) == {"got": {"a": 1}}
    assert "127.0.0.1" in os.environ["no_proxy"].split(",")  # the lower-case one wins in urllib
    assert os.environ["NO_PROXY"].startswith("corp.example,")  # the user's entries kept
    assert os.environ["VIDFLOW_DEPTH_FRAMES"] == "first"
    assert os.environ["VIDFLOW_INFERENCE_DEVICE"] == "cpu"
    from flows.ray_start import cluster_address

    assert cluster_address() is None  # a private Ray, also where `ray start` runs one here


def test_two_demos_started_in_the_same_second_get_run_folders_of_their_own(tmp_path: Path) -> None:
    """The second crashed on the folder's name (FileExistsError) instead of meeting the lock."""
    from vidflow.demo import new_run_dir

    first, second = new_run_dir(tmp_path), new_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()


def test_the_depth_summary_counts_videos_without_a_row_as_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard whose commit failed writes no row for its videos, and a run that failed part-way
    leaves fewer: the demo counted the rows only, printed "2 of 2 videos ok" for a run of 4 and
    exited 0."""
    import pyarrow as pa

    from vidflow.demo import print_depth_summary

    def row(video_id: str, status: str) -> dict[str, object]:
        ok = status == "ok"
        return {
            "video_id": video_id, "label": "arm wrestling", "status": status,
            "width": 640 if ok else None, "height": 360 if ok else None,
            "depth_min_m": 1.0 if ok else None, "depth_max_m": 9.0 if ok else None,
            "depth_untrained": False, "error": None if ok else "HTTP 404\nmore",
            "failed_stage": None if ok else "download",
        }  # fmt: skip

    table = tmp_path / "videos.lance"
    lance.write_dataset(pa.Table.from_pylist([row("a", "ok"), row("b", "failed")]), table)
    assert print_depth_summary(table, {}, expected=4) == 3  # b, and the two without a row
    shown = capsys.readouterr().out
    assert "1 of 4 videos ok" in shown and "2 video(s) have no row" in shown
    assert "failed at download: HTTP 404" in shown
    assert print_depth_summary(table, {}, expected=2) == 1


def test_a_runs_folder_without_locks_is_said_so_not_called_another_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkout on a file system without locks (NFS without lockd, vboxsf) was told "another
    demo is running", and every try after failed the same way. (No such file system here: the
    refusal is made up; the demo stops at its lock, before it starts anything.)"""
    import argparse
    import errno
    import fcntl

    from vidflow.demo import run_demo

    def no_locks(_fd: object, _operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    args = argparse.Namespace(runs_dir=tmp_path / "runs")
    assert run_demo(args, tmp_path / "run", tmp_path / "demo.log") == 1
    said = caplog.text
    assert "takes no lock (No locks available)" in said and "another demo" not in said


def test_a_service_or_broker_that_exited_during_the_runs_is_named_with_its_log(
    tmp_path: Path,
) -> None:
    """A stream run that failed said only its own state: the demo's broker or service that
    had died under it (killed for memory during the depth run) went unnamed (found in review,
    stop 60)."""
    from devstack.broker import LocalBroker
    from devstack.launcher import ServerProcess
    from vidflow import demo

    exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    said: list[str] = []
    heard = logging.Handler(logging.ERROR)  # not caplog: Prefect's import resets the root's
    heard.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    demo.log.addHandler(heard)
    try:
        exited.wait(30)
        service = ServerProcess(exited, 1, 2, tmp_path / "server.log")
        demo.say_what_exited(service, LocalBroker(running, "127.0.0.1", 3), tmp_path)
    finally:
        demo.log.removeHandler(heard)
        running.kill()
        running.wait()
    assert said == [
        f"the demo's inference service exited (3) during the runs; see {tmp_path / 'server.log'}"
    ]


def test_the_demo_fails_where_its_sample_frames_get_no_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review, stop 62: every sample frame answered with an error (a service that is
    not there, here) printed ERROR for each, and the demo exited 0 all the same."""
    from common.net import free_port
    from vidflow.demo import print_classified_samples

    unlabelled = print_classified_samples(f"127.0.0.1:{free_port()}", tmp_path)
    out = capsys.readouterr().out
    assert unlabelled == out.count("ERROR") > 0, out


def test_a_local_stack_reaches_its_loopback_past_a_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review, stop 62: only the demo set no_proxy; a benchmark's stack on a machine
    with http_proxy set sent its calls to 127.0.0.1 to the proxy ("did not answer")."""
    from devstack.local_stack import LocalStack

    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    for variable in ("no_proxy", "NO_PROXY"):  # set, then unset: restored as found after
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    stack = LocalStack(logs_dir=tmp_path, prefect_home=tmp_path / "prefect")
    for variable in ("no_proxy", "NO_PROXY"):
        assert "127.0.0.1" in stack.env()[variable].split(",")
