"""Reading topics back in tests."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from tasks.stream.frame_codec import FrameResult, frame_key
from tasks.stream.results import read_messages
from tasks.stream.settings import KafkaSettings


def read_topic(
    bootstrap_servers: str, topic: str, expected: int | None = None, idle_s: float = 3.0
) -> list[Message]:
    """A topic's messages from the start: all there are now, and with `expected`, more as they
    come until there are that many, or none has come for `idle_s` (10 s more before the first)."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap_servers)
    messages = read_messages(kafka, topic)
    last_change, deadline = time.monotonic(), time.monotonic() + 120
    while expected is not None and len(messages) < expected and time.monotonic() < deadline:
        waited_s = time.monotonic() - last_change
        if waited_s > idle_s + (0 if messages else 10):
            break
        time.sleep(0.1)
        more = read_messages(kafka, topic)
        if len(more) > len(messages):
            messages, last_change = more, time.monotonic()
    return messages


def result_keys(messages: list[Message]) -> list[str]:
    return [FrameResult.from_json(m.value()).key for m in messages]


def produced_keys(per_stream: dict[str, int], session: str) -> set[str]:
    """The result keys of every frame a produce run published (its stats' `per_stream` and
    `session`)."""
    return {frame_key(stream, i, session) for stream, n in per_stream.items() for i in range(n)}


def committed_offsets(
    bootstrap_servers: str, group: str, topic: str, partitions: int
) -> dict[int, int]:
    """The group's committed offset of each partition of the topic (0: none), asked of the
    broker."""
    reader = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": group})
    try:
        offsets = reader.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=5)
    finally:
        reader.close()
    return {tp.partition: max(0, tp.offset) for tp in offsets}


def committed_total(bootstrap_servers: str, group: str, topic: str, partitions: int) -> int:
    """The group's committed offsets summed over the topic's partitions, asked of the broker."""
    return sum(committed_offsets(bootstrap_servers, group, topic, partitions).values())


def partition_ends(bootstrap_servers: str, topic: str, partitions: int) -> list[int]:
    """Each partition's high watermark, as the broker reports it (Tansu's run 2 low)."""
    reader = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": "watermarks"})
    try:
        return [
            reader.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
            for p in range(partitions)
        ]
    finally:
        reader.close()


def stream_benchmark_run(kafka: KafkaSettings, target: str, *flags: str) -> list[str]:
    """`vidflow stream-benchmark FLAGS` as a process, on `kafka`'s topics against the service at
    `target` (its environment: `stream_benchmark_env`)."""
    return [
        sys.executable, "-m", "vidflow.cli", "stream-benchmark", *flags,
        "--bootstrap-servers", kafka.bootstrap_servers, "--frames-topic", kafka.frames_topic,
        "--results-topic", kafka.results_topic, "--dlq-topic", kafka.dlq_topic,
        "--target", target,
    ]  # fmt: skip


def stream_benchmark_env() -> dict[str, str]:
    """This environment, with the test session's Prefect API (`prefect_api`) for the run."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}


def run_members(members: list[Any], meanwhile: Callable[[], None] = lambda: None) -> list[float]:
    """Run consumer-group members (FrameConsumer) on threads of their own until they end,
    `meanwhile` once they have started: when each ended (monotonic, in member order; nan for
    one that did not). A failure leaves no member running into the next tests."""
    ended = [math.nan] * len(members)

    def run(index: int) -> None:
        members[index].run()
        ended[index] = time.monotonic()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(members))]
    for thread in threads:
        thread.start()
    try:
        meanwhile()
        for thread in threads:
            thread.join(timeout=90)
    finally:
        for member in members:
            member.stop.set()
        for thread in threads:
            thread.join(timeout=60)
    return ended
