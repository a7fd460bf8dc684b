"""Reading topics back in tests."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Message, TopicPartition

from tasks.stream.frame_codec import FrameResult


def read_topic(
    bootstrap_servers: str, topic: str, expected: int | None = None, idle_s: float = 3.0
) -> list[Message]:
    """A topic's messages from the start, until `expected` are read or none come for idle_s."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )
    consumer.subscribe([topic])
    messages: list[Message] = []
    last = time.monotonic()
    deadline = last + 120
    while time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is None or message.error():
            # The group join alone takes seconds: only count idle time once something arrived.
            if messages and time.monotonic() - last > idle_s:
                break
            if not messages and time.monotonic() - last > idle_s + 10:
                break
            continue
        messages.append(message)
        last = time.monotonic()
        if expected is not None and len(messages) >= expected:
            break
    consumer.close()
    return messages


def result_keys(messages: list[Message]) -> list[str]:
    return [FrameResult.from_json(m.value()).key for m in messages]


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
