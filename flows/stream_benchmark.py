"""The `stream-benchmark` flow: topics -> producer + consumers -> summary -> artifacts.

With `capacity=True` it sweeps the number of live streams instead (flows/stream_capacity.py).
Runs against an inference service that is already up (`vidflow serve`) and a Kafka-protocol
broker (`vidflow broker`, Redpanda or Kafka).
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from common.settings import SAMPLE_VIDEO
from flows.capacity_rules import DEFAULT_BUDGET_MS
from flows.stream_capacity import SweepSettings, capacity_sweep
from tasks.stream.consumer import merge_summaries
from tasks.stream.prefect_tasks import DRAIN_S, create_topics, run_consumer, run_producer
from tasks.stream.settings import ConsumerSettings, KafkaSettings, ProducerSettings

TABLE_COLUMNS = ("stage", "p50", "p90", "p99", "max", "mean")


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
    max_frame_age_ms: float | None = None,
    capacity: bool = False,
    step_seconds: float = 10.0,
    max_streams: int = 16,
    output_dir: str = "runs/stream-benchmark",
) -> dict[str, Any]:
    """Stream a video through Kafka and the inference service; report throughput and latency.

    `capacity`: instead, find how many live streams of the source hold real time within the
    latency budget `max_frame_age_ms` (default 100 ms), stepping up to `max_streams`, each step
    `step_seconds` on fresh topics; the chart goes under `output_dir`."""
    logger = get_run_logger()
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap_servers,
        frames_topic=frames_topic,
        results_topic=results_topic,
        dlq_topic=dlq_topic,
    )
    if capacity:
        sweep = SweepSettings(
            kafka=kafka, source=source, fps=fps, target=target,
            tls_ca=tls_ca and Path(tls_ca), consumers=consumers,
            concurrency=consumer_concurrency, step_seconds=step_seconds,
            budget_ms=DEFAULT_BUDGET_MS if max_frame_age_ms is None else max_frame_age_ms,
        )  # fmt: skip
        return capacity_sweep(sweep, max_streams, Path(output_dir))
    consumer_settings = ConsumerSettings(
        group=group or f"stream-benchmark-{uuid.uuid4().hex[:8]}",
        concurrency=consumer_concurrency,
        duration=duration + DRAIN_S,
        idle_timeout=5.0,
        max_frame_age_ms=max_frame_age_ms,
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
