"""The stream under faults: a poison frame, a service that is down, a broker that dies, kills.

The broker is the real local Tansu; the service is a real gRPC server on 127.0.0.1 that
implements the Classifier service of protos/ and answers what the test tells it to for a frame
(the real service has no input that fails for good once its own fixes are in).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest
from confluent_kafka import Producer

from protos import inference_pb2, inference_pb2_grpc
from tasks.consumer import HEADER_DLQ_ATTEMPTS, HEADER_DLQ_STATUS, FrameConsumer
from tasks.frame_codec import HEADER_DLQ_REASON, Frame, encode_frame_headers, frame_key
from tests.kafka_helpers import committed_total, read_topic, result_keys
from vidflow.config import ConsumerSettings, KafkaSettings

# What the test server does with one request: None classifies it, a status code fails it.
Behaviour = Callable[[inference_pb2.ClassifyRequest, int], grpc.StatusCode | None]


class ScriptedClassifier(inference_pb2_grpc.ClassifierServicer):
    """A Classifier that fails the requests `behaviour` names and classifies the rest."""

    def __init__(self, behaviour: Behaviour, delay_s: float = 0.0) -> None:
        self.behaviour, self.delay_s = behaviour, delay_s
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def Classify(self, request, context):  # the generated method's name
        with self._lock:
            self.calls[request.request_id] += 1
            attempt = self.calls[request.request_id]
        time.sleep(self.delay_s)
        code = self.behaviour(request, attempt)
        if code is not None:
            context.abort(code, f"scripted {code.name} for {request.request_id}")
        return inference_pb2.ClassifyResponse(
            request_id=request.request_id,
            predictions=[inference_pb2.Prediction(label="scripted", class_index=1, score=0.5)],
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
