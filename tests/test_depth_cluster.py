"""depth-extraction on a running Ray: a cluster of two nodes (two `ray start` on this machine,
one CPU each), where shards run on both nodes and each row says which; a head that listens
on 127.0.0.1 only (Ray's single-machine mode), which a driver reaches only by keeping the
loopback address; and a head that `ray start` runs on this machine, joined without
RAY_ADDRESS as `ray.init()` would."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lance
import pytest

from common.net import free_port
from devstack.processes import end_processes, processes_with_descendants
from devstack.ray_nodes import stop_ray_nodes
from devstack.video_server import Drip, Serve, VideoServer
from flows.depth_extraction import DepthRunFailedError, depth_extraction
from flows.ray_runner import ray_task_runner
from flows.ray_start import cluster_address, loopback_only_cluster, reaching_cluster, run_ray
from tasks.depth.settings import DepthSettings
from tests.conftest import VIDEOS

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


@contextlib.contextmanager
def _running_ray(
    monkeypatch: pytest.MonkeyPatch,
    *,
    cpus: int,
    second_node: bool,
    single_machine: bool,
    announced: bool = False,
    second_cpus: int | None = None,
    temp: Path | None = None,
) -> Iterator[str]:
    """`ray start` nodes on this machine (a head, and a second node if asked) addressed as
    127.0.0.1, with RAY_ADDRESS set to the head; all stopped afterwards. `single_machine`: Ray's
    single-machine mode, every server on 127.0.0.1 only (as bench.depth_peer and
    `loopback_only_ray` start theirs); multi-node is refused in it. `announced`: no RAY_ADDRESS;
    the head writes Ray's current-cluster file in its default place (under RAY_TMPDIR, set for
    this test), where `ray.init()` looks."""
    # Ray's socket paths live under --temp-dir and must fit in 107 bytes: keep it short.
    temp = temp or Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = dict(os.environ)  # with the session's Ray token (tests/conftest.py)
    if announced:
        env["RAY_TMPDIR"] = str(temp)
        monkeypatch.setenv("RAY_TMPDIR", str(temp))
    if single_machine:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    address = f"127.0.0.1:{free_port()}"
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]

    def start(*args: str, node_cpus: int = cpus) -> None:
        command = [RAY, "start", *args, "--num-cpus", str(node_cpus), *common]
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180,
                                 check=False)  # fmt: skip
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]

    head_temp = [] if announced else ["--temp-dir", str(temp / "head")]
    try:
        start("--head", "--port", address.split(":")[1], "--include-dashboard", "false",
              *head_temp)  # fmt: skip
        if second_node:
            start("--address", address, "--temp-dir", str(temp / "second"),
                  node_cpus=cpus if second_cpus is None else second_cpus)  # fmt: skip
        if announced:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        else:
            monkeypatch.setenv("RAY_ADDRESS", address)
        yield address
    finally:
        stop_ray_nodes(temp, address)  # these nodes only: `ray stop` ends every Ray here
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def two_node_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with _running_ray(monkeypatch, cpus=1, second_node=True, single_machine=False) as address:
        yield address


@pytest.fixture
def loopback_only_head(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with _running_ray(monkeypatch, cpus=2, second_node=False, single_machine=True) as address:
        yield address


@pytest.fixture(params=[False, True], ids=["network", "loopback-only"])
def announced_head(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A head that `ray start` announces on this machine: a normal one, and one in Ray's
    single-machine mode (every server on 127.0.0.1), as the README advises for a laptop."""
    with _running_ray(
        monkeypatch, cpus=2, second_node=False, single_machine=request.param, announced=True
    ) as address:
        yield address


def _cluster_view(address: str) -> tuple[set[str], list[str]]:
    """The cluster's live node ids and its named actors (of every namespace); a loopback-only
    cluster is reached as the runner reaches it (else ray.init waits for it for ever)."""
    import ray

    with reaching_cluster(address):
        ray.init(address=address)
        try:
            alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
            named = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
            return alive, named
        finally:
            ray.shutdown()


def _one_video_run(model: Path, tmp_path: Path) -> tuple[dict, list[dict]]:
    """depth-extraction of one real clip on whatever Ray the runner picks: summary and rows."""
    settings = DepthSettings(output=tmp_path / "out", depth_model=str(model), device="cpu")
    with VideoServer({"v.mp4": Serve(VIDEOS / "k400_arm_wrestling.mp4")}) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text(server.url("v.mp4") + "\n")
        flow = depth_extraction.with_options(task_runner=ray_task_runner())
        summary = flow(urls=str(urls), settings=settings)
    rows = lance.dataset(tmp_path / "out" / "videos.lance").to_table().to_pylist()
    return summary, rows


@pytest.mark.slow
def test_shards_run_on_both_nodes_and_rows_name_their_node(
    two_node_cluster: str, prefect_api: None, tiny_depth_model: Path, tmp_path: Path
) -> None:
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
    assert not loopback_only_cluster(two_node_cluster)  # it listens on this machine's address
    rows = lance.dataset(tmp_path / "out" / "videos.lance").to_table().to_pylist()
    nodes = {row["node_id"] for row in rows}
    alive, _ = _cluster_view(two_node_cluster)
    assert len(alive) == 2 and nodes == alive  # every shard's node, and both nodes used


@pytest.mark.slow
def test_a_run_whose_cluster_loses_the_node_a_stage_needs_fails_its_videos_instead_of_waiting(
    monkeypatch: pytest.MonkeyPatch, prefect_api: None, tiny_depth_model: Path, tmp_path: Path
) -> None:
    """A worker node lost mid-run (a spot instance reclaimed) whose CPUs were the only ones
    enough for a stage: Ray held its tasks pending, and the run sat Running for good with no
    word (found in review, stop 59). It now waits for the cluster to have them again, then
    fails the videos still going, saying why."""
    from tasks.depth import shard_tasks

    monkeypatch.setattr(shard_tasks, "LOST_CHECK_S", 0.5)
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    routes = {f"v{i}.mp4": Drip(VIDEOS / "k400_arm_wrestling.mp4", chunk=200_000, every_s=2.0)
              for i in range(2)}  # fmt: skip
    settings = DepthSettings(
        output=tmp_path / "out", depth_model=str(tiny_depth_model), shard_size=1,
        device="cpu", transcode_cpus=2, lost_node_wait_s=3.0,
    )  # fmt: skip
    outcome: dict[str, object] = {}
    with (
        _running_ray(monkeypatch, cpus=1, second_node=True, single_machine=False,
                     second_cpus=2, temp=temp),
        VideoServer(routes) as server,
    ):  # fmt: skip
        urls = tmp_path / "urls.txt"
        urls.write_text("\n".join(server.url(f"v{i}.mp4") for i in range(2)))
        flow = depth_extraction.with_options(task_runner=ray_task_runner())

        def run() -> None:
            try:
                outcome["summary"] = flow(urls=str(urls), settings=settings)
            except DepthRunFailedError as exc:  # no video done: the run fails, with its summary
                outcome["summary"] = exc.summary

        running = threading.Thread(target=run, daemon=True)
        running.start()
        assert _eventually(lambda: sum(server.requests.values()) > 0, timeout_s=120)
        second = str(temp / "second")  # the node with 2 CPUs: the only one a transcode fits
        end_processes(processes_with_descendants(lambda command: second in command), 1.0)
        running.join(180)
        assert not running.is_alive(), "the run waited for a node that is gone"
    summary = outcome["summary"]
    assert summary["ok"] == 0 and summary["failed"] == 2, summary
    rows = lance.dataset(tmp_path / "out" / "videos.lance").to_table().to_pylist()
    assert len(rows) == 2 and all(row["status"] == "failed" for row in rows)
    for row in rows:
        assert "--transcode-cpus 2: no node of this Ray cluster has that many CPUs" in row["error"]


@pytest.mark.slow
def test_a_loopback_only_cluster_is_reached_at_127_0_0_1(
    loopback_only_head: str, prefect_api: None, tiny_depth_model: Path, tmp_path: Path
) -> None:
    """Ray would swap RAY_ADDRESS's 127.0.0.1 for this machine's address, where this head does
    not listen, and wait for ever (the depth_peer benchmark's cluster mode hung so)."""
    assert loopback_only_cluster(loopback_only_head)
    summary, rows = _one_video_run(tiny_depth_model, tmp_path)
    assert summary["ok"] == 1
    alive, _ = _cluster_view(loopback_only_head)
    assert {row["node_id"] for row in rows} == alive  # ran there, not on a Ray of its own
    # `vidflow depth` with no Prefect API joins the cluster before it starts a temporary
    # Prefect server: a join refused (here: no token) leaves no flow run behind (one stayed
    # Running for ever), and it is said sooner.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") and not k.startswith("PREFECT_API")
    }
    env |= {"HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "RAY_gcs_server_port_wait_time_s": "2"}  # fmt: skip
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/clip.mp4\n")
    refused = subprocess.run(
        [sys.executable, "-m", "vidflow.cli", "depth", "--urls", str(urls), "--output",
         str(tmp_path / "refused"), "--depth-model", str(tiny_depth_model)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "this run sent no token" in refused.stderr, refused.stderr[-2000:]
    # no temporary Prefect server was started, so no flow run could be left behind
    assert "temporary Prefect server" not in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()
    # With the token, the same command runs there, its temporary server started after the
    # join and reached by the cluster's workers.
    env |= {name: os.environ[name] for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    with VideoServer({"v.mp4": Serve(VIDEOS / "k400_arm_wrestling.mp4")}) as server:
        urls.write_text(server.url("v.mp4") + "\n")
        done = subprocess.run(
            [sys.executable, "-m", "vidflow.cli", "depth", "--urls", str(urls), "--output",
             str(tmp_path / "cli"), "--depth-model", str(tiny_depth_model), "--device", "cpu"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["ok"] == 1
    cli_rows = lance.dataset(tmp_path / "cli" / "videos.lance").to_table().to_pylist()
    assert {row["node_id"] for row in cli_rows} == alive


@pytest.mark.slow
def test_a_cluster_that_ray_start_runs_here_is_joined_without_ray_address(
    announced_head: str, prefect_api: None, tiny_depth_model: Path, tmp_path: Path
) -> None:
    """As `ray.init()` does: no Ray start for the run, and its depth actor stays loaded there.
    (Before, the private instance's arguments made `ray.init()` refuse that cluster.)"""
    found = cluster_address()  # a normal head is announced under this machine's address
    assert found is not None and found.rpartition(":")[2] == announced_head.rpartition(":")[2]
    summary, rows = _one_video_run(tiny_depth_model, tmp_path)
    assert summary["ok"] == 1
    alive, named_actors = _cluster_view(announced_head)
    assert {row["node_id"] for row in rows} == alive
    assert any(name.startswith("depth-") for name in named_actors)  # still loaded there
    # A run in a shell without RAY_AUTH_MODE, the account's token in ~/.ray/auth_token (where
    # `ray get-auth-token --generate` puts it), joins too: Ray alone sends no token then.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(os.environ["RAY_AUTH_TOKEN"])
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(home)
    joined = subprocess.run([sys.executable, "-c", JOIN_AS_A_RUN], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert json.loads(joined.stdout.splitlines()[-1]) == sorted(alive)
    # Without any token, the CLI's early start and the flow's runner alike say why the cluster
    # refused them (Ray's own last word was "Failed to connect to Ray cluster at ...").
    (home / ".ray" / "auth_token").unlink()
    env["RAY_gcs_server_port_wait_time_s"] = "2"  # Ray's 20 tries, one a second, cut to 2
    refused = subprocess.run([sys.executable, "-c", JOIN_WITHOUT_A_TOKEN], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    errors = json.loads(refused.stdout.splitlines()[-1])
    assert len(errors) == 2, refused.stderr[-2000:]
    assert all("the cluster uses token auth and this run sent no token" in e for e in errors)
    assert all("RAY_AUTH_MODE=token" in e for e in errors)
    # Told to send a token it does not have: refused at once, the same way (Ray's
    # AuthenticationError was a traceback and exit 1)
    env["RAY_AUTH_MODE"] = "token"
    refused = subprocess.run([sys.executable, "-c", JOIN_WITHOUT_A_TOKEN], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    errors = json.loads(refused.stdout.splitlines()[-1])
    assert len(errors) == 2, refused.stderr[-2000:]
    assert all("RAY_AUTH_MODE=token, but this run has no Ray token" in e for e in errors)


# Joins as `vidflow depth` does before Prefect starts, then as the flow's runner does; prints
# the errors.
JOIN_WITHOUT_A_TOKEN = """
import json
from flows.ray_runner import ray_task_runner
from flows.ray_start import early_ray
errors = []
for join in (lambda: early_ray(None, lambda cpus: 0).__enter__(),
             lambda: ray_task_runner().__enter__()):
    try:
        join()
    except ConnectionError as exc:
        errors.append(str(exc))
print(json.dumps(errors))
"""


# Joins the Ray a run would (`run_ray`) and prints its live node ids.
JOIN_AS_A_RUN = """
import json, ray
from flows.ray_start import run_ray
address, init_kwargs, hold = run_ray(None)
with hold:
    ray.init(address=address, **init_kwargs)
    print(json.dumps(sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])))
"""


def test_which_cluster_a_run_joins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's current-cluster file goes here
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert cluster_address() == "10.1.2.3:6379"
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's word for a new local instance
    assert cluster_address() is None
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address() is None  # no cluster started here
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    assert cluster_address() is None  # the file of a cluster that is gone


def test_a_ray_token_that_cannot_be_read_is_refused_in_a_line() -> None:
    """RAY_AUTH_TOKEN_PATH naming no file raised Ray's AuthenticationError: a traceback."""
    with socket.socket() as listener:  # something listens there, so the token is looked at
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
        env |= {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": "/nonexistent/ray-token"}  # fmt: skip
        code = "from flows.ray_start import run_ray\nrun_ray(None)"
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    [last] = done.stderr.strip().splitlines()[-1:]
    assert last.startswith("ConnectionError: the Ray token cannot be read: "), done.stderr[-2000:]
    assert "/nonexistent/ray-token" in last


def test_a_deployment_run_whose_ray_does_not_start_ends_failed_with_the_reason(
    prefect_api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's run with a bad RAY_ADDRESS was marked Crashed, "Process exited with status
    code: 1", its reason only in the log (Prefect sets no state when a task runner fails)."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="ray-start-refused")
    def nothing() -> None: ...

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(nothing)
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(run.id))  # as a worker starts its runs
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ConnectionError, match="nothing listens"):
        ray_task_runner().__enter__()
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state is not None and state.is_failed()
    assert state.message.startswith(
        f"Ray did not start for this run: nothing listens at the Ray cluster address {address}"
    )


def test_a_ray_address_where_nothing_listens_is_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray tried such an address for 80 s before its "Failed to connect"."""
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"nothing listens at the Ray cluster address 127"):
        run_ray(None)
    assert time.monotonic() - started < 20  # not Ray's 80 s of tries
    monkeypatch.setenv("RAY_ADDRESS", "no-such-head.invalid:6379")
    with pytest.raises(ConnectionError, match=r"no-such-head\.invalid:6379 names a host that does"):
        run_ray(None)


NOBODY = 65534  # an account other than this one


@contextlib.contextmanager
def _raylet_process(
    gcs_address: str, *, account: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A process that shows itself as a raylet of the cluster at `gcs_address` (its name and
    the command line Ray looks for), run by `account` (this one if None): what another account
    can start beside a real cluster's, or in place of one that has gone."""
    with tempfile.TemporaryDirectory(prefix="fake-raylet-") as folder:
        Path(folder).chmod(0o755)  # where another account can run it from
        raylet = Path(folder) / "raylet"
        raylet.symlink_to(shutil.which("sh") or "/bin/sh")
        as_account = (
            []
            if account is None
            else ["setpriv", f"--reuid={account}", f"--regid={account}", "--clear-groups"]
        )
        command = [str(raylet), "-c", "sleep 600; :", "raylet", f"--gcs-address={gcs_address}"]
        process = subprocess.Popen([*as_account, *command])
        try:
            yield process
        finally:
            process.kill()
            process.wait()


@pytest.mark.skipif(os.getuid() != 0, reason="making a file or process another account's")
def test_a_cluster_announced_by_another_account_is_not_joined(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ray's current-cluster file lives where any account can write (/tmp/ray): a run joins
    the cluster it names only if the file and a raylet of that cluster are this account's."""
    from ray._private import services

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    announced = f"127.0.0.1:{free_port()}"
    (tmp_path / "ray").mkdir()
    current = tmp_path / "ray" / "ray_current_cluster"
    current.write_text(announced)

    def raylet_seen() -> bool:
        services.find_gcs_addresses.cache_clear()  # Ray keeps what it found last
        return announced in services.find_gcs_addresses()

    with _raylet_process(announced):
        assert _eventually(raylet_seen)
        assert cluster_address() == announced  # this account's: joined
        os.chown(current, NOBODY, NOBODY)
        assert cluster_address() is None  # the file another account's
        assert cluster_address() is None  # asked again, as the CLI, early start and runner do
        warned = [r for r in caplog.records if r.getMessage().startswith("Not joining")]
        assert len(warned) == 1 and announced in warned[0].getMessage()
    assert _eventually(lambda: not raylet_seen())
    os.chown(current, os.getuid(), os.getgid())
    with _raylet_process(announced, account=NOBODY):
        assert _eventually(raylet_seen)
        assert cluster_address() is None  # served by another account's raylet only


@pytest.mark.slow
def test_a_tests_ray_nodes_are_stopped_and_no_other_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray stop --force` ended every Ray of the machine: a developer's own cluster, or a run in
    another terminal, died with a test's teardown."""
    from ray._private import services

    with _raylet_process("127.0.0.1:1") as bystander:  # another Ray's raylet, as Ray sees one
        with _running_ray(monkeypatch, cpus=1, second_node=False, single_machine=True) as address:
            gcs_port = int(address.rpartition(":")[2])
            assert _eventually(lambda: _port_open(gcs_port))
        services.find_gcs_addresses.cache_clear()
        assert address not in services.find_gcs_addresses()  # its raylet is gone
        assert not _port_open(gcs_port)  # and its GCS
        assert bystander.poll() is None


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        return True
    return False


def _eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
def test_the_flows_own_runner_sizes_a_private_ray_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deployment run uses the runner the flow was built with (no CPU count: Ray starts
    before the flow reads its parameters): VIDFLOW_DEPTH_RAY_NUM_CPUS sizes its Ray."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setenv("VIDFLOW_DEPTH_RAY_NUM_CPUS", "1")
    runner = depth_extraction.task_runner.duplicate()  # what Prefect enters for a flow run
    assert runner.num_cpus is None
    with runner:
        assert ray.cluster_resources().get("CPU") == 1


@pytest.mark.slow
def test_a_stale_current_cluster_file_does_not_keep_a_run_from_its_own_ray(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ray.init() alone would try the dead cluster named in the file."""
    import ray

    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
    try:
        monkeypatch.setenv("RAY_TMPDIR", str(temp))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")

        def prefects(signum: int, frame: object) -> None:  # as a flow run's engine sets it
            raise AssertionError("not called here")

        before = signal.signal(signal.SIGTERM, prefects)
        try:
            with ray_task_runner(1):
                assert ray.cluster_resources().get("CPU") == 1  # its own, of the size asked
                # ray.init's SIGTERM handler (sys.exit) replaced Prefect's: a cancelled run
                # ended Crashed instead of Cancelled.
                assert signal.getsignal(signal.SIGTERM) is prefects
        finally:
            signal.signal(signal.SIGTERM, before)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_address_auto_joins_only_a_cluster_of_this_account_started_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` was passed to Ray as it was: Ray took the first cluster any account had named in
    /tmp/ray's current-cluster file, or any account's GCS process. It is now found with the
    checks of an unset address, and must find one."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    try:
        monkeypatch.setenv("RAY_TMPDIR", str(temp))
        monkeypatch.setenv("RAY_ADDRESS", "auto")
        with pytest.raises(ConnectionError, match="RAY_ADDRESS=auto: no Ray cluster"):
            cluster_address()
        (temp / "ray").mkdir()  # a file naming a cluster that is not running
        (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        with pytest.raises(ConnectionError, match="RAY_ADDRESS=auto: no Ray cluster"):
            cluster_address()
        monkeypatch.delenv("RAY_ADDRESS")
        assert cluster_address() is None  # unset: a private Ray, as before
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_a_cluster_with_nodes_elsewhere_is_refused_while_the_api_is_on_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`vidflow depth` with RAY_ADDRESS of a real cluster and its temporary Prefect server (on
    127.0.0.1): every task on another machine failed with "All connection attempts failed".
    No other machine here: the cluster's node list is made up; the rule is the real one."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import depth_extraction

    monkeypatch.setattr(depth_extraction, "nodes_elsewhere", lambda: ["10.0.0.7"])
    with (
        temporary_settings({PREFECT_API_URL: "http://127.0.0.1:8123/api"}),
        pytest.raises(ValueError, match="cannot reach: set PREFECT_API_URL"),
    ):
        depth_extraction.check_api_reachable()
    for here in ("http://0.0.0.0:4200/api", "http://[::ffff:127.0.0.1]:4200/api"):
        with (  # as Prefect prints it once bound to every interface; a mapped loopback
            temporary_settings({PREFECT_API_URL: here}),
            pytest.raises(ValueError, match="cannot reach"),
        ):
            depth_extraction.check_api_reachable()
    with temporary_settings({PREFECT_API_URL: "http://prefect.internal:4200/api"}):
        depth_extraction.check_api_reachable()  # every node may reach it
    monkeypatch.setattr(depth_extraction, "nodes_elsewhere", list)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:8123/api"}):
        depth_extraction.check_api_reachable()  # all on this machine (as the tests' clusters)
    # Which nodes are elsewhere: the live ones at no address of this machine (the tests'
    # clusters are all on 127.0.0.1, where an answer of none always passed; stop 57).
    import ray

    from flows.ray_runner import nodes_elsewhere

    nodes = [{"Alive": True, "NodeManagerAddress": "203.0.113.7"},
             {"Alive": True, "NodeManagerAddress": "127.0.0.1"},
             {"Alive": False, "NodeManagerAddress": "203.0.113.9"}]  # fmt: skip
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert nodes_elsewhere() == ["203.0.113.7"]


def test_a_cluster_with_no_cpu_now_is_refused_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An autoscaling cluster whose head has no CPU and whose workers are not up yet was
    refused as "--transcode-cpus 1: no node ... has that many CPUs (the largest has 0)" (found
    in review, stop 57). No such cluster here: its node list is made up; the rule is real."""
    import ray

    from flows.depth_extraction import check_fits_cluster

    head = {"Alive": True, "Resources": {"memory": 1e9}, "NodeManagerAddress": "127.0.0.1"}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [head])
    with pytest.raises(ValueError, match=r"has no CPU now .*: keep one worker node up"):
        check_fits_cluster(DepthSettings())


def test_depth_on_cuda_where_the_cluster_has_no_gpu_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--device cuda` on a cluster without a GPU (CUDA_VISIBLE_DEVICES empty, its GPU nodes
    down) ran Depth Pro on the CPU with an info line, for hours (found in review, stop 58);
    the service refuses or warns where it gets no GPU. The node list is made up (one node of
    2 CPUs, no GPU, as this machine is); the rule is real."""
    import ray

    from flows.depth_extraction import check_fits_cluster

    node = {"Alive": True, "Resources": {"CPU": 2.0}, "NodeManagerAddress": "127.0.0.1"}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [node])
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(node["Resources"]))
    with pytest.raises(ValueError, match=r"--device cuda: this Ray cluster has no GPU"):
        check_fits_cluster(DepthSettings(device="cuda"))
    check_fits_cluster(DepthSettings())  # auto: the CPU, as asked
    check_fits_cluster(DepthSettings(device="cuda", depth_backend="onnx"))  # the CPU's backend
