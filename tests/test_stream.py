"""The Kafka stream against the real local broker and a real inference service on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import Producer
from pydantic import SecretStr

from common.frames import load_encoded_images
from common.net import free_port, free_ports
from common.stats import LATENCY_BUCKETS_S
from devstack.launcher import REPO_ROOT, ServerProcess, start_server
from tasks.stream.consumer import FrameConsumer
from tasks.stream.frame_codec import (
    HEADER_DLQ_ATTEMPTS,
    HEADER_DLQ_REASON,
    HEADER_DLQ_SOURCE,
    HEADER_DLQ_STATUS,
    HEADER_DLQ_VALUE_DROPPED,
    HEADER_SESSION,
    HEADER_STREAM_ID,
    Frame,
    FrameFormatError,
    FrameResult,
    decode_frame,
    encode_frame_headers,
    frame_key,
    stale_result,
)
from tasks.stream.input_end import InputEnd
from tasks.stream.producer import ProduceStats, produce_frames
from tasks.stream.results import read_records
from tasks.stream.settings import ConsumerSettings, KafkaSettings, ProducerSettings
from tasks.stream.topics import BrokerUnreachableError, ensure_topics
from tests.conftest import VIDEOS
from tests.kafka_helpers import (
    committed_offsets,
    committed_total,
    partition_ends,
    produced_keys,
    read_topic,
    result_keys,
    run_members,
)
from tests.proc_helpers import children, listening_addresses

CLIP = VIDEOS / "k400_arm_wrestling.mp4"
CLIP_FRAMES = 280


def _produce_clip(kafka: KafkaSettings, stream_id: str, fps: str = "max", **kw) -> ProduceStats:
    stats = produce_frames(
        ProducerSettings(source=str(CLIP), fps=fps, stream_id=stream_id, **kw), kafka
    )
    assert stats.failed == 0 and stats.delivered == stats.frames_read
    return stats


def _frame_keys(stats: ProduceStats) -> set[str]:
    return produced_keys(stats.per_stream, stats.session)


def _consumer(
    kafka: KafkaSettings, target: str, input_end: InputEnd | None = None, **settings
) -> FrameConsumer:
    defaults = {"group": f"group-{uuid.uuid4().hex[:6]}", "idle_timeout": 4.0, "duration": 120.0}
    settings = {**defaults, **settings}
    return FrameConsumer(kafka, ConsumerSettings(**settings), target, input_end=input_end)


def _ended(*runs: ProduceStats, stall_s: float = 10.0) -> InputEnd:
    """Where the frames of `runs` end, said at once: a consumer given it stops once it has
    answered them all (as the stream benchmark's do), not after its idle timeout, or after
    `stall_s` with no frame answered."""
    ends: dict[int, int] = {}
    for run in runs:
        for partition, end in run.partition_ends.items():
            ends[partition] = max(end, ends.get(partition, 0))
    input_end = InputEnd(stall_s)
    input_end.set(ends)
    return input_end


def test_every_frame_gets_exactly_one_result_after_deduplication(kafka, onnx_server) -> None:
    stats = _produce_clip(kafka, "cam-a")
    produced = stats.frames_read
    assert produced == CLIP_FRAMES
    summary = _consumer(kafka, onnx_server.target, _ended(stats)).run()
    assert summary.frames_consumed == produced
    assert summary.results_published == produced
    assert summary.dlq == 0 and summary.errors == 0

    messages = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=produced)
    keys = result_keys(messages)
    assert set(keys) == _frame_keys(stats) and len(_frame_keys(stats)) == produced
    assert all(m.key().decode() == FrameResult.from_json(m.value()).key for m in messages)
    result = FrameResult.from_json(messages[0].value())
    later = json.dumps({**json.loads(messages[0].value()), "added_later": 1}).encode()
    assert FrameResult.from_json(later) == result  # a record of a later version reads as well
    assert result.label and 0 < result.score <= 1 and result.model_name == "efficientnet_lite0"
    assert 0 < result.inference_ms <= result.rpc_ms <= result.e2e_ms
    report = summary.as_dict()
    for name in ("inference_ms", "rpc_ms", "e2e_ms"):
        assert {"p50", "p90", "p99", "max", "mean"} <= set(report[name])
        assert 0 < report[name]["p50"] <= report[name]["p99"] <= report[name]["max"]
    assert report["fps"] > 0


def test_a_benchmark_group_stops_once_it_has_read_every_frame_its_producer_delivered(
    kafka, onnx_server
) -> None:
    """The stream benchmark's members ran on for their idle timeout (5 s a run, and a capacity
    sweep's every step) after the last frame was answered. The producer's delivery reports now
    say where its frames end; two members that share them stop together once both have read to
    there, long before an idle timeout of 60 s, with every frame answered once."""
    stats = _produce_clip(kafka, "cam-end", max_frames=40)
    assert sum(stats.partition_ends.values()) == 40  # fresh topics: every offset is this run's
    assert stats.frames_end() == stats.partition_ends
    # Frames may be on the broker without a delivery report: no end is sure, members idle out.
    assert replace(stats, failed=1).frames_end() is None
    assert replace(stats, broker_error="broker lost").frames_end() is None
    input_end, group = InputEnd(), f"group-{uuid.uuid4().hex[:6]}"
    settings = ConsumerSettings(group=group, idle_timeout=60.0, duration=120.0)
    members = [
        FrameConsumer(kafka, settings, onnx_server.target, input_end=input_end) for _ in range(2)
    ]

    def producer_ends() -> None:
        assert not input_end.read_to({})  # the producer has not said where it ended: no stop
        input_end.set(stats.partition_ends)

    started = time.monotonic()
    ended = run_members(members, meanwhile=producer_ends)
    summaries = [member.summary for member in members]
    assert all(end - started < 30 for end in ended), ended  # both ended, not the 60-s idle
    # Once each: a member's revoke as the other joined finished its calls in flight first.
    assert sum(summary.frames_consumed for summary in summaries) == 40
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=40)
    assert Counter(result_keys(results)) == Counter(_frame_keys(stats))


def test_a_producer_started_again_keeps_its_results_apart_from_its_last_run(
    kafka, onnx_server
) -> None:
    """A camera's stream id is its stable name and each start numbers frames from 0: the
    session in the key keeps a restart's results from reading as duplicates of the last run's
    (which a downstream deduplicator would drop)."""
    first = _produce_clip(kafka, "cam-s", max_frames=6)
    again = _produce_clip(kafka, "cam-s", max_frames=6)
    assert first.session != again.session and len(first.session) == 8
    summary = _consumer(kafka, onnx_server.target, _ended(first, again)).run()
    assert summary.results_published == 12

    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=12)
    keys = result_keys(results)
    assert len(set(keys)) == 12 and set(keys) == _frame_keys(first) | _frame_keys(again)
    assert frame_key("cam-s", 0, again.session) == f"cam-s@{again.session}:0"
    frames = read_topic(kafka.bootstrap_servers, kafka.frames_topic, expected=12)
    assert {decode_frame(m.value(), m.headers()).session for m in frames} == {
        first.session,
        again.session,
    }
    with pytest.raises(FrameFormatError, match="vidflow-producer-session is too long"):
        headers = encode_frame_headers(Frame("c", 0, 1, 1, b"", session="s" * 65))
        assert (HEADER_SESSION, b"s" * 65) in headers
        decode_frame(b"", headers)
    # Keys read back one way only: no `:` in a session, no `@` in a stream id.
    with pytest.raises(FrameFormatError, match="session may hold letters, digits"):
        decode_frame(b"", encode_frame_headers(Frame("c", 0, 1, 1, b"", session="x:9")))
    with pytest.raises(FrameFormatError, match="holds '@', which parts the stream"):
        decode_frame(b"", encode_frame_headers(Frame("c@1a2b3c4d", 0, 1, 1, b"")))


@pytest.mark.faults
def test_a_corrupt_message_goes_to_the_dlq_and_the_consumer_goes_on(kafka, onnx_server) -> None:
    stats = _produce_clip(kafka, "cam-b", max_frames=20)
    produced = stats.frames_read
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    corrupt = Frame("cam-b", 999, time.time_ns(), time.time_ns(), b"\x00not a jpeg\x00" * 50)
    producer.produce(
        kafka.frames_topic, key=b"cam-b", value=corrupt.jpeg, headers=encode_frame_headers(corrupt)
    )
    producer.produce(kafka.frames_topic, key=b"cam-b", value=b"no headers at all")
    assert producer.flush(10) == 0
    summary = _consumer(kafka, onnx_server.target).run()
    assert summary.frames_consumed == produced + 2
    assert summary.results_published == produced
    assert summary.dlq == 2
    # A frame the service calls not an image is dead-lettered at its first answer: retried,
    # it held its partition's commit point through 3 calls and their backoff for nothing.
    assert summary.retries == 0 and summary.errors == 1

    dead = read_topic(kafka.bootstrap_servers, kafka.dlq_topic, expected=2)
    by_reason = sorted(dead, key=lambda m: dict(m.headers())[HEADER_DLQ_REASON])
    reasons = [dict(m.headers())[HEADER_DLQ_REASON].decode() for m in by_reason]
    assert "INVALID_ARGUMENT" in reasons[0] and "not an image" in reasons[0]
    assert "lacks header" in reasons[1]
    assert sorted(m.value() for m in dead) == sorted([corrupt.jpeg, b"no headers at all"])
    headers = dict(by_reason[0].headers())
    assert (
        headers[HEADER_DLQ_ATTEMPTS] == b"1" and headers[HEADER_DLQ_STATUS] == b"INVALID_ARGUMENT"
    )
    # Where each came from, to replay it once fixed: the frames topic, partition and offset.
    frames = read_topic(kafka.bootstrap_servers, kafka.frames_topic, expected=produced + 2)
    bad = {m.value() for m in dead}
    where = {f"{m.topic()}/{m.partition()}@{m.offset()}" for m in frames if m.value() in bad}
    assert {dict(m.headers())[HEADER_DLQ_SOURCE].decode() for m in dead} == where
    assert len(where) == 2
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=produced)
    assert set(result_keys(results)) == _frame_keys(stats)


@pytest.mark.faults
def test_a_frame_too_large_to_copy_with_its_reason_is_dead_lettered_without_its_bytes(
    kafka, onnx_server
) -> None:
    """A frame just under the size limit is over it with the dead-letter headers: librdkafka
    refused the copy at once, which ended the consumer (and every restart of it)."""
    near_limit = Frame("cam-l", 0, time.time_ns(), time.time_ns(), b"\x00not a jpeg" * 180)
    # Headers alone over the limit (a stream id of 3,000 characters): sent with its reason only.
    wide = Frame("c" * 3000, 1, time.time_ns(), time.time_ns(), b"x" * 10)
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    for frame in (near_limit, wide):
        producer.produce(
            kafka.frames_topic, key=b"cam-l", value=frame.jpeg, headers=encode_frame_headers(frame)
        )
    assert producer.flush(10) == 0
    tight = kafka.model_copy(update={"max_message_bytes": 2000})
    group = f"group-{uuid.uuid4().hex[:6]}"
    summary = _consumer(tight, onnx_server.target, group=group).run()
    # Its window ends at its last outcome, here a dead letter: it ran to its close (4.4 s,
    # its idle wait included) where no frame was classified, and the group's throughput over
    # the longest member's window read low.
    assert summary.duration_s < 2.0, summary.duration_s
    assert (summary.dlq, summary.frames_consumed) == (2, 2)
    dead = read_topic(kafka.bootstrap_servers, kafka.dlq_topic, expected=2)
    # Told apart by their dropped sizes: a copy without a key may land on any partition.
    first, second = sorted(dead, key=lambda m: -int(dict(m.headers())[HEADER_DLQ_VALUE_DROPPED]))
    headers = dict(first.headers())
    assert not first.value() and headers[HEADER_DLQ_VALUE_DROPPED] == b"1980"
    assert "not an image" in headers[HEADER_DLQ_REASON].decode()
    assert HEADER_STREAM_ID in headers and first.key() == b"cam-l"  # its own headers kept
    headers = dict(second.headers())
    assert not second.value() and second.key() is None and HEADER_STREAM_ID not in headers
    assert "too long" in headers[HEADER_DLQ_REASON].decode()
    assert headers[HEADER_DLQ_VALUE_DROPPED] == b"10"
    committed = committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2)
    assert committed == 2


@pytest.mark.faults
@pytest.mark.parametrize("budget_ms", [None, 1000.0])
def test_frame_headers_out_of_range_are_dead_lettered_not_fatal(
    kafka, onnx_server, budget_ms: float | None
) -> None:
    """Anyone who can produce to the topic writes the headers: a capture time of 400 digits
    ended the consumer with an OverflowError (and again on every restart, its offset never
    committed), with or without a latency budget."""
    produced = _produce_clip(kafka, "cam-h", max_frames=5).frames_read
    jpeg = load_encoded_images(CLIP, max_frames=1)[0]  # classified, were it not refused
    good = Frame("cam-h", 0, time.time_ns(), time.time_ns(), jpeg)
    hostile = [
        ("vidflow-capture-ts-ns", b"9" * 400),
        ("vidflow-frame-index", b"-1"),
        ("vidflow-stream-id", b"s" * 5000),
        ("vidflow-stream-id", None),  # a header with no value ended the consumer too
    ]
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    for name, value in hostile:
        headers = [(k, value if k == name else v) for k, v in encode_frame_headers(good)]
        producer.produce(kafka.frames_topic, key=b"cam-h", value=good.jpeg, headers=headers)
    assert producer.flush(10) == 0
    summary = _consumer(kafka, onnx_server.target, max_frame_age_ms=budget_ms).run()
    assert summary.frames_consumed == produced + len(hostile)
    assert summary.dlq == len(hostile)
    assert summary.results_published + summary.skipped_stale == produced
    dead = read_topic(kafka.bootstrap_servers, kafka.dlq_topic, expected=len(hostile))
    reasons = sorted(dict(m.headers())[HEADER_DLQ_REASON].decode() for m in dead)
    assert reasons == sorted(  # each hostile header named with what is wrong with it
        [
            "frame message header vidflow-capture-ts-ns is out of range",
            "frame message header vidflow-frame-index is out of range (-1)",
            "frame message header vidflow-stream-id is too long (5000 characters, at most 256)",
            "frame message header vidflow-stream-id has no value",
        ]
    ), reasons


@pytest.mark.slow
@pytest.mark.faults
def test_the_service_stops_mid_stream_and_no_frame_is_lost(
    kafka, tmp_path: Path, model_cache: Path
) -> None:
    port, http_port = free_ports(2)
    server: ServerProcess = start_server(tmp_path, model_cache, port=port, http_port=http_port)
    server.wait_serving()
    stats = _produce_clip(kafka, "cam-c")
    produced = stats.frames_read
    # The outage (a stop, 3 s, a start: 5-9 s on a loaded machine) is within the drain's stall
    # rule only by seconds: this test is about frames kept through it, not that rule.
    ended = _ended(stats, stall_s=60.0)
    consumer = _consumer(kafka, server.target, ended, concurrency=4, idle_timeout=8.0)
    outcome: dict[str, object] = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("summary", consumer.run()))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while consumer.summary.results_published < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert consumer.summary.results_published >= 40
        assert server.terminate() == 0  # the service goes away mid-stream...
        time.sleep(3)
        assert consumer.summary.results_published < produced
        server = start_server(tmp_path, model_cache, port=port, http_port=http_port)
        server.wait_serving()  # ...and comes back on the same address
        worker.join(180)
        assert not worker.is_alive()
    finally:
        consumer.stop.set()
        worker.join(30)
        server.terminate()
    summary = outcome["summary"]
    assert summary.errors > 0 and summary.retries > 0  # it did see the outage
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic, expected=produced)
    assert set(result_keys(results)) == _frame_keys(stats)


@pytest.mark.faults
@pytest.mark.slow
def test_a_killed_consumer_is_replaced_from_committed_offsets(
    kafka, onnx_server, tmp_path: Path
) -> None:
    group = f"group-{uuid.uuid4().hex[:6]}"
    produced: dict[str, ProduceStats] = {}
    producer_thread = threading.Thread(
        target=lambda: produced.setdefault("stats", _produce_clip(kafka, "cam-d", fps="native"))
    )
    producer_thread.start()  # 280 frames at 28 fps: a 10 s live stream
    log_path = tmp_path / "first-consumer.log"
    with open(log_path, "wb") as log_file:
        first = subprocess.Popen(
            [
                sys.executable, "-m", "vidflow.cli", "consume", "--log-level", "DEBUG",
                "--bootstrap-servers", kafka.bootstrap_servers, "--topic", kafka.frames_topic,
                "--results-topic", kafka.results_topic, "--dlq-topic", kafka.dlq_topic,
                "--group", group, "--target", onnx_server.target, "--duration", "60",
            ],
            cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (
            committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, kafka.partitions)
            < 60
        ):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert children(first.pid) == []  # a SIGKILL can orphan nothing
        first.kill()  # no goodbye: no final commit, no group leave
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    committed_at_kill = committed_offsets(
        kafka.bootstrap_servers, group, kafka.frames_topic, kafka.partitions
    )
    done_by_first = log_path.read_text().count("tasks.stream.publisher: frame")
    producer_thread.join(60)
    ended = _ended(produced["stats"])
    summary = _consumer(kafka, onnx_server.target, ended, group=group, idle_timeout=5.0).run()
    # The second member starts from the committed offsets, not from the beginning...
    assert summary.frames_consumed < CLIP_FRAMES, log_path.read_text()[-3000:]
    # ...and between them every frame has a result.
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic)
    assert set(result_keys(results)) == _frame_keys(produced["stats"])
    assert len(_frame_keys(produced["stats"])) == CLIP_FRAMES
    assert done_by_first >= 60
    # At least once, and twice only for frames past the commit point when the first was killed
    # (in flight, or answered but not yet committed).
    copies = Counter(result_keys(results))
    for result in map(FrameResult.from_json, (m.value() for m in results)):
        if copies[result.key] > 1:
            assert result.offset >= committed_at_kill[result.partition], result


def test_the_broker_command_starts_serves_and_stops_on_sigterm() -> None:
    port = free_port()
    broker = subprocess.Popen(
        [sys.executable, "-m", "vidflow.cli", "broker", "--port", str(port)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert broker.stdout.readline().startswith(f"broker ready on 127.0.0.1:{port}")
        created = ensure_topics(
            KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", partitions=3), ["smoke"]
        )
        assert created == ["smoke"]
    finally:
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(15) == 0
    with pytest.raises(OSError):  # nothing is left listening
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_the_broker_tells_clients_the_advertised_host() -> None:
    """`--host 0.0.0.0` told clients to reconnect to 0.0.0.0, which no other machine can reach;
    the address given out is now `--advertised-host`, or the machine's name for a wildcard."""
    from confluent_kafka.admin import AdminClient

    from devstack.broker import advertised_host

    assert advertised_host("0.0.0.0") == socket.gethostname()
    assert advertised_host("0.0.0.0", "gpu-box.lan") == "gpu-box.lan"
    assert advertised_host("127.0.0.1") == "127.0.0.1"
    port = free_port()
    broker = subprocess.Popen(
        [sys.executable, "-m", "vidflow.cli", "broker", "--port", str(port),
         "--advertised-host", "localhost"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert f"(clients told localhost:{port})" in broker.stdout.readline()
        metadata = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=15)
        assert {(b.host, b.port) for b in metadata.brokers.values()} == {("localhost", port)}
    finally:
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(15) == 0


def test_a_topic_is_read_to_its_end_where_the_broker_reports_the_end_low(kafka) -> None:
    """Tansu reports a partition's end as its last batch's first offset + 1: reading up to that
    left a run's last results unread (the capacity sweep's among them)."""
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 50})
    for index in range(12):  # one batch of 11 in partition 0, one of 1 in partition 1
        frame = Frame("cam-r", index, time.time_ns(), time.time_ns(), b"jpeg")
        result = stale_result(frame, partition=0, offset=index, age_ms=1.0)
        producer.produce(kafka.results_topic, key=result.key.encode(), value=result.to_json(),
                         partition=0 if index else 1)  # fmt: skip
    assert producer.flush(10) == 0
    # The fault is there: the broker says partition 0 ends before its 11 records do.
    assert partition_ends(kafka.bootstrap_servers, kafka.results_topic, 2)[0] < 11
    records = read_records(kafka, kafka.results_topic)
    assert sorted(r.frame_index for r in records) == list(range(12))
    assert read_records(kafka, kafka.dlq_topic) == []  # an empty topic: nothing, at once


def test_consumer_metrics_count_what_it_did(kafka, onnx_server) -> None:
    from prometheus_client import generate_latest

    stats = _produce_clip(kafka, "cam-m", max_frames=12)
    produced = stats.frames_read
    consumer = _consumer(kafka, onnx_server.target, _ended(stats))
    consumer.run()
    text = generate_latest(consumer.metrics.registry).decode()
    assert f"vidflow_consumer_frames_consumed_total {float(produced)}" in text
    assert f"vidflow_consumer_results_published_total {float(produced)}" in text
    assert 'vidflow_consumer_latency_seconds_count{stage="e2e"} ' + str(float(produced)) in text
    # The service's buckets and two more (its 10-s one was dropped: 5 s jumped to 30 s, where
    # a backlog's ages and the default call deadline fall).
    bounds = re.findall(r'vidflow_consumer_latency_seconds_bucket\{le="([^"]+)",stage="e2e"', text)
    assert bounds == [*map(str, LATENCY_BUCKETS_S), "30.0", "60.0", "+Inf"], bounds


def test_consumer_metrics_listen_on_loopback_only_by_default(kafka, tmp_path: Path) -> None:
    """`--metrics-port 0` (a free port) was taken, and the port bound said nowhere."""
    log = tmp_path / "consume.log"
    with open(log, "wb") as stderr:
        consume = subprocess.Popen(
            [
                sys.executable, "-m", "vidflow.cli", "consume", "--bootstrap-servers",
                kafka.bootstrap_servers, "--topic", kafka.frames_topic, "--results-topic",
                kafka.results_topic, "--dlq-topic", kafka.dlq_topic, "--duration", "60",
                "--target", f"127.0.0.1:{free_port()}", "--metrics-port", "0",
            ],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (said := re.search(r"serving /metrics on 127\.0\.0\.1:(\d+)", log.read_text())):
            assert time.monotonic() < deadline and consume.poll() is None, log.read_text()
            time.sleep(0.1)
        metrics_port = int(said.group(1))
        assert listening_addresses(metrics_port) == ["127.0.0.1"]  # not 0.0.0.0 or ::
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert b"vidflow_consumer_frames_consumed_total" in r.read()
    finally:
        consume.send_signal(signal.SIGTERM)
        try:
            code = consume.wait(30)
        finally:  # one that hangs on its way out is not left running after the test
            if consume.poll() is None:
                consume.kill()
                consume.wait(10)
    assert code == 0


@pytest.mark.usefixtures("restore_root_logging")
def test_a_topic_the_broker_will_not_create_is_said_in_one_line(
    kafka, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A replication factor over the cluster's brokers, a topic policy: confluent-kafka's
    KafkaException ended `produce` in a traceback, exit 1 (which says frames failed). Tansu
    makes any topic, so its refusal is the one made up here; the broker is real."""
    from concurrent.futures import Future

    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    from vidflow.cli import main

    class RefusingAdmin(AdminClient):
        def create_topics(self, new_topics, **_options):
            refused = KafkaError(KafkaError.INVALID_REPLICATION_FACTOR, "3 > 1 brokers")
            futures_ = {t.topic: Future() for t in new_topics}
            for future in futures_.values():
                future.set_exception(KafkaException(refused))
            return futures_

    monkeypatch.setattr("tasks.stream.topics.AdminClient", RefusingAdmin)
    code = main(["produce", "--bootstrap-servers", kafka.bootstrap_servers, "--topic",
                 f"new-{uuid.uuid4().hex[:8]}", "--replication-factor", "3",
                 "--source", str(CLIP)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "did not create topic" in err and "--replication-factor 3" in err, err
    assert "INVALID_REPLICATION_FACTOR: 3 > 1 brokers" in err, err


def test_a_broker_that_speaks_another_protocol_is_not_only_called_unreachable(kafka) -> None:
    """SASL to the plaintext broker read "unreachable for 15 s" of a broker that was up."""
    sasl = kafka.model_copy(
        update={"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u",
                "sasl_password": SecretStr("p")}
    )  # fmt: skip
    with pytest.raises(BrokerUnreachableError, match="or it does not speak SASL_PLAINTEXT"):
        ensure_topics(sasl, timeout_s=3)
    ensure_topics(kafka, timeout_s=10)  # the broker is up: it answers plaintext


def test_a_closed_terminal_stops_produce_and_consume_with_their_summaries(kafka) -> None:
    """SIGHUP (an SSH session dropped) killed both at once: the producer's queued frames lost
    uncounted, no summary from either. It now stops them as Ctrl-C does."""
    flags = ["--bootstrap-servers", kafka.bootstrap_servers, "--topic", kafka.frames_topic,
             "--results-topic", kafka.results_topic, "--dlq-topic", kafka.dlq_topic]  # fmt: skip
    cli = [sys.executable, "-m", "vidflow.cli"]
    commands = {
        "produce": [*cli, "produce", *flags, "--source", str(CLIP), "--fps", "30", "--loop"],
        "consume": [
            *cli,
            "consume",
            *flags,
            "--duration",
            "120",
            "--target",
            f"127.0.0.1:{free_port()}",
        ],
    }
    runs = {
        name: subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, command in commands.items()
    }
    try:
        deadline = time.monotonic() + 60
        while sum(partition_ends(kafka.bootstrap_servers, kafka.frames_topic, 2)) < 10:
            assert time.monotonic() < deadline and all(r.poll() is None for r in runs.values())
            time.sleep(0.2)
        for run in runs.values():
            run.send_signal(signal.SIGHUP)
        outputs = {name: run.communicate(timeout=60) for name, run in runs.items()}
    finally:
        for run in runs.values():
            run.kill()
    out, err = outputs["produce"]
    assert runs["produce"].returncode == 0, err[-3000:]
    stats = json.loads(out.strip().splitlines()[-1])
    published = sum(partition_ends(kafka.bootstrap_servers, kafka.frames_topic, 2))
    assert stats["frames_read"] == stats["delivered"] == published > 0, stats
    out, err = outputs["consume"]
    # Ended with its summary (exit 0, or 1 where it had frames no service answered), not
    # killed by the signal (-1, nothing printed).
    assert runs["consume"].returncode in (0, 1), err[-3000:]
    assert out.startswith("frames consumed"), (out, err[-2000:])
