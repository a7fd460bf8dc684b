"""The stream-benchmark flow under a real Prefect API, with the real broker and service."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import FlowRunSort
from prefect.logging.handlers import APILogHandler

from common.net import free_port
from devstack.launcher import REPO_ROOT
from devstack.video_server import Guarded, VideoServer
from flows.stream_benchmark import stream_benchmark
from flows.stream_failures import FramesUndeliveredError
from flows.stream_settings import StreamBenchmarkSettings
from services.inference.settings import ClientSettings
from tasks.depth.transcode import ffmpeg_exe
from tasks.stream.producer import produce_frames
from tasks.stream.settings import KafkaSettings, ProducerSettings
from tests.conftest import VIDEOS
from tests.kafka_helpers import (
    partition_ends,
    read_topic,
    result_keys,
    stream_benchmark_env,
    stream_benchmark_run,
)


@pytest.fixture
def health_only_service() -> Iterator[str]:
    """A real gRPC server on 127.0.0.1 that answers health checks and nothing else: a service
    that is there but wrong (every Classify ends UNIMPLEMENTED). It says NOT_SERVING, as a
    service still loading its model does: that counts as there, and its calls are waited for."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _run_logs(flow_run_id: Any) -> list[Any]:
    """The flow run's logs in the API, once this process has sent all it holds: Prefect's
    handler sends them in batches in the background, and a read right after the run (in a
    busy suite) found none of the run's own."""
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        return client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )


@pytest.mark.slow
def test_a_run_whose_frames_the_broker_refused_fails_and_says_why(
    prefect_api, kafka, onnx_server
) -> None:
    """Every frame over the message size limit: the run ended Completed, exit 0, with a
    throughput of 0.0 frames/s."""
    settings = StreamBenchmarkSettings(
        duration=2.0,
        client=ClientSettings(target=onnx_server.target),
        kafka=kafka.model_copy(update={"max_message_bytes": 1000}),  # under every frame
    )
    state = stream_benchmark(settings=settings, return_state=True)
    assert state.is_failed()
    with pytest.raises(FramesUndeliveredError, match="took none of the producer's frames") as no:
        state.result()
    produced = no.value.outcome["producer"]
    assert produced["delivered"] == 0 and produced["failed"] >= 28  # 2 s of the 28-fps clip


def test_the_flow_records_its_figures_as_artifacts(
    prefect_api, kafka, onnx_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Meant for `vidflow produce` and `consume`, not the flow's own parts (found in review: an
    # exported VIDFLOW_CONSUMER_MAX_FRAMES stopped its consumers at that count).
    for name, value in [("CONSUMER_MAX_FRAMES", "3"), ("PRODUCER_MAX_FRAMES", "5"),
                        ("PRODUCER_STREAM_ID", "x"),
                        ("CONSUMER_PRODUCED_SINCE_MS", str(2**62))]:  # fmt: skip
        monkeypatch.setenv(f"VIDFLOW_{name}", value)
    settings = StreamBenchmarkSettings(
        duration=5.0,
        fps="native",
        concurrency=4,
        streams=2,  # two cameras, one for each member of the group
        consumers=2,
        client=ClientSettings(target=onnx_server.target),
        kafka=kafka,
    )
    state = stream_benchmark(settings=settings, return_state=True)
    outcome = state.result()
    summary, produced = outcome["summary"], outcome["producer"]
    assert 200 <= produced["frames_read"] <= 320  # 5 s at the clip's 28 fps, twice
    # The group's rate is over its own window, from its first frame to its last result: that
    # ends within the slowest frame's wait after the cameras' last frame, however loaded the
    # machine (a window from the member's start, its join included, read ~35 frames/s here
    # against the cameras' 56 and passed every check below).
    slowest_s = summary["e2e_ms"]["max"] / 1000
    assert summary["duration_s"] <= produced["duration_s"] + slowest_s + 0.5, (summary, produced)
    assert len(produced["per_stream"]) == 2
    assert not [s for s in produced["per_stream"] if s.startswith("x")]  # the clip's own names
    # Each frame consumed once: the member whose partition got no frames stays in the group
    # (it left on its idle timeout mid-run, and the rebalance had frames consumed twice).
    assert summary["frames_consumed"] == produced["frames_read"]
    assert summary["dlq"] == 0 and summary["errors"] == 0
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic)
    assert len(set(result_keys(results))) == produced["frames_read"]

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["stream-benchmark-latency", "stream-benchmark-report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    by_key = {a.key: a for a in artifacts}
    table = by_key["stream-benchmark-latency"].data
    rows = {row["stage"]: row for row in (json.loads(table) if isinstance(table, str) else table)}
    assert set(rows) == {"inference", "rpc", "e2e"}
    assert rows["e2e"]["p99"] == summary["e2e_ms"]["p99"]
    assert rows["inference"]["p50"] == summary["inference_ms"]["p50"]
    report = by_key["stream-benchmark-report"].data
    assert f"{summary['fps']:.1f} frames/s" in report
    assert "| e2e |" in report and "| dead-lettered | 0 |" in report
    # Every outcome the figures count, and the budget they were counted under.
    assert f"| skipped as stale | {summary['skipped_stale']} |" in report
    assert "| max_frame_age_ms | off |" in report
    assert "| streams | `2` |" in report  # its throughput is the two cameras' together

    # A second run on the same topics counts its own frames only (it read the first run's
    # too: twice the frames, with ages of seconds in its latencies), though another producer
    # writes to its topic all along (its frames were counted: found in review, stop 61).
    again = settings.model_copy(update={"duration": 2.0, "consumers": 1})
    other_stop = threading.Event()
    other_settings = ProducerSettings(source=str(VIDEOS / "k400_arm_wrestling.mp4"), loop=True,
                                      stream_id="another-producer", max_frames=None)  # fmt: skip
    with futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(produce_frames, other_settings, kafka, other_stop)
        try:
            second = stream_benchmark(settings=again)
        finally:
            other_stop.set()
        assert other.result().frames_read > 2 * 28  # at its native rate, through the run
    assert second["summary"]["frames_consumed"] == second["producer"]["frames_read"] > 0


@pytest.mark.slow
def test_a_camera_named_by_a_variable_keeps_its_password_out_of_prefect(
    prefect_api, kafka, onnx_server, monkeypatch
) -> None:
    """A camera's URL carries its password; as `--source` it was stored in the flow run's
    parameters, where the UI and the API show it. `env:NAME` stores only the name."""
    with VideoServer(
        {"live.mp4": Guarded(VIDEOS / "k400_arm_wrestling.mp4", "viewer", "s3cret")}
    ) as camera:
        url = camera.url("live.mp4").replace("http://", "http://viewer:s3cret@")
        monkeypatch.setenv("VIDFLOW_TEST_CAMERA", url)
        settings = StreamBenchmarkSettings(
            source="env:VIDFLOW_TEST_CAMERA", duration=2.0, fps="max", max_frames=20,
            client=ClientSettings(target=onnx_server.target), kafka=kafka,
        )  # fmt: skip
        state = stream_benchmark(settings=settings, return_state=True)
    outcome = state.result()
    assert camera.requests["live.mp4"] >= 2  # refused without the login, then served with it
    assert outcome["producer"]["frames_read"] == 20
    assert outcome["summary"]["results_published"] == 20
    keys = result_keys(read_topic(kafka.bootstrap_servers, kafka.results_topic))
    assert {key.split("@")[0] for key in keys} == {"127.0.0.1-live.mp4"}  # host and path
    run_id = state.state_details.flow_run_id
    logs = _run_logs(run_id)
    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(run_id).model_dump_json()
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    assert "env:VIDFLOW_TEST_CAMERA" in stored
    producing = f"producing http://127.0.0.1:{camera.port}/live.mp4 as 1 stream"
    assert any(producing in log.message for log in logs), [log.message for log in logs]
    shown = [stored, *(log.message for log in logs), *(str(a.data) for a in artifacts)]
    assert not [text for text in shown if "s3cret" in text]
    assert any(f"http://127.0.0.1:{camera.port}/live.mp4" in str(a.data) for a in artifacts)


def _flow_run_on(topic: str) -> Any:
    """The one stream-benchmark flow run whose parameters name `topic` (each test's own)."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=50)
    (run,) = [r for r in runs if topic in json.dumps(r.parameters)]
    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals",
    [[signal.SIGINT], [signal.SIGHUP], [signal.SIGTERM], [signal.SIGINT, signal.SIGINT]],
    ids=["ctrl-c", "hang-up", "sigterm", "ctrl-c-twice"],
)
def test_ctrl_c_ends_a_stream_benchmark_early_with_its_report(
    prefect_api, kafka, onnx_server, tmp_path: Path, signals: list[signal.Signals]
) -> None:
    """Ctrl-C did nothing until the run's end, then left no report (flow run Crashed). A
    closed terminal (SIGHUP) killed it silently, its flow run left Running: it stops as Ctrl-C
    does. SIGTERM (Prefect's during a flow run: the run Crashed) went on producing for the
    run's whole length before the command ended, with a traceback. A second Ctrl-C does not
    wait for the consumers to finish."""
    summary_json = tmp_path / "summary.json"
    command = stream_benchmark_run(
        kafka, onnx_server.target, "--duration", "120", "--summary-json", str(summary_json)
    )
    env = stream_benchmark_env()
    run = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not sum(partition_ends(kafka.bootstrap_servers, kafka.results_topic, 2)):
            assert time.monotonic() < deadline and run.poll() is None, run.stderr.read()
            time.sleep(0.5)
        interrupted_at = time.monotonic()
        for signum in signals:  # back to back: the second comes while the first is worked
            run.send_signal(signum)
            time.sleep(0.3)  # apart: two at once are one to Python
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert time.monotonic() - interrupted_at < 40  # the producer stopped; not 120 s of it
    flow_run = _flow_run_on(kafka.frames_topic)
    if signals[-1] == signal.SIGTERM or len(signals) == 2:
        code = 128 + signals[-1]
        assert run.returncode == code, err[-3000:]
        assert flow_run.state_type.value == "CRASHED", flow_run.state
        assert not summary_json.exists() and "Traceback" not in err, err[-3000:]
        if code == 143:
            assert "terminated (SIGTERM)" in err, err[-3000:]
        return
    assert run.returncode == 0, err[-3000:]
    assert "stopped early" in err
    assert flow_run.state_type.value == "COMPLETED", flow_run.state
    outcome = json.loads(summary_json.read_text())
    produced = outcome["producer"]["frames_read"]
    assert 0 < produced < 28 * 60
    assert outcome["summary"]["frames_consumed"] == produced  # the frames sent were finished
    with get_client(sync_client=True) as client:
        [report] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["stream-benchmark-report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]),
            )
        )
    assert f"{produced} produced at" in str(report.data)  # the run's own report, as stopped


@pytest.mark.slow
def test_a_run_whose_frames_no_service_answered_fails_and_says_why(
    prefect_api, kafka, health_only_service: str, tmp_path: Path
) -> None:
    """It ended Completed, exit 0, with a latency table of 0.0 ms that read as figures."""
    summary_json = tmp_path / "new-folder" / "summary.json"
    nobody = health_only_service  # there (it answers health checks), but answers no frame
    command = stream_benchmark_run(
        kafka, nobody, "--duration", "2", "--summary-json", str(summary_json)
    )
    env = stream_benchmark_env()
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"is the inference service at {nobody} up and right?" in run.stderr, run.stderr[-3000:]
    # ... out of how many: the consumer stops with only its calls in flight taken
    assert re.search(r"not one of the \d+ frames consumed \(of \d+ the producer delivered\)",
                     run.stderr)  # fmt: skip
    assert "Traceback" not in run.stderr  # a failure the run explains, not a crash
    e2e_row = next(line for line in run.stdout.splitlines() if line.split()[:1] == ["e2e"])
    assert e2e_row.split()[1:] == ["-"] * 5, run.stdout
    outcome = json.loads(summary_json.read_text())  # written on failure too
    summary = outcome["summary"]
    assert summary["frames_consumed"] > 0
    assert summary["unanswered"] == summary["frames_consumed"]
    # The UI says the same: no latency figures (they were 0.0), and the failure logged as its
    # message (it was the exception's repr: 2,400 characters with every figure in it).
    with get_client(sync_client=True) as client:
        # This run's, found by its topic (the file's other runs left artifacts of that key)
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=50)
        (run_id,) = [r.id for r in runs if kafka.frames_topic in json.dumps(r.parameters)]
        [latency] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["stream-benchmark-latency"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
            ),
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    errors = [log for log in logs if log.level >= logging.ERROR]
    # The consumer's warnings, which say why, are in the run's log (they were on stderr only).
    assert any(log.name.startswith("tasks.stream") and nobody in log.message for log in logs)
    table = json.loads(latency.data) if isinstance(latency.data, str) else latency.data
    assert [row["p99"] for row in table] == [None, None, None], table
    assert errors and all(len(log.message) < 1500 for log in errors), errors
    assert not any("'frames_consumed'" in log.message for log in errors)


@pytest.mark.slow
def test_a_consumer_that_cannot_start_fails_the_run_without_a_wait(
    prefect_api, kafka, health_only_service: str
) -> None:
    """The producer waited 60 s for every member to join, then produced to nobody."""
    # A consumer-only setting librdkafka refuses (at most 300,000), so only the consumers fail
    # (the settings refuse it too, since stop 50: model_copy skips their check, standing for a
    # member that cannot start for a reason of its own).
    refused = kafka.model_copy(update={"fetch_wait_max_ms": 400_000})
    settings = StreamBenchmarkSettings(
        duration=30.0, fps="native", consumers=2,
        client=ClientSettings(target=health_only_service), kafka=refused,
    )  # fmt: skip
    started = time.monotonic()
    state = stream_benchmark(settings=settings, return_state=True)
    took_s = time.monotonic() - started
    assert state.is_failed()
    with pytest.raises(Exception, match=r"fetch\.wait\.max\.ms"):
        state.result()
    # not the 60-s wait for a member that will never join, nor 30 s of frames sent to nobody
    assert took_s < 28, took_s


@pytest.mark.slow
def test_a_broker_that_never_answers_fails_the_run_in_one_line(prefect_api, kafka) -> None:
    """It ended Failed with "Flow run encountered an exception" and two tracebacks in the log
    (60 lines on the CLI's stderr); the CLI now asks before it starts a flow run at all."""
    nobody = kafka.model_copy(
        update={"bootstrap_servers": f"127.0.0.1:{free_port()}", "broker_grace_s": 3.0}
    )
    settings = StreamBenchmarkSettings(
        duration=2.0, client=ClientSettings(target="127.0.0.1:1"), kafka=nobody
    )
    state = stream_benchmark(settings=settings, return_state=True)
    assert state.is_failed()
    # Waited as long as --broker-grace-s says, where that is under the 15-s start timeout.
    assert state.message.startswith(f"Kafka broker {nobody.bootstrap_servers} unreachable for 3 s")
    logs = _run_logs(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        runs_before = client.count_flow_runs()
    flow_errors = [
        log.message for log in logs if log.level >= logging.ERROR and log.task_run_id is None
    ]
    assert flow_errors == [state.message], flow_errors  # the reason, once, with no traceback

    command = stream_benchmark_run(
        nobody, "127.0.0.1:1", "--duration", "2", "--broker-grace-s", "3"
    )
    run = subprocess.run(command, cwd=REPO_ROOT, env=stream_benchmark_env(), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.count("\n") == 1 and " unreachable for 3 s" in run.stderr, run.stderr
    with get_client(sync_client=True) as client:
        assert client.count_flow_runs() == runs_before  # refused before a flow run existed


@pytest.mark.slow
def test_a_service_that_is_not_there_fails_the_run_in_one_line(prefect_api, kafka) -> None:
    """The run produced for its whole length, the consumers retried every frame against a
    closed port, and it ended "not one of the frames was answered" 17 s later; the CLI started a
    Prefect server and a flow run first. Now both say at the start that nothing is there, after
    the wait --service-wait-s gives a service that is still starting (15 s by default)."""
    nobody = f"127.0.0.1:{free_port()}"
    settings = StreamBenchmarkSettings(
        duration=40.0, client=ClientSettings(target=nobody), kafka=kafka, service_wait_s=2.0
    )
    started = time.monotonic()
    state = stream_benchmark(settings=settings, return_state=True)
    assert state.is_failed() and time.monotonic() - started < 25  # not the run's 40 s
    assert state.message.startswith(f"inference service {nobody} unreachable for 2 s (UNAVAILABLE")
    flow_errors = [
        log.message
        for log in _run_logs(state.state_details.flow_run_id)
        if log.level >= logging.ERROR and log.task_run_id is None
    ]
    assert flow_errors == [state.message], flow_errors  # the reason, once, with no traceback
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    assert task_runs == []  # no topic made, no producer or consumer started

    with get_client(sync_client=True) as client:
        runs_before = client.count_flow_runs()
    command = stream_benchmark_run(kafka, nobody, "--duration", "20", "--service-wait-s", "3")
    run = subprocess.run(command, cwd=REPO_ROOT, env=stream_benchmark_env(), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.count("\n") == 1, run.stderr
    assert f"inference service {nobody} unreachable for 3 s" in run.stderr, run.stderr
    assert "vidflow serve" in run.stderr
    with get_client(sync_client=True) as client:
        assert client.count_flow_runs() == runs_before  # refused before a flow run existed


def test_a_run_started_without_the_command_refuses_a_bad_source_in_one_line(
    prefect_api, tmp_path: Path
) -> None:
    """The command checks its source before the flow runs; a run started from a deployment or
    the UI went straight to the broker: a missing file ended in a traceback once its producer
    opened it, and a capacity sweep of a clip too slow for its steps in a ValueError's. Both
    now end Failed with the reason alone, before a broker is asked (none is there)."""
    nowhere = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    missing = tmp_path / "gone.mp4"
    slow = tmp_path / "two-fps.mp4"  # 2 results a stream in a 2-s step's 1 s after warm-up
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=d=3:s=64x48:r=2",
                    str(slow)], check=True, timeout=60)  # fmt: skip
    sweep = {"capacity": True, "step_seconds": 2.0, "output_dir": tmp_path}
    cases = [
        (StreamBenchmarkSettings(source=str(missing), kafka=nowhere), f"not found: {missing}"),
        (
            StreamBenchmarkSettings(source=str(slow), kafka=nowhere, **sweep),
            "--step-seconds 2 at 2 fps a stream leaves too few results",
        ),
    ]
    for settings, reason in cases:
        state = stream_benchmark(settings=settings, return_state=True)
        assert state.is_failed() and reason in state.message, state.message
        flow_errors = [
            log.message
            for log in _run_logs(state.state_details.flow_run_id)
            if log.level >= logging.ERROR
        ]
        assert flow_errors == [state.message], flow_errors  # the reason, once, no traceback


def test_an_artifact_prefect_refuses_costs_the_run_nothing_else(prefect_api) -> None:
    """The stream flows created their artifacts unguarded: one refused (a proxy's body limit
    in front of the API, the capacity report with its chart inline; here a key Prefect
    refuses) ended a sweep that had run for minutes in a traceback, its verdict never logged,
    its --summary-json never written, and the artifacts after it never recorded."""
    import functools

    from prefect import flow
    from prefect.artifacts import create_markdown_artifact

    from flows.run_artifacts import record_each

    @flow
    def publishing() -> str:
        record_each([
            functools.partial(create_markdown_artifact, key="Not A Key!", markdown="refused"),
            functools.partial(create_markdown_artifact, key="after-a-refused-one", markdown="x"),
        ])  # fmt: skip
        return "figures"

    state = publishing(return_state=True)
    assert state.is_completed() and state.result() == "figures"
    run_id = state.state_details.flow_run_id
    warned = [r.message for r in _run_logs(run_id) if r.level == logging.WARNING]
    assert any(m.startswith("artifact Not A Key! not recorded: ") for m in warned), warned
    with get_client(sync_client=True) as client:
        recorded = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    assert [a.key for a in recorded] == ["after-a-refused-one"]


def test_a_run_takes_a_log_level_it_does_not_know_as_none(monkeypatch) -> None:
    """A deployment's worker with VIDFLOW_LOG_LEVEL=trace (compose passes the user's on): the
    run's level was read through the settings, which refuse the name, and the run crashed in
    a traceback before its flow's own failure handling (found in review, stop 58)."""
    from flows.run_logs import _lower_level_for_the_run

    logger = logging.getLogger("tests.unknown-level")
    monkeypatch.setenv("VIDFLOW_LOG_LEVEL", "trace")
    _lower_level_for_the_run(logger)  # no error: left as it is
    assert logger.level == logging.NOTSET
    monkeypatch.setenv("VIDFLOW_LOG_LEVEL", "debug")
    _lower_level_for_the_run(logger)
    assert logger.level == logging.DEBUG
    logger.setLevel(logging.NOTSET)


def test_two_runs_in_one_process_share_one_log_handler_until_the_last_ends() -> None:
    """The second of two overlapping runs lost its producer's and consumers' lines in the UI
    when the first removed the handler they shared."""
    from prefect.logging.handlers import APILogHandler

    from flows.run_logs import logs_in_run

    logger = logging.getLogger("tasks.stream.test-run-logs")

    def handlers() -> int:
        return sum(isinstance(handler, APILogHandler) for handler in logger.handlers)

    with logs_in_run(logger.name):
        with logs_in_run(logger.name):
            assert handlers() == 1
        assert handlers() == 1  # the first run still sends
    assert handlers() == 0


def test_a_logger_whose_parent_prefect_sends_gets_no_second_handler() -> None:
    """PREFECT_LOGGING_EXTRA_LOGGERS=tasks puts Prefect's handler on `tasks`: one of ours on
    `tasks.stream` as well sent every line of the run to the API twice."""
    from prefect.logging.handlers import APILogHandler

    from flows.run_logs import logs_in_run

    parent = logging.getLogger("test-run-logs-parent")
    child = logging.getLogger("test-run-logs-parent.stream")
    prefect_s = APILogHandler()
    parent.addHandler(prefect_s)
    try:
        with logs_in_run(child.name):
            assert not any(isinstance(h, APILogHandler) for h in child.handlers)
        child.propagate = False  # its records stop there: then it needs one of its own
        with logs_in_run(child.name):
            assert sum(isinstance(h, APILogHandler) for h in child.handlers) == 1
    finally:
        parent.removeHandler(prefect_s)
        child.propagate = True


def test_a_run_logs_the_streams_info_lines_where_nothing_set_a_level(monkeypatch) -> None:
    """A deployment's flow run has the root logger at WARNING (Prefect's logging.yml): the
    producer's start and the consumers' progress lines were never made, so the UI showed none."""
    from flows.run_logs import logs_in_run

    monkeypatch.delenv("VIDFLOW_LOG_LEVEL", raising=False)
    root, logger = logging.getLogger(), logging.getLogger("tasks.stream.test-run-level")
    root_level = root.level
    root.setLevel(logging.WARNING)
    try:
        assert not logger.isEnabledFor(logging.INFO)
        with logs_in_run(logger.name):
            assert logger.isEnabledFor(logging.INFO) and not logger.isEnabledFor(logging.DEBUG)
        assert logger.level == logging.NOTSET  # as it was, after the run
        monkeypatch.setenv("VIDFLOW_LOG_LEVEL", "DEBUG")  # as the `vidflow` commands take it
        with logs_in_run(logger.name):
            assert logger.isEnabledFor(logging.DEBUG)
            logger.setLevel(logging.ERROR)  # someone's own choice during the run stays
        assert logger.level == logging.ERROR
        logger.setLevel(logging.NOTSET)
        monkeypatch.setenv("VIDFLOW_LOG_LEVEL", "WARNING")  # `--log-level WARNING`: kept
        with logs_in_run(logger.name):
            assert not logger.isEnabledFor(logging.INFO)
    finally:
        root.setLevel(root_level)


def test_a_run_whose_broker_settings_fail_shows_no_password_in_its_log(
    prefect_api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker with VIDFLOW_KAFKA_SASL_PASSWORD set and no SASL protocol (or a run breaking
    any broker check): pydantic put the whole input of the failed check, the password read
    from the environment with it, in its error, and Prefect logged it on every run."""
    from prefect.exceptions import ParameterTypeError

    monkeypatch.setenv("VIDFLOW_KAFKA_SASL_PASSWORD", "pa55-word")
    with pytest.raises(ParameterTypeError) as refused:
        stream_benchmark(settings={"kafka": {"bootstrap_servers": "127.0.0.1:9"}})
    said = caplog.text + str(refused.value)
    assert "VIDFLOW_KAFKA_SASL_PASSWORD given" in said  # the check did fail, and said why
    assert "pa55-word" not in said and "**********" in said
