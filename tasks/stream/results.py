"""Reads a finished run's result records back from its results topic."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from tasks.stream.frame_codec import FrameResult
from tasks.stream.settings import KafkaSettings


def read_records(kafka: KafkaSettings, topic: str, timeout_s: float = 60.0) -> list[FrameResult]:
    """Every result record on `topic` (on the broker `kafka` names) up to its end now, in no set
    order."""
    return [FrameResult.from_json(m.value()) for m in read_messages(kafka, topic, timeout_s)]


def read_messages(kafka: KafkaSettings, topic: str, timeout_s: float = 60.0) -> list[Message]:
    """Every message on `topic` up to its end now, in no set order.

    Assigns the partitions directly (no group to join: that alone takes seconds) and reads each
    to its high watermark, then on until a poll finds nothing more: Tansu, the local broker,
    reports a partition's end as its last batch's first offset + 1 (so a run's last results
    were left unread), and Kafka reports it right. A finished run is read in full without
    waiting for an idle timeout."""
    reader = Consumer(
        {
            **kafka.client_config(),
            "group.id": f"results-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": kafka.fetch_wait_max_ms,
        }
    )
    try:
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        ends: dict[int, int] = {}
        for partition in partitions:
            _, high = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high > 0:
                ends[partition] = high
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = reader.poll(0.2)
            if message is None and not ends:
                break  # past every end the broker reported, and nothing more came
            if message is None or message.error():
                continue
            messages.append(message)
            if message.offset() + 1 >= ends.get(message.partition(), 0):
                ends.pop(message.partition(), None)
        if ends:
            raise TimeoutError(f"{topic}: partitions {sorted(ends)} not read to the end")
        return messages
    finally:
        reader.close()
