"""Reads a finished run's result records back from its results topic."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from tasks.stream.frame_codec import FrameResult
from tasks.stream.settings import KafkaSettings


def read_records(kafka: KafkaSettings, topic: str, timeout_s: float = 60.0) -> list[FrameResult]:
    """Every result record on `topic` (on the broker `kafka` names) up to its end now (its high
    watermarks), in no set order.

    Assigns the partitions directly (no group to join) and stops at each partition's end, so a
    finished run is read in full without waiting for an idle timeout."""
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
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        records: list[FrameResult] = []
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            message = reader.poll(0.2)
            if message is None or message.error():
                continue
            records.append(FrameResult.from_json(message.value()))
            if message.offset() + 1 >= ends.get(message.partition(), 0):
                ends.pop(message.partition(), None)
        if ends:
            raise TimeoutError(f"{topic}: partitions {sorted(ends)} not read to the end")
        return records
    finally:
        reader.close()
