"""The `stream-benchmark` flow: topics -> producer + consumers -> summary -> artifacts.

Runs against an inference service that is already up (`vidflow serve`) and a Kafka-protocol
broker (`vidflow broker`, Redpanda or Kafka).
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.consumer import ConsumerSummary, FrameConsumer, merge_summaries
from tasks.producer import ProduceStats, produce_frames
from tasks.topics import ensure_topics
from vidflow.config import SAMPLE_VIDEO, ConsumerSettings, KafkaSettings, ProducerSettings

TABLE_COLUMNS = ("stage", "p50", "p90", "p99", "max", "mean")
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


def latency_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "stage": name.removesuffix("_ms"),
            **{k: summary[name][k] for k in ("p50", "p90", "p99", "max", "mean")},
        }
        for name in ("inference_ms", "rpc_ms", "e2e_ms")
    ]


def markdown_report(
    summary: dict[str, Any], produced: dict[str, Any], settings: dict[str, Any]
) -> str:
    rows = "\n".join(
        "| " + " | ".join(str(row[column]) for column in TABLE_COLUMNS) + " |"
        for row in latency_table(summary)
    )
    setting_rows = "\n".join(f"| {k} | `{v}` |" for k, v in settings.items())
    lag = "unknown (broker lost)" if summary["lag"] is None else summary["lag"]
    return f"""# Stream benchmark

**Throughput: {summary["fps"]:.1f} frames/s** over {summary["duration_s"]:.1f} s
({summary["results_published"]} results from {summary["frames_consumed"]} frames consumed;
{produced["frames_read"]} produced at {produced["fps"]:.1f} fps).

## Latency (ms)

| stage | p50 | p90 | p99 | max | mean |
| --- | --- | --- | --- | --- | --- |
{rows}

`inference`: the model call on the server; `rpc`: the consumer's gRPC round trip;
`e2e`: from frame capture to the result being published.

## Errors

| dead-lettered | unanswered | failed attempts (retried) | not delivered by producer | lag at end |
| --- | --- | --- | --- | --- |
| {summary["dlq"]} | {summary["unanswered"]} | {summary["errors"]} | {produced["failed"]} | {lag} |

`unanswered`: consumed, but no result or dead letter got out (left uncommitted for the group
to redo).

## Settings

| setting | value |
| --- | --- |
{setting_rows}
"""


@flow(name="stream-benchmark", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16))
def stream_benchmark(
    source: str = str(SAMPLE_VIDEO),
    duration: float = 30.0,
    fps: str = "native",
    target: str = "127.0.0.1:50051",
    tls_ca: str | None = None,
    bootstrap_servers: str = "127.0.0.1:9092",
    consumer_concurrency: int = 8,
    consumers: int = 1,
    loop: bool = True,
    max_frames: int | None = None,
    frames_topic: str = "frames",
    results_topic: str = "predictions",
    dlq_topic: str = "frames.dlq",
    group: str | None = None,
) -> dict[str, Any]:
    """Stream a video through Kafka and the inference service; report throughput and latency."""
    logger = get_run_logger()
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap_servers,
        frames_topic=frames_topic,
        results_topic=results_topic,
        dlq_topic=dlq_topic,
    )
    consumer_settings = ConsumerSettings(
        group=group or f"stream-benchmark-{uuid.uuid4().hex[:8]}",
        concurrency=consumer_concurrency,
        duration=duration + DRAIN_S,
        idle_timeout=5.0,
    )
    producer_settings = ProducerSettings(source=source, fps=fps, loop=loop, max_frames=max_frames)

    topics = create_topics(kafka)
    ready = [threading.Event() for _ in range(consumers)]
    consumer_runs = [
        run_consumer.submit(
            kafka, consumer_settings, target, ready[i], tls_ca and Path(tls_ca), wait_for=[topics]
        )
        for i in range(consumers)
    ]
    producer_run = run_producer.submit(kafka, producer_settings, duration, ready, wait_for=[topics])

    produced = producer_run.result().as_dict()
    summary = merge_summaries([run.result() for run in consumer_runs]).as_dict()
    settings = {
        "source": source, "duration_s": duration, "fps": fps, "target": target,
        "bootstrap_servers": bootstrap_servers, "consumers": consumers,
        "consumer_concurrency": consumer_concurrency, "group": consumer_settings.group,
        "frames_topic": frames_topic,
    }  # fmt: skip
    create_table_artifact(
        key="stream-benchmark-latency",
        table=latency_table(summary),
        description=f"Latency percentiles (ms); {summary['fps']:.1f} frames/s",
    )
    create_markdown_artifact(
        key="stream-benchmark-report",
        markdown=markdown_report(summary, produced, settings),
        description="Throughput, latency breakdown, errors and settings",
    )
    logger.info(
        "stream benchmark: %.1f fps, e2e p50 %.1f ms p99 %.1f ms, %d results, %d dlq, %d errors",
        summary["fps"], summary["e2e_ms"]["p50"], summary["e2e_ms"]["p99"],
        summary["results_published"], summary["dlq"], summary["errors"],
    )  # fmt: skip
    return {"summary": summary, "producer": produced, "settings": settings}
