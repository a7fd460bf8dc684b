"""The capacity mode of stream-benchmark: the verdict rules on made-up figures, and a short real
sweep under a real Prefect API with the real broker and service."""

from __future__ import annotations

import json
import math
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from confluent_kafka.admin import AdminClient
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from common.files import FolderNotWritableError
from common.frames import load_encoded_images
from common.net import free_port
from devstack.launcher import REPO_ROOT
from devstack.video_server import Camera, Drip, VideoServer
from flows.artifact_keys import CAPACITY_REPORT as REPORT_KEY
from flows.artifact_keys import CAPACITY_TABLE as TABLE_KEY
from flows.capacity_chart import capacity_chart
from flows.capacity_rules import (
    WARMUP_S,
    StepFigures,
    capacity,
    deciding_steps,
    holds,
    lag_series,
    next_streams,
    result_rate,
    shortfalls,
    step_figures,
    verdict_line,
)
from flows.stream_benchmark import check_stack, stream_benchmark
from flows.stream_capacity import source_format, step_kafka
from flows.stream_failures import NothingAnsweredError
from flows.stream_settings import StreamBenchmarkSettings
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import ServiceUnreachableError
from services.inference.settings import ClientSettings
from tasks.depth.transcode import ffmpeg_exe
from tasks.stream.frame_codec import FrameResult
from tasks.stream.producer import run_cameras
from tasks.stream.results import read_records
from tasks.stream.settings import KafkaSettings, ProducerSettings
from tasks.stream.topics import delete_topics
from tests.conftest import VIDEOS
from tests.kafka_helpers import (
    partition_ends,
    stream_benchmark_env,
    stream_benchmark_run,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(
    stream: str,
    index: int,
    capture_ns: int,
    result_ns: int,
    e2e_ms: float = 0.0,
    skipped: str | None = None,
) -> FrameResult:
    """A result record as the consumer publishes it, with the fields the figures read."""
    return FrameResult(
        stream_id=stream, frame_index=index, label="" if skipped else "cat",
        class_index=-1 if skipped else 0, score=0.0, model_name="m", capture_ts_ns=capture_ns,
        result_ts_ns=result_ns, inference_ms=0.0, rpc_ms=0.0, e2e_ms=e2e_ms, partition=0,
        offset=index, skipped=skipped,
    )  # fmt: skip


def _step(streams: int = 2, fps: tuple[float, ...] = (28.0, 27.9), p99: float = 40.0, stale=0):
    return StepFigures(
        streams=streams,
        source_fps=28.0,
        stream_fps={f"camera-{i}": v for i, v in enumerate(fps)},
        e2e_p50_ms=10.0,
        e2e_p99_ms=p99,
        classified=100,
        skipped_stale=stale,
    )


def test_a_step_holds_only_when_every_stream_keeps_up_within_budget_without_skips() -> None:
    assert holds(_step(), budget_ms=100)
    # 0.98 x 28 = 27.44: one stream just below fails the whole step
    assert not holds(_step(fps=(28.0, 27.4)), budget_ms=100)
    assert holds(_step(fps=(28.0, 27.45)), budget_ms=100)
    assert shortfalls(_step(p99=100.5), budget_ms=100) == ["e2e p99 100.5 ms > 100 ms"]
    assert holds(_step(p99=100.0), budget_ms=100)
    assert shortfalls(_step(stale=1), budget_ms=100) == ["1 frames skipped as stale"]
    assert len(shortfalls(_step(fps=(10.0, 28.0), p99=300, stale=5), budget_ms=100)) == 3
    assert not holds(_step(fps=()), budget_ms=100)  # no stream answered at all


def test_a_step_with_no_frame_classified_shows_no_latency_not_0_ms() -> None:
    """Every frame of a step skipped as stale: its verdict said "e2e p99 0.0 ms > 100 ms", and
    its table row, log line and chart point 0.0 ms, read as a measurement."""
    from flows.capacity_chart import capacity_chart
    from flows.stream_capacity import _step_line, sweep_rows

    none = replace(_step(stale=30, p99=0.0), classified=0, e2e_p50_ms=0.0)
    assert shortfalls(none, budget_ms=100) == ["no frame classified", "30 frames skipped as stale"]
    [row] = sweep_rows([none], budget_ms=100)
    assert row["e2e_p99_ms"] is None and row["e2e_p50_ms"] is None
    assert "0.0 ms" not in row["why_not"] and "none classified" in _step_line(none)
    p99_line = capacity_chart([none, _step(streams=3)], 100.0, "title").axes[1].lines[0]
    assert math.isnan(p99_line.get_ydata()[0]) and p99_line.get_ydata()[1] == 40.0  # a gap


def test_the_search_doubles_then_bisects_and_capacity_is_below_the_first_failure() -> None:
    outcomes: dict[int, bool] = {}
    tried = []
    truth = 5  # counts up to 5 hold
    while (n := next_streams(outcomes, max_streams=16)) is not None:
        tried.append(n)
        outcomes[n] = n <= truth
    assert tried == [1, 2, 4, 8, 6, 5]
    assert capacity(outcomes) == 5
    assert next_streams({1: True, 2: True}, max_streams=2) is None
    assert capacity({1: False}) == 0 and next_streams({1: False}, max_streams=8) is None
    # a noisy success above the first failure does not count
    assert capacity({1: True, 2: False, 4: True}) == 1


def test_step_figures_come_from_the_result_records() -> None:
    def record(stream: str, index: int, fps: float, e2e: float, skipped: str | None = None):
        capture = 1_000_000_000_000 + int(index / fps * 1e9)
        return _result(stream, index, capture, capture + int(e2e * 1e6), e2e, skipped)

    records = [record("camera-0", i, 28.0, 10 + i % 3) for i in range(56)]
    records += [record("camera-1", i, 14.0, 20.0) for i in range(28)]
    records += [record("camera-1", 0, 14.0, 20.0)]  # a redelivered duplicate
    records += [record("camera-1", 28, 14.0, 150.0, skipped="stale")]  # 2.0 s: the last capture
    step = step_figures(3, 28.0, records, ["camera-0", "camera-1", "camera-2"], 86, 4, 0.0)
    assert step.stream_fps["camera-0"] == pytest.approx(28.0, rel=0.01)
    # one of its 29 frames skipped as stale: not a result
    assert step.stream_fps["camera-1"] == pytest.approx(14.0 * 28 / 29, rel=0.02)
    assert step.stream_fps["camera-2"] == 0.0  # produced, never answered
    assert step.classified == 84 and step.skipped_stale == 1
    assert step.e2e_p99_ms <= 20.0  # the stale record's age is not a classified latency
    assert step.lag_at_end == 4  # all answered by the last capture; + the unanswered
    assert step.without_outcome == 1  # 86 produced, 85 answered
    late = [*records, record("camera-2", 10, 28.0, 5000.0)]  # 0.36 s, answered at 5.36 s
    assert step_figures(3, 28.0, late, ["camera-2"], 87, 0, 0.0).lag_at_end == 1
    # the first second is warm-up: a slow first frame is not judged, nor counted
    warm = step_figures(3, 28.0, late, ["camera-2"], 87, 0, warmup_s=1.0)
    assert warm.e2e_p99_ms <= 20.0 and warm.skipped_stale == 1 and warm.classified == 84 - 28 - 14
    # frames skipped as stale are not results: half the frames skipped, half the rate
    halved = [replace(r, skipped="stale") if r.frame_index % 2 else r for r in records[:56]]
    assert step_figures(1, 28.0, halved, ["camera-0"], 56, 0, 0.0).stream_fps == {
        "camera-0": pytest.approx(14.0, rel=0.02)
    }
    assert result_rate([0, 1], [0.0, 0.1]) == 0.0  # too few points to say
    # Judged unrounded (found in review, stop 62: 27.436 was rounded to 27.44 and held)
    paced = [record("camera", index, 28.0 * 0.9799, 10.0) for index in range(140)]
    just_under = step_figures(1, 28.0, paced, ["camera"], 140, 0, 0.0)
    assert just_under.as_dict()["stream_fps"] == {"camera": 27.44}
    assert shortfalls(just_under, budget_ms=100) == ["slowest stream 27.437 fps < 27.440"]


def test_a_step_whose_frames_went_without_a_result_does_not_hold() -> None:
    """Every other frame dead-lettered: the results that came keep the source's pace (the rate
    is the slope of result time against frame index), yet half the frames have no result."""
    records = [
        _result("camera", i, int(i / 28 * 1e9), int(i / 28 * 1e9) + 20_000_000, 20.0)
        for i in range(0, 280, 2)
    ]
    step = step_figures(1, 28.0, records, ["camera"], 280, 0, 0.0)
    assert step.stream_fps["camera"] == pytest.approx(28.0, rel=0.01)
    assert step.without_outcome == 140
    assert shortfalls(step, 100.0) == ["140 frames without a result (dead-lettered or lost)"]


def test_the_lag_series_grows_when_results_fall_behind_captures() -> None:
    second = 1_000_000_000
    # captured at 10 fps for 3 s, answered at 5 fps: 5 more frames behind every second
    records = [_result("camera", i, i * second // 10, i * second // 5 + 1) for i in range(31)]
    assert lag_series(records) == [0, 5, 10, 15]
    keeping_up = [_result("camera", i, i * second // 10, i * second // 10 + 1) for i in range(31)]
    assert lag_series(keeping_up) == [0, 0, 0, 0]


def test_the_verdict_line_names_count_size_and_rate() -> None:
    assert verdict_line(6, 340, 256, 28.0) == "6 streams of 340x256 at 28 fps on this machine"
    assert verdict_line(1, 640, 480, 29.97) == "1 stream of 640x480 at 29.97 fps on this machine"
    assert verdict_line(5, 340, 256, 28.0, most_tried=8).startswith("5 streams")
    stopped = verdict_line(2, 340, 256, 28.0, most_tried=8, unfinished=True)
    assert stopped.startswith("at least 2 streams") and "stopped before it ended" in stopped
    first = verdict_line(0, 340, 256, 28.0, most_tried=8, unfinished=True)  # "at least 0"
    assert first == (
        "no stream count of 340x256 at 28 fps measured: the sweep was stopped before its first "
        "stream count was decided"
    )
    # None held: why the one stream did not (it was a bare "0 streams", the reason in the log)
    none = verdict_line(0, 340, 256, 28.0, most_tried=8, one_failed=["e2e p99 116.1 ms > 100 ms"])
    assert none == ("0 streams of 340x256 at 28 fps on this machine (one stream did not hold "
                    "real time: e2e p99 116.1 ms > 100 ms)")  # fmt: skip
    ceiling = verdict_line(8, 340, 256, 28.0, most_tried=8)
    assert ceiling.startswith("at least 8 streams of 340x256") and "--max-streams" in ceiling
    # A sweep that a failed step ended (a lost broker or service) read as one stopped by Ctrl-C.
    failed = verdict_line(4, 340, 256, 28.0, most_tried=16, unfinished=True, failed_at=8)
    assert failed == ("at least 4 streams of 340x256 at 28 fps on this machine (the sweep failed "
                      "in its step of 8 streams before it ended)")  # fmt: skip
    failed_first = verdict_line(0, 340, 256, 28.0, most_tried=16, unfinished=True, failed_at=1)
    assert "the sweep failed in its step of 1 stream before its first" in failed_first


def _sweep(onnx_server, kafka, tmp_path: Path, **settings) -> StreamBenchmarkSettings:
    """A short capacity sweep against the test service and broker, writing under tmp_path."""
    defaults = {"max_streams": 2, "concurrency": 4, "step_tries": 2}
    return StreamBenchmarkSettings(
        capacity=True,
        output_dir=tmp_path,
        client=ClientSettings(target=onnx_server.target),
        kafka=kafka,
        **{**defaults, **settings},
    )


@pytest.mark.slow
def test_a_short_sweep_records_table_chart_and_verdict(
    prefect_api, kafka, onnx_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # For `vidflow consume` and `produce`: a sweep's parts ignore them (found in review: every
    # consumer stopped at 100 frames and the verdict read "0 streams").
    monkeypatch.setenv("VIDFLOW_CONSUMER_MAX_FRAMES", "20")
    monkeypatch.setenv("VIDFLOW_PRODUCER_MAX_FRAMES", "20")
    # The machine running the tests is shared and noisy, and speed is the benchmark's business:
    # a budget of 1 s checks the sweep's mechanics, not this machine's latency.
    settings = _sweep(
        onnx_server, kafka, tmp_path, max_frame_age_ms=1000.0, step_seconds=3.0,
        keep_step_topics=True,  # read back below
        step_tries=3,  # a busy CI machine's stall in one try does not fail a count
    )  # fmt: skip
    state = stream_benchmark(settings=settings, return_state=True)
    outcome = state.result()
    assert outcome["capacity"] >= 1 and outcome["budget_ms"] == 1000.0
    assert outcome["verdict"] == verdict_line(outcome["capacity"], 340, 256, 28.0, most_tried=2)
    steps = {step["streams"]: step for step in outcome["steps"]}  # each count's last try
    assert set(steps) <= {1, 2} and 1 in steps
    # the capacity is the one its counts' deciding (last) tries give, not a number of its own
    assert outcome["capacity"] == capacity({n: step["holds"] for n, step in steps.items()})
    # each step ran its own cameras on its own topics, read back in full
    for streams, step in steps.items():
        assert sorted(step["stream_fps"]) == sorted(
            c.stream_id for c in run_cameras(["camera"], streams, 1)[0]
        )
        [kept] = [
            t for t in outcome["topics"] if (t["streams"], t["try"]) == (streams, step["attempt"])
        ]
        records = read_records(kafka, kept["results"])
        keys = {r.key for r in records}
        assert len(keys) == step["frames_produced"] >= 3 * 28 * streams * 0.9
        start = min(r.capture_ts_ns for r in records) + WARMUP_S * 1e9  # warm-up not judged
        judged = {r.key for r in records if r.capture_ts_ns >= start}
        assert step["classified"] + step["skipped_stale"] == len(judged) > 0
    assert steps[1]["holds"] and steps[1]["fps_min"] >= 0.98 * 28

    png = Path(outcome["chart"]).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert Path(outcome["chart"]).parent == tmp_path

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[TABLE_KEY, REPORT_KEY]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    by_key = {a.key: a for a in artifacts}  # this run's: other tests' sweeps record them too
    assert len(by_key) == len(artifacts) == 2, artifacts
    table = by_key[TABLE_KEY].data
    rows = json.loads(table) if isinstance(table, str) else table
    # A row for every try, in order (the CI run of stop 58 found a count tried twice: the
    # table's [1, 1, 2], where this test wanted one row a count)
    assert [row["streams"] for row in rows] == [step["streams"] for step in outcome["steps"]]
    last_of_one = max(i for i, step in enumerate(outcome["steps"]) if step["streams"] == 1)
    deciding = rows[last_of_one]
    assert deciding["holds"] == "yes" and deciding["e2e_p99_ms"] == steps[1]["e2e_p99_ms"]
    report = by_key[REPORT_KEY].data
    assert outcome["verdict"] in report and outcome["chart"] in report
    assert "](data:image/png;base64," in report


@pytest.mark.slow
def test_ctrl_c_during_a_sweep_reports_the_steps_it_finished(
    prefect_api, kafka, onnx_server, tmp_path: Path
) -> None:
    """Ctrl-C crashed the flow run (exit 130) and the steps already measured were lost."""
    summary_json = tmp_path / "sweep.json"
    # Two tries a count: a step always follows the first, whether that held (2 streams next)
    # or not (1 stream again, as a busy CI machine may make it).
    command = stream_benchmark_run(
        kafka, onnx_server.target, "--capacity", "--step-seconds", "3", "--max-streams", "8",
        "--step-tries", "2", "--max-frame-age-ms", "1000", "--output-dir", str(tmp_path),
        "--summary-json", str(summary_json),
    )  # fmt: skip
    env = stream_benchmark_env()
    stdout = tmp_path / "stdout.txt"  # a file: a pipe no one reads could fill and block it
    with stdout.open("w") as out_file:
        run = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out_file,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    # The one reader of stderr (communicate() would take lines from it too, and drop them).
    reader = threading.Thread(target=lambda: [lines.put(line) for line in run.stderr], daemon=True)
    reader.start()
    try:
        said, judged = "", ""
        while "1 streams (try 1): " not in judged:  # the first step is judged: Ctrl-C in the next
            judged = lines.get(timeout=120)
            said += judged
        line = ""
        while "created topics" not in line:  # once the next step has begun (sent at once, the
            line = lines.get(timeout=120)  # Ctrl-C came before it on a loaded machine)
            said += line
        run.send_signal(signal.SIGINT)
        run.wait(timeout=60)
    finally:
        run.kill()
    reader.join(timeout=10)
    said += "".join(iter_queue(lines))
    out = stdout.read_text()
    assert run.returncode == 0, said[-3000:]
    first_held = judged.rstrip().endswith(": holds")
    cut = 2 if first_held else 1
    assert f"stopped during the step of {cut} streams: reporting the sweep so far" in said, said
    outcome = json.loads(summary_json.read_text())
    judged_steps = [(step["streams"], step["attempt"]) for step in outcome["steps"]]
    assert judged_steps == [(1, 1)]  # the cut step is not judged
    if first_held:
        assert outcome["verdict"].endswith("(the sweep was stopped before it ended)")
    else:
        assert outcome["verdict"].startswith("no stream count of ")
    assert outcome["verdict"] in out and Path(outcome["chart"]).is_file()


def iter_queue(lines: queue.Queue[str]) -> list[str]:
    items = []
    while not lines.empty():
        items.append(lines.get_nowait())
    return items


def test_the_cli_offers_capacity_mode_with_its_defaults() -> None:
    from vidflow.cli import build_parser, stream_benchmark_settings

    args = build_parser().parse_args(["stream-benchmark", "--capacity", "--max-streams", "4"])
    settings = stream_benchmark_settings(args)
    assert settings.capacity and settings.max_streams == 4 and settings.step_seconds == 10.0
    assert settings.max_frame_age_ms is None and settings.budget_ms == 100.0  # the flow's default
    single = stream_benchmark_settings(build_parser().parse_args(["stream-benchmark"]))
    assert not single.capacity and single == StreamBenchmarkSettings()
    both = build_parser().parse_args(["stream-benchmark", "--capacity", "--streams", "2"])
    with pytest.raises(ValueError, match="--streams does not apply to --capacity"):
        stream_benchmark_settings(both)


@pytest.mark.slow
def test_a_failing_count_is_tried_again_and_fails_only_if_every_try_does(
    prefect_api, kafka, onnx_server, tmp_path: Path
) -> None:
    # A 1 ms budget no frame can meet: every frame is skipped as stale, so each try fails.
    settings = _sweep(
        onnx_server, kafka, tmp_path, max_frame_age_ms=1.0, step_seconds=2.0, max_streams=1
    )
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
    topics_before = set(admin.list_topics(timeout=10).topics)
    outcome = stream_benchmark(settings=settings)
    assert outcome["capacity"] == 0
    tries = [(step["streams"], step["attempt"], step["holds"]) for step in outcome["steps"]]
    assert tries == [(1, 1, False), (1, 2, False)]
    assert all(step["skipped_stale"] > 0 for step in outcome["steps"])
    verdict = outcome["verdict"]  # and why, where the CLI prints only this line
    assert verdict.startswith(
        "0 streams of 340x256 at 28 fps on this machine (one stream did not hold real time: "
    )
    assert "frames skipped as stale" in verdict
    # Each step's topics are deleted once read: on the local broker, which keeps every
    # message in memory, a sweep left every frame it sent behind.
    assert outcome["topics"] == []
    left = set(admin.list_topics(timeout=10).topics) - topics_before
    assert not {t for t in left if "-cap1-" in t}, left


def test_the_chart_s_title_fits_its_width_however_long_the_verdict() -> None:
    """The longest verdicts ran off both edges of the chart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    verdict = verdict_line(16, 1920, 1080, 29.97, most_tried=16)
    assert len(verdict) > 100
    figure = capacity_chart([_step(streams=1), _step(streams=2)], 100.0, verdict)
    FigureCanvasAgg(figure).draw()
    title = figure.get_suptitle()
    extent = figure._suptitle.get_window_extent()
    assert title.replace("\n", " ") == verdict
    assert extent.x0 >= 0 and extent.x1 <= figure.bbox.width, (extent, figure.bbox)


def test_a_step_s_partitions_are_a_multiple_of_its_consumers() -> None:
    """Members take partitions in turn: 2 cameras on partitions 3 and 0 of 4 both went to
    member 0 of 3."""
    base = KafkaSettings(partitions=4)
    counts = {
        (s, c): step_kafka(base, s, c).partitions for s, c in [(2, 1), (3, 3), (5, 2), (8, 4)]
    }
    assert counts == {(2, 1): 4, (3, 3): 6, (5, 2): 6, (8, 4): 8}


def test_a_step_that_never_made_its_topics_lists_none_and_an_uncounted_dlq_is_kept(
    prefect_api, kafka
) -> None:
    """A step that failed making its topics (a replication factor the cluster cannot give)
    listed all three as left on the broker, none of which was there (found in review, stop
    58); a dead-letter topic that is there, its letters uncounted, is kept and listed."""
    from prefect import flow

    from flows.stream_capacity import kept_topics
    from tasks.stream.topics import ensure_topics

    sweep = StreamBenchmarkSettings(kafka=kafka, capacity=True)
    never_made, made = step_kafka(kafka, 1), step_kafka(kafka, 1)
    ensure_topics(made, [made.frames_topic, made.dlq_topic])

    @flow
    def ended_steps() -> tuple[dict[str, str], dict[str, str]]:
        return kept_topics(sweep, never_made, None), kept_topics(sweep, made, None)

    nothing, uncounted = ended_steps()
    assert nothing == {} and uncounted == {"dlq": made.dlq_topic}
    delete_topics(kafka, [made.dlq_topic])


def test_a_sweep_whose_report_the_api_refuses_still_records_its_table(
    prefect_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The capacity report carries its chart inline: a proxy's body limit in front of the API
    refused it, and the sweep (minutes of steps) ended in a traceback, its verdict and
    --summary-json lost (found in review, stop 58). The refusal is made here (no such proxy);
    the table's recording is real."""
    from prefect import flow

    from flows import stream_capacity

    def refused(**_kwargs: object) -> None:
        raise RuntimeError("413 Request Entity Too Large")

    monkeypatch.setattr(stream_capacity, "create_markdown_artifact", refused)
    sweep = StreamBenchmarkSettings(capacity=True, output_dir=tmp_path)

    @flow
    def publishing() -> Path | None:
        return stream_capacity.publish_sweep(sweep, [_step(streams=1)], "1 stream of ...")

    state = publishing(return_state=True)
    assert state.is_completed() and state.result() is not None  # the chart file, written
    with get_client(sync_client=True) as client:
        recorded = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    assert [a.key for a in recorded] == [TABLE_KEY]


def test_the_chart_and_verdict_rest_on_each_count_s_last_try() -> None:
    first, second, other = _step(streams=2, p99=300.0), _step(streams=2), _step(streams=1)
    second.attempt = 2
    assert deciding_steps([other, first, second]) == [other, second]


class _EmptyAnswers(inference_pb2_grpc.ClassifierServicer):
    def Classify(self, request, context):  # the generated method's name
        return inference_pb2.ClassifyResponse(request_id=request.request_id)


@pytest.fixture
def classify_less_service(request: pytest.FixtureRequest) -> Iterator[str]:
    """A real gRPC server on 127.0.0.1 that answers health checks with the status the test
    names and no Classify (every call ends UNIMPLEMENTED): a service that is there but wrong.
    "NONE": no health service either (a proxy in front of a service answers so). "EMPTY":
    serving, each Classify answered OK with no prediction (a service of another make)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    if request.param == "EMPTY":
        inference_pb2_grpc.add_ClassifierServicer_to_server(_EmptyAnswers(), server)
    if request.param != "NONE":
        health_servicer = health.HealthServicer()
        health_servicer.set(
            "", getattr(health_pb2.HealthCheckResponse, request.param.replace("EMPTY", "SERVING"))
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.slow
@pytest.mark.parametrize("classify_less_service", ["SERVING"], indirect=True)
def test_a_sweep_whose_frames_the_service_never_classifies_fails_instead_of_finding_0(
    prefect_api, kafka, classify_less_service: str, tmp_path: Path
) -> None:
    """Every step failed, and the sweep ended Completed with "0 streams ... on this machine":
    a verdict on the machine where the service answered nothing (gone mid-sweep, or wrong)."""
    settings = StreamBenchmarkSettings(
        capacity=True, output_dir=tmp_path, client=ClientSettings(target=classify_less_service),
        kafka=kafka, step_seconds=2.0, max_streams=2,
    )  # fmt: skip
    state = stream_benchmark(settings=settings, return_state=True)
    assert state.is_failed()
    with pytest.raises(NothingAnsweredError, match=r"classified none of the \d+ frames") as failed:
        state.result()
    assert failed.value.outcome["steps"] == [] and failed.value.outcome["capacity"] == 0
    assert "the sweep failed in its step of 1 stream" in failed.value.outcome["verdict"]
    # Its failed steps left no topic behind: the dead-letter topic holds no letter either.
    topics = AdminClient({"bootstrap.servers": kafka.bootstrap_servers}).list_topics(timeout=10)
    steps = tuple(f"{name}-" for name in (kafka.frames_topic, kafka.results_topic, kafka.dlq_topic))
    left = [t for t in topics.topics if t.startswith(steps)]
    assert left == [], left
    # Kept on purpose (--keep-step-topics), the failed step's topics are listed with the sweep's
    # (found in review, stop 58: a failed step's were left on the broker and listed nowhere).
    kept = settings.model_copy(update={"keep_step_topics": True})
    with pytest.raises(NothingAnsweredError) as failed:
        stream_benchmark(settings=kept, return_state=True).result()
    [listed] = failed.value.outcome["topics"]
    assert (listed["streams"], listed["try"]) == (1, 1), listed
    assert {listed["frames"], listed["results"], listed["dlq"]} <= set(
        AdminClient({"bootstrap.servers": kafka.bootstrap_servers}).list_topics(timeout=10).topics
    )
    delete_topics(kafka, [listed["frames"], listed["results"], listed["dlq"]])


@pytest.mark.slow
@pytest.mark.parametrize("classify_less_service", ["EMPTY"], indirect=True)
def test_a_sweep_whose_every_answer_is_empty_fails_instead_of_finding_0(
    prefect_api, kafka, classify_less_service: str, tmp_path: Path
) -> None:
    """Found in review, stop 62: every frame dead-lettered for an answer without a prediction,
    no call failed, and the sweep ended Completed with "0 streams ... on this machine"."""
    settings = StreamBenchmarkSettings(
        capacity=True, output_dir=tmp_path, client=ClientSettings(target=classify_less_service),
        kafka=kafka, step_seconds=2.0, max_streams=2,
    )  # fmt: skip
    with pytest.raises(
        NothingAnsweredError, match=r"0 failed calls, [1-9]\d* dead-lettered"
    ) as failed:
        stream_benchmark(settings=settings, return_state=True).result()
    assert failed.value.outcome["steps"] == [] and failed.value.outcome["capacity"] == 0


@pytest.mark.parametrize("classify_less_service", ["NOT_SERVING"], indirect=True)
def test_a_sweep_waits_for_a_loading_service_to_serve_and_fails_if_it_never_does(
    kafka, classify_less_service: str
) -> None:
    """A service still loading its model (NOT_SERVING) counted as there: the sweep's first
    steps measured the loading, and its verdict was 0 streams."""
    settings = StreamBenchmarkSettings(
        capacity=True, client=ClientSettings(target=classify_less_service), kafka=kafka,
        load_wait_s=1.0,
    )  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ServiceUnreachableError, match="not SERVING after 1 s"):
        check_stack(settings)
    assert time.monotonic() - started >= 1.0  # waited for it
    one_run = settings.model_copy(update={"capacity": False})
    check_stack(one_run)  # one run counts a loading service as there: its calls wait for it


def test_a_sweep_whose_chart_folder_cannot_be_written_fails_before_its_first_step(
    prefect_api, kafka, tmp_path: Path
) -> None:
    """The whole sweep ran, then its chart's OSError lost the table, the report and the verdict
    (and replaced a step's own failure)."""
    taken = tmp_path / "a-file"
    taken.write_text("")
    settings = StreamBenchmarkSettings(
        capacity=True, output_dir=taken / "charts", kafka=kafka,
        client=ClientSettings(target=f"127.0.0.1:{free_port()}"),  # not reached: refused first
    )  # fmt: skip
    with pytest.raises(FolderNotWritableError, match="cannot write to the output folder"):
        check_stack(settings)
    state = stream_benchmark(settings=settings, return_state=True)
    assert state.is_failed() and "cannot write to the output folder" in state.message


@pytest.mark.parametrize("classify_less_service", ["NONE"], indirect=True)
def test_a_sweep_takes_a_target_without_a_health_service_as_it_is(
    kafka, classify_less_service: str
) -> None:
    """It waited `load_wait_s` (600 s by default) for SERVING from a target that has no health
    service (UNIMPLEMENTED), then failed, where one run and `loadtest` take it as it is."""
    settings = StreamBenchmarkSettings(
        capacity=True, client=ClientSettings(target=classify_less_service), kafka=kafka,
        load_wait_s=30.0,
    )  # fmt: skip
    started = time.monotonic()
    check_stack(settings)
    assert time.monotonic() - started < 10


def test_an_ip_camera_s_http_stream_is_refused_for_a_sweep_as_rtsp_is() -> None:
    """An http(s) source with no end is read live (an IP camera's MJPEG): a sweep judged each
    step against the rate such a camera only reports (found in review, stop 59)."""
    frames = tuple(load_encoded_images(VIDEOS / "k400_arm_wrestling.mp4", max_frames=30))
    with (
        VideoServer({"video.mjpg": Camera(frames, 28.0)}) as camera,
        pytest.raises(ValueError, match="a live source runs at its own rate"),
    ):
        source_format(camera.url("video.mjpg"), "native")


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({"capacity": True, "duration": 60}, "--duration does not apply to --capacity"),
        # Flow parameters that are no flags: named as parameters (no command takes --group).
        ({"capacity": True, "group": "g"}, "error, group does not apply to --capacity"),
        ({"capacity": True, "max_frames": 60}, "error, max_frames does not apply to --capacity"),
        ({"step_seconds": 5, "max_streams": 4}, "--step-seconds, --max-streams does not apply"),
        ({"capacity": True, "step_seconds": 1.0}, "greater than or equal to 2"),
        ({"capacity": True, "source": "rtsp://10.0.0.5/live"}, "a live source runs at its own"),
        # One thread each beside the producer's: more left it waiting for them to end.
        ({"consumers": 16}, "less than or equal to 15"),
    ],
)
def test_a_knob_the_mode_would_ignore_is_refused(settings: dict, refused: str) -> None:
    """`--capacity --duration 60` ran 10-s steps and said nothing; a 1-s step judged no frame
    (its first second is warm-up) and found 0 streams on any machine."""
    with pytest.raises(ValueError, match=re.escape(refused)):
        StreamBenchmarkSettings(**settings)
    # the defaults, as the CLI and deployments pass them, are not refused
    StreamBenchmarkSettings(capacity=True, duration=30.0, keep_step_topics=False)
    StreamBenchmarkSettings(step_seconds=10.0, keep_step_topics=False)
    assert stream_benchmark.task_runner._max_workers >= 15 + 1  # 15 consumers and the producer


def test_the_producer_runs_its_length_from_its_first_frame_not_from_its_start(
    kafka, tmp_path: Path
) -> None:
    """Found in review, stop 62: the run's length was timed from before the producer opened its
    source and started its broker client, and a slow open came out of a short capacity step."""
    from tasks.stream.prefect_tasks import run_producer

    # A source whose opening takes 2 s: the clip (its index first) served with a pause
    clip = tmp_path / "clip.mp4"
    copy = ["-c", "copy", "-movflags", "+faststart", str(clip)]
    source = ["-loglevel", "error", "-i", str(VIDEOS / "k400_arm_wrestling.mp4")]
    subprocess.run([ffmpeg_exe(), *source, *copy], check=True)
    ready = threading.Event()
    ready.set()
    with VideoServer({"late.mp4": Drip(clip, chunk=64, every_s=2.0, drip_bytes=64)}) as server:
        settings = ProducerSettings(source=server.url("late.mp4"), fps="10")
        started = time.monotonic()
        stats = run_producer.fn(kafka, settings, 1.5, [ready])
    assert time.monotonic() - started >= 2.0 + 1.4
    assert stats.duration_s == pytest.approx(1.5, abs=0.3)
    assert 12 <= stats.frames_read <= 17  # 1.5 s at 10 frames/s


def test_the_producer_stops_as_soon_as_a_consumer_fails(kafka) -> None:
    """It went on for the run's whole length, its frames for nobody."""
    from tasks.stream.prefect_tasks import run_producer

    failed, produced = threading.Event(), {}
    # 5 frames a second: 300 for the run's 60 s; its first deliveries are seen within seconds
    settings = ProducerSettings(source=str(VIDEOS / "k400_arm_wrestling.mp4"), loop=True, fps="5")
    ready = threading.Event()
    ready.set()
    producing = threading.Thread(
        target=lambda: produced.update(
            stats=run_producer.fn(kafka, settings, 60.0, [ready], failed)
        )
    )
    producing.start()
    deadline = time.monotonic() + 30
    while not sum(partition_ends(kafka.bootstrap_servers, kafka.frames_topic, 2)):  # under way
        assert time.monotonic() < deadline
        time.sleep(0.1)
    failed.set()
    producing.join(10)
    assert not producing.is_alive()
    assert 0 < produced["stats"].frames_read < 60  # 12 s of the run's 60
    # A member that failed before it joined is waited for no more (60 s, then frames for none).
    never_joined, started = threading.Event(), time.monotonic()
    stats = run_producer.fn(kafka, settings, 60.0, [never_joined], failed)
    assert time.monotonic() - started < 10 and stats.frames_read == 0
