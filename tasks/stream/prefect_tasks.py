"""The stream runs' building blocks as Prefect tasks: topics, one consumer, one producer."""

from __future__ import annotations

import threading
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.stream.consumer import ConsumerSummary, FrameConsumer
from tasks.stream.producer import ProduceStats, produce_frames
from tasks.stream.settings import ConsumerSettings, KafkaSettings, ProducerSettings
from tasks.stream.topics import ensure_topics

# Consumers get this long beyond the producer's duration to finish the frames in flight.
DRAIN_S = 10.0


@task(retries=3, retry_delay_seconds=2)
def create_topics(kafka: KafkaSettings) -> list[str]:
    return ensure_topics(
        kafka.bootstrap_servers,
        kafka.topics,
        kafka.partitions,
    )


@task(cache_policy=NO_CACHE)
def run_consumer(
    kafka: KafkaSettings,
    settings: ConsumerSettings,
    target: str,
    assigned: threading.Event,
    tls_ca: Path | None = None,
) -> ConsumerSummary:
    consumer = FrameConsumer(kafka, settings, target, tls_ca=tls_ca)
    watcher = threading.Thread(
        target=lambda: consumer.assigned.wait(settings.duration) and assigned.set(), daemon=True
    )
    watcher.start()
    return consumer.run()


@task(cache_policy=NO_CACHE)
def run_producer(
    kafka: KafkaSettings,
    settings: ProducerSettings,
    duration_s: float,
    consumers_ready: list[threading.Event],
) -> ProduceStats:
    for ready in consumers_ready:  # frames sent before the group has joined would only queue up
        ready.wait(60)
    stop = threading.Event()
    timer = threading.Timer(duration_s, stop.set)
    timer.start()
    try:
        return produce_frames(settings, kafka, stop)
    finally:
        timer.cancel()
