"""The stream under faults: a poison frame, a service that is down, a broker that dies, kills.

The broker is the real local Tansu; the service is a real gRPC server on 127.0.0.1 that
implements the Classifier service of protos/ and answers what the test tells it to for a frame
(the real service has no input that fails for good once its own fixes are in).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from common.net import free_port
from devstack.broker import LocalBroker, start_broker
from devstack.launcher import REPO_ROOT, start_server
from flows.stream_benchmark import BrokerLostDuringRunError, stream_benchmark
from flows.stream_settings import StreamBenchmarkSettings
from protos import inference_pb2, inference_pb2_grpc
from services.inference.settings import ClientSettings
from tasks.stream.consumer import FrameConsumer
from tasks.stream.consumer_summary import ConsumerSummary, format_summary, merge_summaries
from tasks.stream.frame_codec import (
    HEADER_DLQ_ATTEMPTS,
    HEADER_DLQ_REASON,
    HEADER_DLQ_STATUS,
    HEADER_DLQ_VALUE_DROPPED,
    Frame,
    encode_frame_headers,
    frame_key,
)
from tasks.stream.inference_caller import EMPTY_ANSWER, FRAME_TOO_LARGE, counts_against_frame
from tasks.stream.input_end import InputEnd
from tasks.stream.kafka_io import Membership, close_within, consumer_config, leave_group
from tasks.stream.results import read_records
from tasks.stream.settings import ConsumerSettings, KafkaSettings
from tests.conftest import VIDEOS, fresh_topics
from tests.kafka_helpers import (
    committed_total,
    partition_ends,
    read_topic,
    result_keys,
    run_members,
)
from tests.proc_helpers import children, is_running, listening_addresses

CLIP = VIDEOS / "k400_arm_wrestling.mp4"

# What the test server does with one request: None classifies it, a status code fails it,
# EMPTY answers OK with no prediction.
EMPTY = "empty"
Behaviour = Callable[[inference_pb2.ClassifyRequest, int], grpc.StatusCode | str | None]


class ScriptedClassifier(inference_pb2_grpc.ClassifierServicer):
    """A Classifier that fails the requests `behaviour` names and classifies the rest."""

    def __init__(self, behaviour: Behaviour, delay_s: float = 0.0) -> None:
        self.behaviour, self.delay_s = behaviour, delay_s
        self.label = "scripted"  # what it answers of every frame it classifies
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def Classify(self, request, context):  # the generated method's name
        with self._lock:
            self.calls[request.request_id] += 1
            attempt = self.calls[request.request_id]
        time.sleep(self.delay_s)
        code = self.behaviour(request, attempt)
        if code == EMPTY:
            return inference_pb2.ClassifyResponse(request_id=request.request_id)
        if code is not None:
            context.abort(code, f"scripted {code.name} for {request.request_id}")
        return inference_pb2.ClassifyResponse(
            request_id=request.request_id,
            predictions=[inference_pb2.Prediction(label=self.label, class_index=1, score=0.5)],
            model_name="scripted",
            timings=inference_pb2.Timings(inference_ms=1.0, batch_size=1),
        )


@pytest.fixture
def scripted_service() -> Iterator[Callable[..., tuple[str, ScriptedClassifier]]]:
    """Start real gRPC servers on 127.0.0.1 with a scripted Classifier; stop them after."""
    servers: list[grpc.Server] = []

    def start(behaviour: Behaviour, delay_s: float = 0.0) -> tuple[str, ScriptedClassifier]:
        servicer = ScriptedClassifier(behaviour, delay_s)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        inference_pb2_grpc.add_ClassifierServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for server in servers:
        server.stop(0)


def _publish_frames(kafka: KafkaSettings, stream_id: str, count: int, jpeg: bytes) -> list[str]:
    """Publish `count` frames of one stream (one key, so one partition, in order)."""
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    for index in range(count):
        frame = Frame(stream_id, index, time.time_ns(), time.time_ns(), jpeg)
        producer.produce(
            kafka.frames_topic,
            key=stream_id.encode(),
            value=frame.jpeg,
            headers=encode_frame_headers(frame),
        )
    assert producer.flush(10) == 0
    return [frame_key(stream_id, index) for index in range(count)]


def _consumer(kafka: KafkaSettings, target: str, **settings) -> FrameConsumer:
    defaults = {
        "group": f"group-{uuid.uuid4().hex[:6]}",
        "idle_timeout": 4.0,
        "duration": 90.0,
        "retry_max_backoff_s": 0.5,
    }
    return FrameConsumer(kafka, ConsumerSettings(**{**defaults, **settings}), target)


@pytest.mark.faults
def test_a_poison_frame_is_dead_lettered_after_max_attempts_and_the_group_moves_on(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    poison = frame_key("cam-p", 5)
    target, service = scripted_service(
        lambda request, _attempt: grpc.StatusCode.INTERNAL if request.request_id == poison else None
    )
    keys = _publish_frames(kafka, "cam-p", 36, video_frames[0])
    group = f"group-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    summary = _consumer(kafka, target, group=group, max_attempts=3).run()
    elapsed = time.monotonic() - started

    assert service.calls[poison] == 3  # tried exactly --max-attempts times, then given up
    assert summary.dlq == 1 and summary.results_published == len(keys) - 1
    dead = read_topic(kafka.bootstrap_servers, kafka.dlq_topic, expected=1)
    assert len(dead) == 1
    headers = dict(dead[0].headers())
    reason = headers[HEADER_DLQ_REASON].decode()
    assert "INTERNAL" in reason and f"scripted INTERNAL for {poison}" in reason
    assert "attempts: 3" in reason
    assert headers[HEADER_DLQ_STATUS] == b"INTERNAL" and headers[HEADER_DLQ_ATTEMPTS] == b"3"
    assert dead[0].value() == video_frames[0]

    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=len(keys) - 1)
    assert Counter(result_keys(results)) == Counter(k for k in keys if k != poison)
    # The commit point passed the poison frame: the group does not redo the 30 frames after it.
    committed = committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2)
    assert committed == len(keys)
    assert elapsed < 40  # the idle timeout (4 s) plus a group join, not a retry loop


@pytest.mark.faults
def test_an_answer_without_predictions_is_dead_lettered_and_the_group_moves_on(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """A service that answers OK with no prediction (of another make, or broken) raised
    IndexError out of the consumer's loop: no summary, and the same frame on every restart."""
    empty = frame_key("cam-e", 3)
    target, service = scripted_service(
        lambda request, _attempt: EMPTY if request.request_id == empty else None
    )
    keys = _publish_frames(kafka, "cam-e", 12, video_frames[0])
    group = f"group-{uuid.uuid4().hex[:6]}"
    summary = _consumer(kafka, target, group=group).run()
    assert service.calls[empty] == 1 and summary.dlq == 1
    assert summary.results_published == len(keys) - 1
    [dead] = read_topic(kafka.bootstrap_servers, kafka.dlq_topic, expected=1)
    headers = dict(dead.headers())
    assert headers[HEADER_DLQ_STATUS] == EMPTY_ANSWER
    assert "no predictions" in headers[HEADER_DLQ_REASON].decode()
    assert committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) == len(keys)


def test_the_round_trip_ends_when_the_call_does_not_when_the_loop_gets_to_it(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """A stall of the consumer's loop (a rebalance's flush, a slow broker) was charged to the
    service's round trip: `rpc_ms` was taken as the loop came to the answer. Here every pass
    of the loop stalls 0.3 s, against a service that answers at once."""
    target, _service = scripted_service(lambda _request, _attempt: None)
    keys = _publish_frames(kafka, "cam-t", 8, video_frames[0])
    member = _consumer(kafka, target, concurrency=8)
    drain = member.caller.drain

    def stalled_drain(timeout_s: float) -> None:
        time.sleep(0.3)
        drain(timeout_s)

    member.caller.drain = stalled_drain
    summary = member.run()
    assert summary.results_published == len(keys)
    records = read_records(kafka, kafka.results_topic)
    assert len(records) == len(keys)
    assert max(r.e2e_ms for r in records) >= 300  # the stall is there, end to end
    assert sorted(r.rpc_ms for r in records)[len(records) // 2] < 150, records


def test_the_progress_line_and_gauge_show_the_lag_falling_as_a_backlog_is_worked_off(
    kafka, scripted_service, video_frames: list[bytes], monkeypatch, caplog
) -> None:
    """The lag the loop shows comes from the ends its fetches saw (asking the broker cost a
    round trip per partition on the loop's thread): it must still be the backlog."""
    from tasks.stream import consumer as consumer_module

    monkeypatch.setattr(consumer_module, "PROGRESS_EVERY_S", 0.3)
    target, _service = scripted_service(lambda _request, _attempt: None, delay_s=0.05)
    keys = _publish_frames(kafka, "cam-l", 40, video_frames[0])
    member = _consumer(kafka, target, concurrency=1)
    gauges: list[float] = []
    log_progress = consumer_module._log_progress

    def seen(member_: FrameConsumer, elapsed_s: float) -> None:
        log_progress(member_, elapsed_s)
        gauges.append(member_.metrics.lag._value.get())

    monkeypatch.setattr(consumer_module, "_log_progress", seen)
    asked_cached: list[bool] = []  # how each lag was had: from the fetches, or asked
    lag = member.publisher.lag

    def lag_seen(cached: bool = False) -> int:
        asked_cached.append(cached)
        return lag(cached=cached)

    member.publisher.lag = lag_seen
    with caplog.at_level("INFO", logger="tasks.stream.consumer"):
        summary = member.run()
    assert summary.results_published == len(keys) and summary.lag == 0
    # The loop's lines read the fetches' ends; only the final summary asks the broker.
    assert asked_cached[:-1] == [True] * len(gauges) and asked_cached[-1] is False, asked_cached
    said = [int(m) for m in re.findall(r"lag (\d+)$", caplog.text, re.MULTILINE)]
    assert said == gauges[: len(said)] and len(said) >= 3, (said, gauges)
    working = [lag for lag in said if lag > 0]
    assert working and max(working) <= len(keys) and working == sorted(working, reverse=True)


def test_a_member_that_stops_with_a_retry_due_sends_it_before_it_commits(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """A frame waiting out its backoff as the member stopped (--max-frames, a Ctrl-C) was left
    unsent: its partition's commit point stayed behind it, and every answered frame after it
    was classified again by the next member."""
    hiccup = frame_key("cam-s", 5)
    target, service = scripted_service(
        lambda request, attempt: (
            grpc.StatusCode.INTERNAL if request.request_id == hiccup and attempt == 1 else None
        ),
        delay_s=0.05,
    )
    keys = _publish_frames(kafka, "cam-s", 12, video_frames[0])
    group = f"group-{uuid.uuid4().hex[:6]}"
    summary = _consumer(kafka, target, group=group, concurrency=8, max_frames=12).run()
    assert service.calls[hiccup] == 2 and summary.retries == 1
    assert summary.results_published == len(keys) and summary.unanswered == 0
    assert committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) == len(keys)


def test_frames_only_handed_over_are_no_answer_and_the_report_counts_them() -> None:
    """With `handed_over` taken out of `unanswered`, a run whose service answered nothing,
    its waiting frames handed over in the rebalance as the first member left, read as
    answered: it ended Completed at 0 fps instead of failing."""
    from tasks.stream.consumer_summary import format_summary, nothing_answered

    summary = ConsumerSummary(frames_consumed=10, handed_over=10, errors=30)
    assert summary.unanswered == 0 and nothing_answered(summary.as_dict())
    assert "handed over 10" in format_summary(summary.as_dict())
    answered = ConsumerSummary(frames_consumed=10, handed_over=9, dlq=1)
    assert not nothing_answered(answered.as_dict())


def test_a_run_that_classified_nothing_or_stalled_fails_with_its_figures() -> None:
    """A run whose every frame went to the dead-letter topic (frames over the service's pixel
    or size limit, a broken model) counted as answered and ended Completed at 0.0 frames/s;
    one whose service stopped answering mid-run ended Completed with figures over the frames
    before, a healthy-looking fps. Both now fail, carrying the figures, and the report says
    the second's cover the run until the service stopped."""
    from flows.stream_benchmark import _raise_if_failed, markdown_report
    from flows.stream_failures import GroupStalledError, NothingAnsweredError

    settings = StreamBenchmarkSettings()
    produced = {"delivered": 30, "failed": 0, "frames_read": 30, "frames_decoded": 30, "fps": 28.0}
    dead = ConsumerSummary(frames_consumed=30, dlq=30, errors=90).as_dict()
    with pytest.raises(NothingAnsweredError, match="none of the 30 frames consumed was classified"
                       ) as failed:  # fmt: skip
        _raise_if_failed({"summary": dead, "producer": produced}, settings)
    assert "30 went to the dead-letter topic" in str(failed.value)
    assert failed.value.outcome["summary"]["dlq"] == 30
    stalled = ConsumerSummary(frames_consumed=20, results_published=12, stalled=True)
    report = {"summary": stalled.as_dict(), "producer": produced}
    with pytest.raises(GroupStalledError, match="answered 12 of the 30 frames the producer"):
        _raise_if_failed(report, settings)
    shown = markdown_report(stalled.as_dict(), {**produced, "broker_error": None}, {})
    assert "THE SERVICE STOPPED ANSWERING" in shown
    # A named group (no drain: a deadline ends it) whose service died mid-run ended Completed
    # with the fps of the frames before (found in review, stop 60).
    cut = ConsumerSummary(frames_consumed=30, results_published=20).as_dict()
    with pytest.raises(GroupStalledError, match="deadline with 10 consumed frame"):
        _raise_if_failed({"summary": cut, "producer": produced}, settings)
    healthy = ConsumerSummary(frames_consumed=30, results_published=29, dlq=1).as_dict()
    _raise_if_failed({"summary": healthy, "producer": produced}, settings)  # no failure


def test_a_run_whose_source_or_results_failed_or_that_read_nothing_fails_with_its_figures() -> None:
    """A lost camera, a consumer stopped by a results topic that refused its records, and a
    source that gave no frame at all (a run started from a deployment skipped the command's
    source check): each must fail the run, not end Completed with figures that read as a
    healthy run's (the last read "0.0 frames/s" on a Completed run)."""
    from flows.stream_benchmark import _raise_if_failed
    from flows.stream_failures import (
        FramesUndeliveredError,
        NothingConsumedError,
        NothingReadError,
        ResultsUndeliveredError,
        SourceLostError,
    )

    settings = StreamBenchmarkSettings(source="webcam:0")
    produced = {"delivered": 30, "failed": 0, "frames_read": 30, "frames_decoded": 30, "fps": 28.0}
    healthy = ConsumerSummary(frames_consumed=30, results_published=30).as_dict()
    lost = {**produced, "source_error": "webcam:0 gave no frame for 5 s"}
    with pytest.raises(SourceLostError, match="webcam:0 gave no frame for 5 s; the report"):
        _raise_if_failed({"summary": healthy, "producer": lost}, settings)
    refused = {**healthy, "delivery_error": "predictions: MSG_SIZE_TOO_LARGE"}
    with pytest.raises(ResultsUndeliveredError, match="a consumer stopped: predictions: MSG_SIZE"):
        _raise_if_failed({"summary": refused, "producer": produced}, settings)
    nothing = {"delivered": 0, "failed": 0, "frames_read": 0, "frames_decoded": 0, "fps": 0.0}
    empty = ConsumerSummary().as_dict()
    with pytest.raises(NothingReadError, match="read no frame from webcam:0") as failed:
        _raise_if_failed({"summary": empty, "producer": nothing}, settings)
    assert failed.value.outcome["producer"]["frames_read"] == 0
    # Frames read and refused by the producer's own client (over the size limit): none
    # published, and the broker's failure, not the source's (found in review, stop 58).
    refused_at_once = {**nothing, "frames_decoded": 30, "failed": 30}
    with pytest.raises(FramesUndeliveredError, match="took none of the producer's frames"):
        _raise_if_failed({"summary": empty, "producer": refused_at_once}, settings)
    # Frames delivered and none read: the group's members never got the partitions (a group
    # coordinator the broker could not give); the run ended Completed at "0.0 frames/s".
    with pytest.raises(NothingConsumedError, match="took 30 frames, and the consumer group read"):
        _raise_if_failed({"summary": empty, "producer": produced}, settings)
    from tasks.stream.prefect_tasks import RUN_STOP

    RUN_STOP.set()  # a Ctrl-C before the group read anything: stopped, not failed
    try:
        _raise_if_failed({"summary": empty, "producer": produced}, settings)
    finally:
        RUN_STOP.clear()
    _raise_if_failed({"summary": healthy, "producer": produced}, settings)  # no failure


def _second_member_joins(
    first: FrameConsumer,
    at_revoke: Callable[[], int],
    ready: Callable[[], bool],
    kafka: KafkaSettings,
    target: str,
) -> tuple[ConsumerSummary, list[int]]:
    """`first` runs on a thread; once `ready()`, a second member of its group joins and runs
    to its end: their merged summary, and `at_revoke()` as each of `first`'s revokes came
    (to show the fault was made)."""
    measured: list[int] = []
    hand_over = first.assignment.before_revoke

    def recorded_hand_over() -> None:
        measured.append(at_revoke())
        hand_over()

    first.assignment.before_revoke = recorded_hand_over
    summaries: dict[str, ConsumerSummary] = {}
    running = threading.Thread(target=lambda: summaries.setdefault("first", first.run()))
    running.start()
    deadline = time.monotonic() + 60
    while not ready():
        assert time.monotonic() < deadline and running.is_alive()
        time.sleep(0.05)
    summaries["second"] = _consumer(
        kafka, target, group=first.settings.group, concurrency=8, idle_timeout=8.0
    ).run()
    running.join(90)
    assert not running.is_alive()
    return merge_summaries(list(summaries.values())), measured


def _assert_one_result_each(kafka: KafkaSettings, keys: list[str]) -> None:
    """Every frame of `keys` has exactly one result on the results topic."""
    copies = Counter(result_keys(read_topic(kafka.bootstrap_servers, kafka.results_topic,
                                            expected=len(keys))))  # fmt: skip
    assert set(copies) == set(keys) and set(copies.values()) == {1}, copies


@pytest.mark.faults
def test_a_member_joining_mid_run_gets_no_frame_twice_and_every_frame_has_an_outcome(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """A rebalance revokes every partition, and a join takes seconds: the calls in flight then
    ended in it, their answers were dropped, the next owner classified those frames again, and
    the summaries counted them "unanswered". Now the revoke waits for them."""
    target, service = scripted_service(lambda _request, _attempt: None, delay_s=0.5)
    # ~12 s of calls: the second member's join (seconds on a loaded machine) comes mid-backlog
    keys = [*_publish_frames(kafka, "cam-h", 100, video_frames[0]),
            *_publish_frames(kafka, "cam-j", 100, video_frames[0])]  # fmt: skip
    first = _consumer(kafka, target, concurrency=8, idle_timeout=8.0)
    # the first member's calls in flight as each revoke came; calls in flight as the other joins
    merged, busy_at_revoke = _second_member_joins(
        first, lambda: first.caller.busy, lambda: sum(service.calls.values()) >= 12, kafka, target
    )
    assert merged.unanswered == 0 and merged.handed_over == 0, merged.as_dict()
    _assert_one_result_each(kafka, keys)
    assert sum(service.calls.values()) == len(keys)  # none classified twice
    # The fault was made: the join's revoke came with calls in flight.
    assert busy_at_revoke and busy_at_revoke[0] > 0, busy_at_revoke


def _frames_3_and_4_failing_once(
    kafka: KafkaSettings,
    scripted_service: Callable[..., tuple[str, ScriptedClassifier]],
    streams: tuple[str, ...],
    count: int,
    jpeg: bytes,
    delay_s: float,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, ScriptedClassifier, set[str], list[str]]:
    """`count` frames of each stream published; a service that fails frames 3 and 4 of each
    with INTERNAL once (a failure of their own), and a first backoff of 30-60 s for them."""
    failing = {frame_key(stream, index) for stream in streams for index in (3, 4)}
    target, service = scripted_service(
        lambda request, attempt: (
            grpc.StatusCode.INTERNAL if request.request_id in failing and attempt == 1 else None
        ),
        delay_s=delay_s,
    )
    monkeypatch.setattr("tasks.stream.inference_caller.RETRY_BACKOFF_S", 60.0)
    keys = [key for stream in streams for key in _publish_frames(kafka, stream, count, jpeg)]
    return target, service, failing, keys


def test_a_frame_waiting_to_retry_at_a_rebalance_holds_back_no_answered_frame(
    kafka, scripted_service, video_frames: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame that failed for a reason of its own (INTERNAL) waits out a backoff; a rebalance
    meanwhile committed at it, and the next owner classified every frame answered after it
    again (found in review, stop 61). Now the revoke sends it at once, with the calls in
    flight."""
    target, service, failing, keys = _frames_3_and_4_failing_once(
        kafka, scripted_service, ("cam-r", "cam-s"), 100, video_frames[0], 0.5, monkeypatch
    )
    first = _consumer(kafka, target, concurrency=8, idle_timeout=8.0, retry_max_backoff_s=60.0)
    # the frames waiting to retry as each revoke came; the other joins once all four failed once
    merged, waiting_at_revoke = _second_member_joins(
        first,
        lambda: len(first.caller.waiting_retry),
        lambda: sum(service.calls[key] for key in failing) >= len(failing),
        kafka,
        target,
    )
    assert merged.unanswered == 0 and merged.handed_over == 0, merged.as_dict()
    _assert_one_result_each(kafka, keys)
    assert sum(service.calls.values()) == len(keys) + len(failing)  # none classified twice
    # The fault was made: the join's revoke came with frames waiting out their backoff.
    assert waiting_at_revoke and waiting_at_revoke[0] > 0, waiting_at_revoke


def test_a_member_that_stops_sends_its_frames_waiting_to_retry_before_it_goes(
    kafka, scripted_service, video_frames: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same at a member's stop: frames waiting out a backoff longer than the stop's wait
    were left, their partition's commit point with them, and the next member of the group
    classified every frame answered after them again (found in review, stop 61)."""
    target, service, failing, keys = _frames_3_and_4_failing_once(
        kafka, scripted_service, ("cam-t", "cam-u"), 20, video_frames[0], 0.05, monkeypatch
    )
    group = f"group-{uuid.uuid4().hex[:6]}"
    first = _consumer(kafka, target, group=group, concurrency=8, duration=8.0,
                      idle_timeout=30.0, retry_max_backoff_s=60.0)  # fmt: skip
    summaries = [first.run()]  # stops at its duration, four frames waiting 30-60 s
    assert sum(service.calls[key] for key in failing) == 2 * len(failing)  # sent again first
    summaries.append(_consumer(kafka, target, group=group, concurrency=8).run())
    merged = merge_summaries(summaries)
    _assert_one_result_each(kafka, keys)
    assert sum(service.calls.values()) == len(keys) + len(failing), merged.as_dict()


def test_a_frame_that_fails_again_at_a_stop_keeps_its_backoff(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """Found in review, stop 62: at a stop, a frame failing for a reason of its own was sent
    again at once on every pass, so a hiccup of milliseconds used up its tries and
    dead-lettered a good frame. Sent again once at the stop; after that, its backoff."""
    member: list[FrameConsumer] = []
    hiccup = frame_key("cam-h", 2)
    last_call: dict[str, float] = {}

    def behaviour(request, attempt: int) -> grpc.StatusCode | None:
        if request.request_id != hiccup:
            return None
        since_last = time.monotonic() - last_call.get("at", 0.0)
        last_call["at"] = time.monotonic()
        if attempt == 1:
            member[0].stop.set()  # the member stops as the frame first fails
        # fails twice, and again if called within 150 ms of its last failure (the backoff
        # after a second failure is 200-400 ms; the old code's resend came within a pass)
        return grpc.StatusCode.INTERNAL if attempt <= 2 or since_last < 0.15 else None

    target, service = scripted_service(behaviour)
    keys = _publish_frames(kafka, "cam-h", 3, video_frames[0])
    member.append(_consumer(kafka, target, concurrency=1, max_attempts=3))
    summary = member[0].run()
    assert service.calls[hiccup] == 3 and summary.dlq == 0, summary.as_dict()
    assert summary.results_published == len(keys)


def test_a_result_too_large_to_send_is_a_failed_delivery_not_a_crash(kafka) -> None:
    """A result or stale record over --max-message-bytes (a small limit, a long stream id)
    raised librdkafka's error out of the consumer's loop: a traceback and no summary. Only a
    dead letter raises it, for its path to send a smaller copy."""
    from confluent_kafka import KafkaError, KafkaException

    small = kafka.model_copy(update={"max_message_bytes": 1000})
    member = _consumer(small, f"127.0.0.1:{free_port()}")
    failed: list[KafkaError] = []
    record = b"r" * 5000
    member.publisher._publish(small.results_topic, b"k", record, None,
                              lambda error, _message: failed.append(error))  # fmt: skip
    assert [error.code() for error in failed] == [KafkaError.MSG_SIZE_TOO_LARGE]
    with pytest.raises(KafkaException):
        member.publisher._publish(small.dlq_topic, b"k", record, None, lambda *_: None,
                                  smaller_copies=True)  # fmt: skip


@pytest.mark.faults
def test_a_member_whose_result_is_over_the_size_limit_stops_with_its_summary(
    kafka, scripted_service
) -> None:
    """The same through a member's own run: a frame that fits --max-message-bytes, whose
    result (its long stream id twice over, in its key and its record) does not. It raised out
    of the loop: a traceback, no summary, nothing said of the size."""
    small = kafka.model_copy(update={"max_message_bytes": 1000})
    target, service = scripted_service(lambda _request, _attempt: None)
    service.label = "a label of many words " * 100  # a 2,200-byte result: over the limit
    _publish_frames(small, "cam-big", 3, b"jpeg")
    group = f"group-{uuid.uuid4().hex[:6]}"
    summary = _consumer(small, target, group=group, concurrency=1).run()
    assert summary.delivery_error and "could not be published" in summary.delivery_error
    assert "MSG_SIZE_TOO_LARGE" in summary.delivery_error or "too large" in (
        summary.delivery_error.lower()
    ), summary.delivery_error
    assert summary.results_published == 0
    assert committed_total(small.bootstrap_servers, group, small.frames_topic, 2) == 0


@pytest.mark.faults
def test_a_result_the_broker_refuses_for_good_stops_the_member_before_it_passes_its_offset(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """A results topic that refuses a record (authorization, its size) while the broker is up:
    the member went on classifying frames whose offsets it could never commit, and exited 0.
    Tansu refuses nothing, so that one delivery report is made up; the rest is real."""
    from confluent_kafka import KafkaError

    target, _service = scripted_service(lambda _request, _attempt: None)
    keys = _publish_frames(kafka, "cam-d", 40, video_frames[0])
    refused = frame_key("cam-d", 5)
    group = f"group-{uuid.uuid4().hex[:6]}"
    member = _consumer(kafka, target, group=group, concurrency=1)
    publish = member.publisher._publish

    def publish_or_refuse(topic, key, value, headers, on_delivery, **options) -> None:
        if topic == kafka.results_topic and key == refused.encode():
            on_delivery(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "refused"), None)
            return
        publish(topic, key, value, headers, on_delivery, **options)

    member.publisher._publish = publish_or_refuse
    started = time.monotonic()
    summary = member.run()
    assert time.monotonic() - started < 30  # stopped at once, not at its idle timeout
    assert summary.delivery_error and "@5 could not be published" in summary.delivery_error
    assert summary.results_published < len(keys) - 1  # it did not work on for nothing
    assert committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) == 5

    # The group's next member redoes the frames from the refused one on: none is lost.
    assert _consumer(kafka, target, group=group).run().delivery_error is None
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=len(keys))
    assert set(result_keys(results)) == set(keys)
    assert committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) == len(keys)


@pytest.mark.faults
def test_a_dead_letter_copy_the_broker_refuses_as_too_large_is_sent_smaller(
    kafka, scripted_service
) -> None:
    """The broker's own size limit (Redpanda's batch size, a topic's max.message.bytes) is
    said in the delivery report, not at produce: the member stopped with a delivery error and
    met the same message on every restart. Tansu refuses nothing, so that one delivery report
    is made up; the rest is real."""
    from confluent_kafka import KafkaError

    target, _service = scripted_service(lambda _request, _attempt: None)
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    producer.produce(kafka.frames_topic, key=b"cam-t", value=b"no headers at all" * 100)
    assert producer.flush(10) == 0
    group = f"group-{uuid.uuid4().hex[:6]}"
    member = _consumer(kafka, target, group=group)
    publish, refused = member.publisher._publish, []

    def refuse_whole_copies(topic, key, value, headers, on_delivery, **options) -> None:
        if topic == kafka.dlq_topic and value is not None:  # the copy with the frame's bytes
            refused.append(key)
            on_delivery(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"), None)
            return
        publish(topic, key, value, headers, on_delivery, **options)

    member.publisher._publish = refuse_whole_copies
    summary = member.run()
    assert refused == [b"cam-t"]
    assert summary.delivery_error is None and summary.dlq == 1
    [dead] = read_topic(kafka.bootstrap_servers, kafka.dlq_topic, expected=1)
    headers = dict(dead.headers())
    assert dead.value() is None and headers[HEADER_DLQ_VALUE_DROPPED] == b"1700"
    assert "lacks header" in headers[HEADER_DLQ_REASON].decode()
    assert committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) == 1


@pytest.mark.faults
def test_an_unavailable_service_is_waited_for_beyond_max_attempts(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """UNAVAILABLE is the service's outage, not the frame's fault: no attempt limit applies."""
    slow_frame = frame_key("cam-u", 2)

    def behaviour(request: inference_pb2.ClassifyRequest, attempt: int) -> grpc.StatusCode | None:
        return (
            grpc.StatusCode.UNAVAILABLE
            if request.request_id == slow_frame and attempt <= 6
            else None
        )

    target, service = scripted_service(behaviour)
    keys = _publish_frames(kafka, "cam-u", 8, video_frames[0])
    summary = _consumer(kafka, target, max_attempts=2).run()
    assert service.calls[slow_frame] == 7
    assert summary.dlq == 0 and summary.retries == 6
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=len(keys))
    assert Counter(result_keys(results)) == Counter(keys)


@pytest.mark.faults
def test_a_service_outage_longer_than_the_poll_interval_keeps_the_member_in_its_group(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """With every call waiting to retry, the member at its in-flight limit did not poll: past
    max.poll.interval.ms (5 min by default; 6 s here) the group dropped it, its commits failed
    and its frames in flight were classified again when it rejoined."""
    poll_interval_s = kafka.session_timeout_ms / 1000
    refused_at: list[float] = []  # from the first call: a group join takes seconds before it

    def behaviour(request: inference_pb2.ClassifyRequest, attempt: int) -> grpc.StatusCode | None:
        now = time.monotonic()
        if not refused_at or now < refused_at[0] + 2 * poll_interval_s:
            refused_at.append(now)
            return grpc.StatusCode.UNAVAILABLE
        return None

    target, _service = scripted_service(behaviour)
    keys = _publish_frames(kafka, "cam-o", 12, video_frames[0])
    group = f"group-{uuid.uuid4().hex[:6]}"
    short_poll = kafka.model_copy(update={"max_poll_interval_ms": kafka.session_timeout_ms})
    member = _consumer(short_poll, target, group=group, concurrency=2)
    summary = member.run()
    assert refused_at[-1] - refused_at[0] > poll_interval_s  # stuck past the interval
    assert summary.retries > 0 and summary.results_published == len(keys)
    assert summary.frames_consumed == len(keys)  # none taken twice
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=len(keys))
    assert Counter(result_keys(results)) == Counter(keys)  # each classified once
    assert committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) == len(keys)


@pytest.mark.faults
@pytest.mark.slow
def test_partitions_a_stuck_member_paused_are_read_again_after_a_rebalance(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """librdkafka keeps a partition paused across a rebalance (only a resume clears it): a
    member stuck at its in-flight limit, its partitions paused, that got them back when another
    member came and went never fetched them again."""
    outage_ends = [math.inf]  # until the visitor has come and gone (below)

    def behaviour(request: inference_pb2.ClassifyRequest, attempt: int) -> grpc.StatusCode | None:
        return grpc.StatusCode.UNAVAILABLE if time.monotonic() < outage_ends[0] else None

    target, _service = scripted_service(behaviour)
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    keys = []
    for partition, stream_id in enumerate(["cam-p", "cam-q"]):  # one stream on each partition
        for index in range(10):
            frame = Frame(stream_id, index, time.time_ns(), time.time_ns(), video_frames[0])
            producer.produce(kafka.frames_topic, key=stream_id.encode(), value=frame.jpeg,
                             headers=encode_frame_headers(frame), partition=partition)  # fmt: skip
            keys.append(frame_key(stream_id, index))
    assert producer.flush(10) == 0
    group = f"group-{uuid.uuid4().hex[:6]}"
    stuck = _consumer(kafka, target, group=group, concurrency=2)
    outcome: dict[str, Any] = {}
    running = threading.Thread(target=lambda: outcome.update(summary=stuck.run()))
    running.start()
    deadline = time.monotonic() + 30
    while not stuck.assignment._paused:  # stuck at its limit, its partitions paused
        assert time.monotonic() < deadline and running.is_alive()
        time.sleep(0.05)
    visitor = _consumer(kafka, target, group=group, concurrency=2)
    visiting = threading.Thread(target=visitor.run)
    visiting.start()
    assert visitor.membership.joined.wait(30)  # a rebalance: then it leaves, another
    visitor.stop.set()
    visiting.join(60)
    # Stuck still while the group settles without the visitor (Tansu takes session / 2): the
    # partitions come back while paused, and only a resume lets them be fetched again
    outage_ends[0] = time.monotonic() + kafka.session_timeout_ms / 1000
    running.join(90)
    assert outcome["summary"].delivery_error is None
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=len(keys))
    assert set(result_keys(results)) == set(keys)
    assert committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) == len(keys)


@pytest.mark.faults
def test_a_full_service_is_waited_for_and_loses_no_frame_to_the_dead_letters(
    kafka, model_cache: Path, tmp_path: Path, video_frames: list[bytes]
) -> None:
    """`vidflow serve --max-concurrent-rpcs 2` refuses a third call with RESOURCE_EXHAUSTED
    ("try again when one ends"): a consumer with 8 calls in flight dead-lettered good frames
    after --max-attempts refusals."""
    server = start_server(tmp_path, model_cache, "--max-concurrent-rpcs", "2")
    try:
        server.wait_serving()
        keys = _publish_frames(kafka, "cam-f", 60, video_frames[0])
        summary = _consumer(kafka, server.target, concurrency=8, max_attempts=2).run()
    finally:
        server.terminate()
    assert summary.retries > 0, "the server was never full: the test proves nothing"
    assert summary.dlq == 0 and summary.results_published == len(keys)
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=len(keys))
    assert Counter(result_keys(results)) == Counter(keys)
    # A frame over the service's size limit still counts (its text: test_service.py).
    too_large = f"Received message {FRAME_TOO_LARGE} (17000000 vs. 16777216)"
    assert counts_against_frame(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large)


@pytest.mark.faults
def test_a_service_that_does_not_serve_classify_loses_no_frame_to_the_dead_letters(
    kafka, scripted_service, video_frames: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """UNIMPLEMENTED (a --target that is not the inference service), UNAUTHENTICATED and
    PERMISSION_DENIED are the setup's fault, not the frames': every frame was dead-lettered,
    the offsets committed past the whole stream, and the run exited 0."""
    wrong_first = [
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    ]

    def behaviour(_request: inference_pb2.ClassifyRequest, attempt: int) -> grpc.StatusCode | None:
        return wrong_first[attempt - 1] if attempt <= len(wrong_first) else None  # then fixed

    target, _ = scripted_service(behaviour)
    keys = _publish_frames(kafka, "cam-m", 6, video_frames[0])
    with caplog.at_level(logging.ERROR, logger="tasks.stream.inference_caller"):
        summary = _consumer(kafka, target, max_attempts=1).run()
    assert summary.dlq == 0 and summary.results_published == len(keys)
    assert f"the service at {target} answers UNIMPLEMENTED" in caplog.text
    assert caplog.text.count("answers UNIMPLEMENTED") == 1  # said once, not per frame


@pytest.mark.faults
def test_consume_against_a_service_that_never_answers_exits_non_zero(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    target, _ = scripted_service(lambda _request, _attempt: grpc.StatusCode.UNIMPLEMENTED)
    _publish_frames(kafka, "cam-n", 3, video_frames[0])
    group = f"group-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(  # its duration counts the group's join too (Tansu's: 3 s or more)
        _cli("consume", *_kafka_flags(kafka), "--target", target, "--group", group,
             "--duration", "12"),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"no frame was answered: is the service at {target} up and right?" in done.stderr
    assert committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) == 0


@pytest.mark.faults
def test_a_newline_in_a_produced_stream_id_cannot_forge_a_consumer_log_line(
    kafka, scripted_service, video_frames: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """The stream id comes from a header anyone who can produce to the topic writes."""
    hostile = "cam-n\nCRITICAL forged line"
    target, _ = scripted_service(
        lambda _request, attempt: grpc.StatusCode.UNAVAILABLE if attempt == 1 else None
    )
    keys = _publish_frames(kafka, hostile, 1, video_frames[0])
    with caplog.at_level("DEBUG", logger="tasks.stream"):
        summary = _consumer(kafka, target, max_attempts=2).run()
    assert summary.retries == 1 and summary.results_published == 1
    mentions = [r.getMessage() for r in caplog.records if "forged line" in r.getMessage()]
    assert any("retrying" in text for text in mentions), mentions
    assert all("\n" not in text for text in mentions), mentions
    # The id itself is kept as produced: only how the log renders it changes.
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=1)
    assert result_keys(results) == keys


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vidflow.cli", *args]


def _kafka_flags(kafka: KafkaSettings) -> list[str]:
    return [
        "--bootstrap-servers", kafka.bootstrap_servers, "--topic", kafka.frames_topic,
        "--results-topic", kafka.results_topic, "--dlq-topic", kafka.dlq_topic,
    ]  # fmt: skip


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of the test's own, to kill; its topics created like the `kafka` fixture's."""
    broker = start_broker(free_port(), log_path=tmp_path / "tansu.log")
    try:
        yield broker
    finally:
        if broker.process.poll() is None:
            broker.process.kill()
            broker.process.wait(10)


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _kill_broker_expect_exit(
    broker: LocalBroker,
    command: subprocess.Popen,
    log_path: Path,
    under_way: tuple[Callable[[], bool], float, str],
) -> tuple[float, str]:
    """Once `under_way` holds (condition, timeout, what), SIGKILL the broker under the running
    stream command: it must exit 1 within the grace, naming the broker, with no child process.
    Returns its seconds to exit and its log."""
    try:
        _wait_for(*under_way)
        assert children(command.pid) == []  # nothing to orphan
        killed_at = time.monotonic()  # the grace may start before this thread runs again
        broker.process.kill()
        broker.process.wait(10)
        code, _ = _wait_exit(command, BROKER_GRACE_S + EXIT_MARGIN_S)
        took_s = time.monotonic() - killed_at
    finally:
        if command.poll() is None:
            command.kill()
    output = log_path.read_text()
    assert code == 1, output[-3000:]
    assert BROKER_GRACE_S <= took_s < BROKER_GRACE_S + EXIT_MARGIN_S
    assert f"lost the Kafka broker {broker.bootstrap_servers}" in output
    return took_s, output


def _wait_exit(process: subprocess.Popen, timeout_s: float) -> tuple[int, float]:
    """The exit code and how long it took, killing the process if it overruns."""
    started = time.monotonic()
    try:
        code = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        pytest.fail(f"still running {timeout_s:.0f} s after the broker died")
    return code, time.monotonic() - started


BROKER_GRACE_S = 5.0
# Beyond the grace: the last flush (1 s), closing the clients, a loaded CI box (measured: 1-2.5 s).
EXIT_MARGIN_S = 10.0


@pytest.mark.faults
@pytest.mark.slow
def test_consume_fails_within_the_grace_when_the_broker_dies_and_counts_unanswered_frames(
    own_broker: LocalBroker, scripted_service, video_frames: list[bytes], tmp_path: Path
) -> None:
    kafka = fresh_topics(own_broker)
    target, _service = scripted_service(lambda _request, _attempt: None, delay_s=0.05)
    _publish_frames(kafka, "cam-k", 300, video_frames[0])  # about 8 s at 2 x 50 ms
    group = f"group-{uuid.uuid4().hex[:6]}"
    summary_path, log_path = tmp_path / "summary.json", tmp_path / "consume.log"
    with open(log_path, "wb") as log_file:
        consume = subprocess.Popen(
            _cli(
                "consume", *_kafka_flags(kafka), "--group", group, "--target", target,
                "--concurrency", "2", "--duration", "300", "--summary-json", str(summary_path),
                "--broker-grace-s", str(BROKER_GRACE_S),
            ),
            cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    took_s, output = _kill_broker_expect_exit(
        own_broker,
        consume,
        log_path,
        (
            lambda: committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) >= 30,
            90,
            "30 frames committed",
        ),
    )
    summary = json.loads(summary_path.read_text())
    print(f"consume ended {took_s:.1f} s after the broker died: {summary['unanswered']} unanswered")
    assert kafka.bootstrap_servers in summary["broker_error"]
    assert summary["lag"] is None  # unknown, not a reassuring 0
    # Prefetched frames went on being classified; none of their results got out.
    assert summary["unanswered"] > 0
    assert summary["unanswered"] == (
        summary["frames_consumed"] - summary["results_published"] - summary["dlq"]
    )
    assert f"unanswered {summary['unanswered']}" in output
    assert "not leaving group" in output  # no close() that can hang with the broker gone
    # librdkafka's line for each failed reconnect (~20 a second) is shown once per client and
    # broker address, through Python logging, not hundreds of times.
    lines = output.splitlines()
    refused = [line for line in lines if "rdkafka#" in line and "Connection refused" in line]
    assert 0 < len(refused) <= 6, "\n".join(refused)
    assert all("vidflow.librdkafka" in line for line in refused), "\n".join(refused)


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("fps", ["30", "0.05"])
def test_produce_fails_within_the_grace_when_the_broker_dies(
    own_broker: LocalBroker, tmp_path: Path, fps: str
) -> None:
    """At a slow pace too (a frame every 20 s): the wait for the next frame served no client
    event, so the outage was seen at the next frame (found in review, stop 57)."""
    kafka = fresh_topics(own_broker)
    log_path = tmp_path / "produce.log"
    with open(log_path, "wb") as log_file:
        produce = subprocess.Popen(
            _cli(
                "produce", "--source", str(CLIP), "--fps", fps, "--loop",
                "--bootstrap-servers", kafka.bootstrap_servers, "--topic", kafka.frames_topic,
                "--broker-grace-s", str(BROKER_GRACE_S),
            ),
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log_file, text=True,
        )  # fmt: skip
    first = 30 if fps == "30" else 1
    under_way = (lambda: _published(kafka) >= first, 60, f"{first} frame(s) published")
    took_s, _ = _kill_broker_expect_exit(own_broker, produce, log_path, under_way)
    stats = json.loads(produce.stdout.read().strip().splitlines()[-1])
    print(f"produce ended {took_s:.1f} s after the broker died: {stats}")
    assert kafka.bootstrap_servers in stats["broker_error"]
    # The frames read in the grace were never taken by a broker: counted failed, not delivered.
    assert stats["delivered"] + stats["failed"] == stats["frames_read"]
    assert stats["failed"] > 0 if fps == "30" else stats["frames_read"] == 1


def _published(kafka: KafkaSettings) -> int:
    """Messages in the frames topic, from its partitions' high watermarks."""
    return sum(partition_ends(kafka.bootstrap_servers, kafka.frames_topic, kafka.partitions))


@pytest.mark.faults
def test_a_sigkilled_broker_command_takes_tansu_with_it() -> None:
    port = free_port()
    command = subprocess.Popen(
        _cli("broker", "--port", str(port)),
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    tansu: list[int] = []
    try:
        assert command.stdout.readline().startswith(f"broker ready on 127.0.0.1:{port}")
        tansu = children(command.pid)
        assert len(tansu) == 1 and listening_addresses(port) == ["127.0.0.1"]
        command.kill()  # SIGKILL: no handler runs, no stop_process
        command.wait(10)
        _wait_for(lambda: not is_running(tansu[0]), 5, "Tansu to exit")
        _wait_for(lambda: not listening_addresses(port), 5, "the port to close")
    finally:
        for pid in tansu:  # on the old code Tansu outlives the test otherwise
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        if command.poll() is None:
            command.kill()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def _run_and_kill_the_broker(
    settings: StreamBenchmarkSettings,
    broker: LocalBroker,
    ready: Callable[[], bool],
    what: str,
) -> tuple[Any, BrokerLostDuringRunError]:
    """Run the stream-benchmark flow, SIGKILL its broker once `ready`; the run's final state
    and its error, which must be BrokerLostDuringRunError."""
    outcome: dict[str, Any] = {}
    running = threading.Thread(
        target=lambda: outcome.update(state=stream_benchmark(settings=settings, return_state=True))
    )
    running.start()
    try:
        _wait_for(ready, 90, what)
    finally:
        broker.process.kill()
        broker.process.wait(10)
        running.join(120)
    assert not running.is_alive()
    state = outcome["state"]
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, BrokerLostDuringRunError), error
    return state, error


@pytest.mark.faults
@pytest.mark.slow
def test_the_stream_benchmark_flow_fails_and_reports_it_when_the_broker_dies(
    prefect_api, own_broker: LocalBroker, onnx_server
) -> None:
    kafka = fresh_topics(own_broker).model_copy(update={"broker_grace_s": BROKER_GRACE_S})
    settings = StreamBenchmarkSettings(
        duration=60.0, fps="native", client=ClientSettings(target=onnx_server.target), kafka=kafka
    )
    state, error = _run_and_kill_the_broker(
        settings, own_broker, lambda: _published(kafka) >= 30, "30 frames published"
    )
    assert kafka.bootstrap_servers in str(error)
    with get_client(sync_client=True) as client:
        [report] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["stream-benchmark-report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert "BROKER LOST" in report.data


def _step_frames(kafka: KafkaSettings, streams: int) -> int:
    """Frames published to the topics of a capacity sweep's steps of `streams` streams."""
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
    step = f"cap{streams}-"
    names = [n for n in admin.list_topics(timeout=5).topics if n.startswith(kafka.frames_topic)]
    return sum(
        sum(partition_ends(kafka.bootstrap_servers, name, kafka.partitions))
        for name in names
        if step in name
    )


@pytest.mark.slow
@pytest.mark.faults
def test_a_capacity_sweep_that_loses_the_broker_fails_and_still_reports(
    prefect_api, own_broker: LocalBroker, onnx_server, tmp_path: Path
) -> None:
    """The sweep read a step's results back from a broker that was gone: a KafkaException
    ended the flow run in a traceback, and no report of the sweep was recorded."""
    kafka = fresh_topics(own_broker).model_copy(update={"broker_grace_s": BROKER_GRACE_S})
    settings = StreamBenchmarkSettings(
        capacity=True, step_seconds=30.0, max_streams=2, step_tries=1, output_dir=tmp_path,
        client=ClientSettings(target=onnx_server.target), kafka=kafka,
    )  # fmt: skip
    state, error = _run_and_kill_the_broker(
        settings, own_broker, lambda: _step_frames(kafka, 1) >= 30, "30 frames of the first step"
    )
    assert "the broker was lost in the step of 1 stream" in str(error), error
    assert error.outcome["steps"] == []
    # no count decided, and it says so, not a reassuring "0 streams ... on this machine"
    assert error.outcome["verdict"].startswith("no stream count of "), error.outcome
    with get_client(sync_client=True) as client:
        reports = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["stream-capacity-report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert len(reports) == 1, reports
    assert error.outcome["verdict"] in reports[0].data, reports[0].data  # the report says it


class _CloseThatNeverEnds:
    """Stands in for a librdkafka consumer whose close waits for ever on a group that will not
    settle: seen once in a full suite run (two members idling out together, one told "unknown
    member" on its last commit), and not something a test can bring about on purpose."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def close(self) -> None:
        self.release.wait(30)


@pytest.mark.faults
def test_a_consumer_close_that_never_ends_is_left_after_its_timeout(kafka) -> None:
    stuck = _CloseThatNeverEnds()
    started = time.monotonic()
    assert close_within(stuck, timeout_s=0.5) is False  # type: ignore[arg-type]
    assert time.monotonic() - started < 5
    stuck.release.set()

    # A real member of a real group leaves it within the time, as before.
    member = Consumer(consumer_config(kafka, f"group-{uuid.uuid4().hex[:6]}"))
    membership = _Recorded(member, kafka.frames_topic)
    deadline = time.monotonic() + 30
    while not member.assignment() and time.monotonic() < deadline:
        member.poll(0.2)
    assert member.assignment()
    assert leave_group(member, membership, wait_s=15, gone=_never_gone) is True
    with pytest.raises(RuntimeError):  # closed: a closed consumer refuses further calls
        member.poll(0)


class _Recorded(Membership):
    """A member's callbacks as `FrameConsumer` keeps them, with the thread each ran on."""

    def __init__(self, consumer: Consumer, topic: str) -> None:
        super().__init__()
        self.served_on: list[tuple[str, str]] = []
        consumer.subscribe([topic], on_assign=self._assign, on_revoke=self._revoke)

    def _assign(self, consumer: Consumer, partitions: list) -> None:
        self.served_on.append(("assign", threading.current_thread().name))
        self.assigned()

    def _revoke(self, consumer: Consumer, partitions: list) -> None:
        self.served_on.append(("revoke", threading.current_thread().name))
        self.revoked()

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.served_on]

    def threads(self) -> set[str]:
        return {thread for _, thread in self.served_on}


def _never_gone() -> bool:
    return False


@pytest.mark.faults
def test_a_member_stopped_as_it_joins_answers_its_rebalances_before_it_closes(kafka) -> None:
    """A rebalance left to `close` is answered inside it, by a librdkafka call made holding
    the GIL that can wait for ever (librdkafka#4884; one `vidflow consume` in ~30 stopped as it
    joined hung so): a member that leaves must have answered them all in `poll` first."""
    member = Consumer(consumer_config(kafka, f"group-{uuid.uuid4().hex[:6]}"))
    membership = _Recorded(member, kafka.frames_topic)
    assert leave_group(member, membership, wait_s=30, gone=_never_gone) is True  # joining yet
    assert membership.kinds() == ["assign", "revoke"]
    assert membership.threads() == {threading.current_thread().name}
    with pytest.raises(RuntimeError):  # closed
        member.poll(0)


@pytest.mark.faults
def test_a_member_that_leaves_during_a_rebalance_waits_for_its_end(kafka) -> None:
    """A second member joining makes the first give its partitions back and join again; one
    that leaves then must let that join end in `poll`, not leave its assignment to `close`."""
    group = f"group-{uuid.uuid4().hex[:6]}"
    first = Consumer(consumer_config(kafka, group))
    first_membership = _Recorded(first, kafka.frames_topic)
    deadline = time.monotonic() + 30
    while not first_membership.settled and time.monotonic() < deadline:
        first.poll(0.1)
    assert first_membership.kinds() == ["assign"]
    second = Consumer(consumer_config(kafka, group))
    second_membership = _Recorded(second, kafka.frames_topic)
    stop_second = threading.Event()

    def keep_polling() -> None:  # the second member serves its join on a thread of its own
        while not stop_second.is_set():
            second.poll(0.1)

    polling = threading.Thread(target=keep_polling)
    polling.start()
    try:
        while first_membership.revokes == 0 and time.monotonic() < deadline:
            first.poll(0)  # until the rebalance takes its partitions back, and not beyond
            time.sleep(0.05)
        assert first_membership.kinds() == ["assign", "revoke"]  # its join again under way
        assert leave_group(first, first_membership, wait_s=30, gone=_never_gone) is True
        assert first_membership.kinds() == ["assign", "revoke", "assign", "revoke"]
        assert first_membership.threads() == {threading.current_thread().name}
    finally:
        stop_second.set()
        polling.join(30)
        leave_group(second, second_membership, wait_s=30, gone=_never_gone)


@pytest.mark.faults
def test_a_stop_ends_the_wait_for_a_service_that_is_not_up(kafka) -> None:
    """Ctrl-C while the service was unreachable waited out the whole connect timeout first."""
    stop = threading.Event()
    group = f"group-{uuid.uuid4().hex[:6]}"
    member = FrameConsumer(kafka, ConsumerSettings(group=group), f"127.0.0.1:{free_port()}", stop)
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    assert member.caller.connect(timeout_s=60, stop=stop) is False
    assert time.monotonic() - started < 30
    assert member.run().frames_consumed == 0  # stopped: it joins, leaves and closes


@pytest.mark.parametrize("topic_known", [False, True], ids=["in-reports", "as-queued"])
def test_frames_the_broker_refuses_are_counted_each_and_said_once_in_a_while(
    kafka: KafkaSettings, caplog: pytest.LogCaptureFixture, topic_known: bool
) -> None:
    """A broker that refuses every frame (a topic's size limit, an ACL) had the producer write
    one error line per frame, 30 a second per camera. Here each frame goes to a partition the
    topic lacks. librdkafka refuses such a frame in its delivery report, as the broker would,
    until it knows the topic; once it does, it refuses it as it is queued, which ended the run
    with a traceback and no summary (`as-queued`: the topic is known before)."""
    from tasks.stream.broker_watch import BrokerWatch
    from tasks.stream.frame_codec import Frame
    from tasks.stream.kafka_io import make_producer
    from tasks.stream.producer import Camera, ProduceStats, _FrameOutlet

    watch = BrokerWatch(kafka.bootstrap_servers, kafka.broker_grace_s)
    stats = ProduceStats(stream_id="cam", source="test", per_stream={"cam": 0})
    outlet = _FrameOutlet(
        make_producer(kafka, watch), watch, kafka.frames_topic, stats, threading.Event()
    )
    known = 0
    if topic_known:  # one frame delivered where the topic has a partition
        outlet.publish(Camera("cam", 0), Frame("cam", 0, time.time_ns(), time.time_ns(), b"j"))
        outlet.flush()
        known = 1
    nowhere = Camera("cam", partition=99)  # the topic has 2
    for index in range(40):
        outlet.publish(nowhere, Frame("cam", index, time.time_ns(), time.time_ns(), b"jpeg"))
    outlet.flush()
    assert (stats.failed, stats.delivered) == (40, known), stats
    assert stats.frames_read <= 40 + known, stats  # counts only what was queued
    if topic_known:
        assert stats.frames_read == known, stats
    said = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert 1 <= len(said) <= 3, said
    assert "of stream cam" in said[0] and "Unknown partition" in said[0], said
    counted = [int(line.split()[0]) for line in said]
    assert sum(counted) == 40, said  # each failure said in one count or another


def test_a_stop_ends_the_producers_wait_for_room_in_a_full_queue() -> None:
    """With the broker away (or refusing frames with an error librdkafka retries), the queue
    fills and the producer waits for room: a Ctrl-C, SIGTERM or the flow's stop went unheard
    until the broker's grace ran out (30 s by default; raised to ride out restarts), and
    `docker stop` killed it meanwhile, its queued frames uncounted. Now the wait ends with the
    stop; the frame it held is not published, and not counted."""
    from tasks.stream.broker_watch import BrokerWatch
    from tasks.stream.frame_codec import Frame
    from tasks.stream.kafka_io import make_producer
    from tasks.stream.producer import Camera, ProduceStats, _FrameOutlet

    away = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", broker_grace_s=600,
                         max_message_bytes=100_000)  # fmt: skip
    watch, stop = BrokerWatch(away.bootstrap_servers, away.broker_grace_s), threading.Event()
    stats = ProduceStats(stream_id="cam", source="test", per_stream={"cam": 0})
    outlet = _FrameOutlet(make_producer(away, watch), watch, away.frames_topic, stats, stop)
    jpeg, offered = b"j" * 60_000, []  # ~1,100 of them fill the 64-MiB queue

    def publish_until_stopped() -> None:
        while not stop.is_set():
            offered.append(1)
            outlet.publish(Camera("cam", 0), Frame("cam", len(offered), 0, 0, jpeg))

    publishing = threading.Thread(target=publish_until_stopped, daemon=True)
    publishing.start()
    deadline = time.monotonic() + 30
    while len(outlet.producer) < 1000:  # the queue is full, the producer waits for room
        assert time.monotonic() < deadline, len(outlet.producer)
        time.sleep(0.1)
    time.sleep(0.5)
    stop.set()
    publishing.join(5)
    assert not publishing.is_alive()  # it heard the stop, not the grace's end 600 s on
    assert stats.frames_read == len(offered) - 1  # the frame it held is not counted
    outlet.producer.purge()  # nothing more to try: its reconnects logged on after the test


def test_a_broker_back_before_the_producers_last_frames_are_delivered_is_no_lost_broker(
    kafka: KafkaSettings,
) -> None:
    """A broker that restarted as the source ended: the flush delivered every frame, yet the
    run read as a lost broker (exit 1; a capacity sweep ended there) unless a statistics
    snapshot happened to fall in the gap. A frame delivered now says the broker is back. (The
    outage is said as librdkafka says it, through its error callback: a restart whose end
    falls within a flush cannot be timed for real.)"""
    from confluent_kafka import KafkaError

    from tasks.stream.broker_watch import BrokerWatch
    from tasks.stream.frame_codec import Frame
    from tasks.stream.kafka_io import make_producer
    from tasks.stream.producer import Camera, ProduceStats, _FrameOutlet

    watch = BrokerWatch(kafka.bootstrap_servers, kafka.broker_grace_s)
    stats = ProduceStats(stream_id="cam", source="test", per_stream={"cam": 0})
    outlet = _FrameOutlet(
        make_producer(kafka, watch), watch, kafka.frames_topic, stats, threading.Event()
    )
    made_before: list = []  # a report of one made before the outage proves nothing
    producer = make_producer(kafka)
    producer.produce(kafka.frames_topic, b"early", on_delivery=lambda _e, m: made_before.append(m))
    assert producer.flush(10) == 0
    time.sleep(0.01)
    watch.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "all brokers are down"))
    assert watch.down
    watch.delivered(made_before[0])
    assert watch.down  # served late, it is no sign of the broker
    for index in range(10):
        outlet.publish(Camera("cam", 0), Frame("cam", index, time.time_ns(), time.time_ns(), b"j"))
    outlet.flush()
    assert (stats.delivered, stats.failed) == (10, 0), stats
    assert not watch.down and stats.broker_error is None, stats.broker_error


def _one_stream_end(kafka: KafkaSettings, frames: int) -> dict[int, int]:
    """Where one stream's `frames` end on fresh topics, as its producer would say: the end of
    the one partition that has them (a partition without frames has no end to read to)."""
    return {
        partition: frames
        for partition, high in enumerate(
            partition_ends(kafka.bootstrap_servers, kafka.frames_topic, 2)
        )
        if high > 0
    }


def _members_of(
    kafka: KafkaSettings, target: str, input_end: InputEnd, count: int, **settings
) -> tuple[list[FrameConsumer], list[float]]:
    """`count` members of one group run to their end: the members, and when each stopped."""
    group = f"group-{uuid.uuid4().hex[:6]}"
    members = [
        FrameConsumer(kafka, ConsumerSettings(group=group, **settings), target,
                      input_end=input_end)
        for _ in range(count)
    ]  # fmt: skip
    return members, run_members(members)


@pytest.mark.faults
def test_a_benchmark_group_drains_its_backlog_past_its_deadline_and_no_member_idles_out(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """The stream benchmark's members stopped at a fixed deadline (10 s after the producer's
    length, from their own start): a backlog the service needed longer for was cut off, the run
    Completed with the latest (longest-waiting) frames unread and left out of its latencies.
    And a member with no frames left the group as idle once the producer ended, revoking its
    busy peer's partitions mid-drain. Now, once the producer has ended where it says, the group
    reads to its ends for as long as it gives outcomes: here past a 9-s deadline (which leaves
    time to join, a second round of it too on a loaded machine) and a 0.3-s idle timeout, one
    camera (one partition, ~12 s of work) answered by one member, its idle peer waiting."""
    target, service = scripted_service(lambda _request, _attempt: None, delay_s=0.2)
    keys = _publish_frames(kafka, "cam-d", 60, video_frames[0])
    input_end = InputEnd(stall_s=5.0)
    input_end.set(_one_stream_end(kafka, len(keys)))
    members, ended = _members_of(
        kafka, target, input_end, 2, duration=9.0, idle_timeout=0.3, concurrency=1
    )
    summary = merge_summaries([member.summary for member in members])
    assert summary.results_published == len(keys) and not summary.stalled, summary
    assert sorted(service.calls) == sorted(keys)  # each once, however the partition moved
    last_answer = max(member.publisher.last_outcome_at or 0 for member in members)
    assert min(ended) >= last_answer, (ended, last_answer)  # nobody left before the drain's end


@pytest.mark.faults
def test_a_benchmark_group_whose_service_stops_answering_ends_as_stalled(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """A service that hung (or died) mid-run left the group waiting to its deadline, and the
    run Completed with figures over the frames answered before: a healthy-looking fps. Now the
    group stops once no outcome came for the input's `stall_s`, says it stalled (the flow fails
    on it), and the frames left stay uncommitted for the group to redo."""
    hung = threading.Event()

    def answer_ten_then_hang(request: inference_pb2.ClassifyRequest, _attempt: int) -> None:
        if int(request.request_id.rsplit(":", 1)[1]) >= 10:
            hung.wait(30)  # set as the test ends: no server thread outlives it

    target, _ = scripted_service(answer_ten_then_hang)
    keys = _publish_frames(kafka, "cam-h", 20, video_frames[0])
    input_end = InputEnd(stall_s=2.0)
    input_end.set(_one_stream_end(kafka, len(keys)))
    group = f"group-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    try:
        member = FrameConsumer(
            kafka, ConsumerSettings(group=group, duration=120.0, concurrency=2, rpc_timeout_s=1.0,
                                    max_attempts=100, retry_max_backoff_s=0.2),
            target, input_end=input_end,
        )  # fmt: skip
        summary = member.run()
    finally:
        hung.set()
    assert summary.stalled and summary.results_published == 10, summary
    assert summary.unanswered > 0 and "STALLED" in format_summary(summary.as_dict())
    assert time.monotonic() - started < 40  # not the 120-s deadline
    assert committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) == 10
    assert len(keys) == 20


def test_a_new_benchmark_group_starts_at_its_run_s_frames_not_the_topic_s_first(
    kafka, scripted_service, video_frames: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A benchmark's new group on a shared topic began at the topic's first message and passed
    over every earlier run's frames one by one: on a topic that keeps a week of them, minutes
    of reading before its own, all in its first frames' latencies. It now starts each
    partition it never read at the first frame produced since the run began."""
    from tasks.stream.publisher import Publisher

    target, service = scripted_service(lambda _request, _attempt: None)
    # An earlier run's frames, then this run's: both keys hash to one partition (Tansu answers
    # 0 for a partition with nothing since, which is then read from its start, as before).
    _publish_frames(kafka, "cam-old", 50, video_frames[0])
    time.sleep(0.5)  # the broker's timestamps are in ms: this run's begin later
    since_ms = int(time.time() * 1000)
    time.sleep(0.05)
    keys = _publish_frames(kafka, "cam-new", 12, video_frames[0])
    passed_over: list[int] = []
    original = Publisher.passed_over

    def count(publisher: Publisher, message: Message) -> None:
        passed_over.append(message.offset())
        original(publisher, message)

    monkeypatch.setattr(Publisher, "passed_over", count)
    summary = _consumer(kafka, target, max_frames=12, produced_since_ms=since_ms).run()
    assert summary.results_published == 12 and sorted(service.calls) == sorted(keys)
    assert passed_over == [], f"{len(passed_over)} older frames read and passed over"


def test_frames_of_another_producer_session_are_passed_over_and_counted(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """`--producer-session` classifies one producer start's frames and commits past the rest;
    found in review, stop 62: a session mistyped passed every frame over, counted nowhere, and
    `vidflow consume` exited 0. They are counted, and a run that passed over all it read fails."""
    from tasks.stream.consumer_summary import format_summary

    target, service = scripted_service(lambda _request, _attempt: None)
    _publish_frames(kafka, "cam-s", 12, video_frames[0])  # a producer that sends no session
    group = f"group-{uuid.uuid4().hex[:6]}"
    summary = _consumer(kafka, target, group=group, producer_session="abc123").run()
    assert summary.passed_over == 12 and summary.frames_consumed == 0 and not service.calls
    assert "passed over 12 frames of other runs" in format_summary(summary.as_dict())
    assert committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) == 12
    _publish_frames(kafka, "cam-s", 3, video_frames[0])
    # The command in a process of its own: in this one, it set up logging to a stream that
    # pytest closed after the test, and the tests after it logged into a closed file
    consume = [sys.executable, "-m", "vidflow.cli", "consume",
               "--bootstrap-servers", kafka.bootstrap_servers, "--target", target,
               "--frames-topic", kafka.frames_topic, "--results-topic", kafka.results_topic,
               "--dlq-topic", kafka.dlq_topic, "--group", group, "--idle-timeout", "4",
               "--producer-session", "abc123"]  # fmt: skip
    ran = subprocess.run(consume, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1, ran.stderr[-3000:]
    assert "each of the 3 frames read was passed over" in ran.stderr, ran.stderr[-3000:]


def test_a_call_that_outlasts_a_rebalance_is_not_answered_when_its_partition_comes_back(
    kafka, scripted_service, video_frames: list[bytes]
) -> None:
    """A call still in flight after a revoke's wait (a service with a deep queue) whose
    partition came back to the same member read as this member's again: its answer was
    published, and the member, reading the partition again from its commit point, classified
    the frame a second time. That answer is now left (counted handed over), the frame answered
    once, from the read after the rebalance; a call that ends within the wait is still
    published. (The rebalance is the member's own callbacks, called as librdkafka calls them;
    the service and its calls, one of 0.2 s and one of 6.2 s, are real.)"""
    slow = frame_key("cam-r", 8)
    target, service = scripted_service(
        lambda request, _attempt: time.sleep(6.0) if request.request_id == slow else None,
        delay_s=0.2,  # each side of the 2-s wait by seconds, as a loaded machine needs
    )
    member = _consumer(kafka, target, rpc_timeout_s=10.0)
    partition = TopicPartition(kafka.frames_topic, 0)
    try:
        member.assignment.on_assign(member._consumer, [partition])
        for offset in (7, 8):
            member.publisher.started(Message(topic=kafka.frames_topic, partition=0, offset=offset))
            member.caller.submit(
                Message(topic=kafka.frames_topic, partition=0, offset=offset),
                Frame("cam-r", offset, time.time_ns(), time.time_ns(), video_frames[0]),
            )
        member.assignment.on_revoke(member._consumer, [partition])  # waits 2 s of the 6
        member.assignment.on_assign(member._consumer, [partition])  # and it comes back
        deadline = time.monotonic() + 15
        while member.caller.in_flight and time.monotonic() < deadline:
            member.caller.drain(timeout_s=0.1)
        member.publisher.poll()
    finally:
        member.caller.close()
        member._consumer.close()
    assert sorted(service.calls) == sorted([frame_key("cam-r", 7), slow])
    assert member.caller.in_flight == 0 and member.summary.handed_over == 1
    assert member.summary.results_published == 1  # the one within the wait
    [published] = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=1)
    assert result_keys([published]) == [frame_key("cam-r", 7)]


def test_a_partition_answered_to_its_end_and_then_revoked_still_counts_as_answered(
    kafka,
) -> None:
    """A benchmark's drain reads how far the group answered from the members' offsets
    trackers, which forget a partition as it is revoked: one answered to its end and then lost
    in a rebalance (as a broker came back, or a camera that ended early) was never reported,
    and the run failed as stalled with every frame answered. (The rebalance is the member's
    own callbacks, called as librdkafka calls them; the broker is real.)"""
    from tasks.stream.consumer import _drained

    member = _consumer(kafka, f"127.0.0.1:{free_port()}")
    partition = TopicPartition(kafka.frames_topic, 0)
    try:
        member.assignment.on_assign(member._consumer, [partition])
        for offset in range(5):  # each read and answered
            member.publisher.passed_over(Message(topic=kafka.frames_topic, partition=0,
                                                 offset=offset))  # fmt: skip
        member.assignment.on_revoke(member._consumer, [partition])
        member.input_end.set({0: 5})  # the producer's frames end there
        assert _drained(member) and not member.summary.stalled
    finally:
        member.caller.close()
        member._consumer.close()


def test_a_ctrl_c_while_the_group_drains_gives_it_a_drain_s_then_stops_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ctrl-C after the producer had ended did nothing while the group drained a backlog
    (the stop was looked at once, as the producer ended): only a second one ended the run,
    with no report. Now the stop is watched until the group is done."""
    from tasks.stream import prefect_tasks

    monkeypatch.setattr(prefect_tasks, "DRAIN_S", 0.3)
    drained, halt = threading.Event(), threading.Event()
    watch = threading.Thread(target=prefect_tasks._cut_short_on_stop, args=(drained, halt))
    watch.start()
    try:
        time.sleep(0.3)
        assert not halt.is_set()  # no stop: the drain goes on
        prefect_tasks.RUN_STOP.set()  # the Ctrl-C, mid-drain
        assert halt.wait(5)
    finally:
        prefect_tasks.RUN_STOP.clear()
        drained.set()
        watch.join(5)
    done, untouched = threading.Event(), threading.Event()
    done.set()  # a group that ended before any stop: the watch ends, halting nothing
    prefect_tasks._cut_short_on_stop(done, untouched)
    assert not untouched.is_set()


@pytest.mark.faults
@pytest.mark.slow
def test_a_ctrl_c_while_a_benchmark_drains_stops_its_group_within_the_drain(
    prefect_api, kafka, scripted_service
) -> None:
    """The stop's watch and the members' `halt` wired through the flow: after the producer
    has ended, a Ctrl-C gives the group DRAIN_S to finish, then stops it with the rest of its
    backlog unanswered, and the run reports what it did (found in review, stop 57: the tests
    of a Ctrl-C stopped a stream that drained within a second, and passed without either)."""
    from tasks.stream.prefect_tasks import DRAIN_S, RUN_STOP

    target, _ = scripted_service(lambda _request, _attempt: None, delay_s=0.2)  # 5 frames/s
    frames = 240  # produced in a second or two; ~48 s of the service's work, one at a time
    settings = StreamBenchmarkSettings(
        source=str(CLIP), fps="max", max_frames=frames, concurrency=1,
        client=ClientSettings(target=target), kafka=kafka,
    )  # fmt: skip
    outcome: dict[str, Any] = {}
    running = threading.Thread(
        target=lambda: outcome.update(run=stream_benchmark(settings=settings))
    )
    running.start()
    try:
        results = kafka.bootstrap_servers, kafka.results_topic, kafka.partitions
        _wait_for(lambda: sum(partition_ends(*results)) > 0, 60, "the first results")
        time.sleep(3.0)  # the producer (a second or two at --fps max) has ended: the group drains
        stopped_at = time.monotonic()
        RUN_STOP.set()  # the Ctrl-C
        running.join(60)
        took_s = time.monotonic() - stopped_at
    finally:
        RUN_STOP.set()
        running.join(60)
        RUN_STOP.clear()
    assert not running.is_alive()
    summary = outcome["run"]["summary"]
    # Not the ~40 s the rest of the backlog would take (the leave, the flush and the flow
    # run's records take seconds of their own on a loaded machine)
    assert took_s < DRAIN_S + 20, took_s
    assert 0 < summary["results_published"] < frames, summary


@pytest.mark.faults
def test_a_background_commit_that_fails_is_sent_again_with_the_next(
    own_broker: LocalBroker,
) -> None:
    """A commit point was marked committed as it was sent: one whose commit failed (the
    broker away) went again only with the commit at a rebalance or the member's end, and a
    member killed before then redid frames answered long before (found in review, stop 60)."""
    kafka = fresh_topics(own_broker)
    member = _consumer(kafka, "127.0.0.1:1")
    consumer = member._consumer
    try:
        consumer.subscribe([kafka.frames_topic])
        _wait_for(
            lambda: consumer.poll(0.2) is None and bool(consumer.assignment()), 60, "partitions"
        )
        member.offsets.started(kafka.frames_topic, 0, 0)
        member.offsets.finished(kafka.frames_topic, 0, 0)
        member.publisher.commit(wait=False)  # the point counts as committed ...

        def taken() -> bool:  # ... and the broker has it
            consumer.poll(0.1)
            [point] = consumer.committed([TopicPartition(kafka.frames_topic, 0)], timeout=5)
            return point.offset == 1

        _wait_for(taken, 30, "the first commit taken")
        assert member.offsets.to_commit() == []
        own_broker.process.kill()
        own_broker.process.wait(10)

        def broker_seen_gone() -> bool:
            consumer.poll(0.2)  # (an error event of the broker gone, or nothing)
            return member.broker.down

        # A commit sent once the client knows its broker is gone fails (at the latest when the
        # group session times out); the member goes on, within its grace for the broker.
        _wait_for(broker_seen_gone, 30, "the broker seen gone")
        member.offsets.started(kafka.frames_topic, 0, 1)
        member.offsets.finished(kafka.frames_topic, 0, 1)
        member.publisher.commit(wait=False)
        assert member.offsets.to_commit() == []  # marked as sent ...

        def failure_reported() -> bool:
            consumer.poll(0.2)  # the report is served by a poll
            return member.offsets.to_commit() != []

        _wait_for(failure_reported, 60, "the failed commit's report")
        [point] = member.offsets.to_commit()  # ... and moved again: the next commit sends it
        assert (point.partition, point.offset) == (0, 2)
    finally:
        close_within(consumer, timeout_s=5)  # the broker is gone: its close may wait for good
