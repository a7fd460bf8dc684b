"""The `stream-benchmark` flow: topics -> producer + consumers -> summary -> artifacts.

With `capacity=True` it sweeps the number of live streams instead (flows/stream_capacity.py).
Runs against an inference service that is already up (`vidflow serve`) and a Kafka-protocol
broker (`vidflow broker`, Redpanda or Kafka).
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from common.files import FolderNotWritableError, check_writable_folder
from flows import artifact_keys
from flows.capacity_rules import check_step_judges
from flows.run_artifacts import record_each
from flows.run_failure import failed_state
from flows.run_logs import logs_in_run
from flows.stream_capacity import capacity_sweep, source_format
from flows.stream_failures import (
    BrokerLostDuringRunError,
    FramesUndeliveredError,
    GroupStalledError,
    NothingAnsweredError,
    NothingConsumedError,
    NothingReadError,
    ResultsUndeliveredError,
    SourceLostError,
    StreamRunFailedError,
    broker_lost,
)
from flows.stream_settings import (
    FLOW_THREADS,
    StreamBenchmarkSettings,
    check_tuning,
    flow_consumer_settings,
    flow_producer_settings,
)
from services.inference.client import (
    ServiceUnreachableError,
    wait_until_reachable,
    wait_until_serving,
)
from tasks.stream.consumer_summary import nothing_answered
from tasks.stream.frame_codec import new_session
from tasks.stream.prefect_tasks import DRAIN_S, RUN_STOP, group_deadline_s, run_producer_and_group
from tasks.stream.producer import check_sources
from tasks.stream.settings import source_list
from tasks.stream.topics import BrokerUnreachableError, TopicNotCreatedError, check_broker

log = logging.getLogger(__name__)
TABLE_COLUMNS = ("stage", "p50", "p90", "p99", "max", "mean")


def latency_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Percentiles of each stage, in ms; none (not 0.0, which reads as measured) for a stage
    with no sample, as when the service answered nothing."""
    return [
        {
            "stage": name.removesuffix("_ms"),
            **{
                k: summary[name][k] if summary[name]["count"] else None
                for k in ("p50", "p90", "p99", "max", "mean")
            },
        }
        for name in ("inference_ms", "rpc_ms", "e2e_ms")
    ]


def _shown(value: Any) -> str:
    return "-" if value is None else str(value)


def markdown_report(
    summary: dict[str, Any], produced: dict[str, Any], settings: dict[str, Any]
) -> str:
    rows = "\n".join(
        "| " + " | ".join(_shown(row[column]) for column in TABLE_COLUMNS) + " |"
        for row in latency_table(summary)
    )
    setting_rows = "\n".join(
        f"| {k} | {'off' if v is None else f'`{v}`'} |" for k, v in settings.items()
    )
    lag = "unknown (broker lost)" if summary["lag"] is None else summary["lag"]
    outcomes = {
        "skipped as stale": summary["skipped_stale"], "dead-lettered": summary["dlq"],
        "handed over": summary.get("handed_over", 0), "unanswered": summary["unanswered"],
        "failed calls and deliveries": summary["errors"],
        "not delivered by producer": produced["failed"], "lag at end": lag,
    }  # fmt: skip
    outcome_rows = "\n".join(f"| {name} | {count} |" for name, count in outcomes.items())
    warnings = _warnings(summary, produced)
    return f"""# Stream benchmark

{warnings}**Throughput: {summary["fps"]:.1f} frames/s** over {summary["duration_s"]:.1f} s
({summary["results_published"]} results and {summary["skipped_stale"]} skipped as stale from
{summary["frames_consumed"]} frames consumed; {produced["frames_read"]} produced at
{produced["fps"]:.1f} fps).

## Latency (ms)

| stage | p50 | p90 | p99 | max | mean |
| --- | --- | --- | --- | --- | --- |
{rows}

`inference`: the model call on the server; `rpc`: the consumer's gRPC round trip;
`e2e`: from frame capture to its result, as the consumer hands the record to Kafka (a slow
results broker adds its delay after that).

## Errors

| outcome | frames |
| --- | --- |
{outcome_rows}

Every frame consumed has one outcome: a result, a stale record (older than the latency budget
when its call was due), a dead letter, `handed over` (its partition went to another member of
the group in a rebalance before it was answered: that member gives it its outcome), or
`unanswered` (consumed, but no record got out: left uncommitted for the group to redo).
`failed calls and deliveries`: inference calls that failed (then retried or dead-lettered),
and results or dead letters the broker did not take.

## Settings

| setting | value |
| --- | --- |
{setting_rows}
"""


@flow(
    name="stream-benchmark",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=FLOW_THREADS),
)
def stream_benchmark(
    settings: StreamBenchmarkSettings | None = None,
) -> dict[str, Any] | State[dict[str, Any]]:
    """Stream a video through Kafka and the inference service; report throughput and latency.

    With `capacity`: instead, find how many live streams of the source hold real time within the
    latency budget `max_frame_age_ms` (default 100 ms), stepping up to `max_streams`, each step
    `step_seconds` on fresh topics; the chart goes under `output_dir`. Fields of `settings.kafka`
    and `settings.client` left out come from VIDFLOW_KAFKA_* and VIDFLOW_INFERENCE_*, then the
    defaults. A run that lost the broker, or whose frames the service never answered, ends
    Failed with its report recorded; calling the flow then raises StreamRunFailedError, whose
    `outcome` holds the figures. A broker that never answered ends it Failed with that reason
    (BrokerUnreachableError), as does a service that answered nothing at all
    (ServiceUnreachableError)."""
    settings = settings or StreamBenchmarkSettings()
    with logs_in_run("tasks.stream"), logs_in_run(__name__):
        try:  # the command checked them already; a run from a deployment or the UI has not
            check_inputs(settings)
        except (ValueError, OSError) as bad_input:
            return failed_state(bad_input)
        try:
            check_stack(settings)
            if settings.capacity:
                return capacity_sweep(settings)
            return _benchmark(settings)
        except (
            StreamRunFailedError, BrokerUnreachableError, ServiceUnreachableError,
            FolderNotWritableError, TopicNotCreatedError,
        ) as failure:  # fmt: skip
            return failed_state(failure)


def check_inputs(settings: StreamBenchmarkSettings) -> None:
    """Raise ValueError (or OSError) for a run's own bad inputs, before a broker, a service or
    a group is asked: a missing source or one with no video frame, a bad `VIDFLOW_CONSUMER_*` /
    `VIDFLOW_PRODUCER_*` value, a source whose own rate is too slow for a sweep's steps to
    judge. The command runs it before it starts a Prefect server, the flow again for a run
    started from a deployment (which ended in a traceback, or Completed with 0 frames)."""
    check_sources(settings.source)
    check_tuning(settings)
    if settings.capacity:
        check_step_judges(source_format(settings.source, settings.fps)[2], settings.step_seconds)


def check_stack(settings: StreamBenchmarkSettings) -> None:
    """Raise BrokerUnreachableError or ServiceUnreachableError where nothing is there: a run
    would otherwise produce for its whole length (a sweep step after step) and fail at the end.
    A service still loading its model counts as there (a capacity sweep waits `load_wait_s` for
    it to serve). Checked once, at the start: a service
    lost mid-sweep fails its steps, and the sweep still reports the ones it finished. A sweep's
    chart folder that cannot be written: FolderNotWritableError, before its first step."""
    if settings.capacity:
        check_writable_folder(settings.output_dir)
    check_broker(settings.kafka)
    client = settings.client
    status = wait_until_reachable(client.target, settings.service_wait_s, client.tls_ca)
    # Its first steps would measure the loading. A target with no health service (a proxy in
    # front of it) is taken as it is, as one run and `loadtest` take it: it never says SERVING.
    if settings.capacity and status not in ("SERVING", "UNIMPLEMENTED"):
        log.info("waiting up to %g s for the inference service at %s to load its model (%s)",
                 settings.load_wait_s, client.target, status)  # fmt: skip
        try:
            wait_until_serving(client.target, settings.load_wait_s, client.tls_ca)
        except TimeoutError as exc:
            raise ServiceUnreachableError(
                f"{exc}: a capacity sweep measures a service that serves (one loading its model, "
                "or answering NOT_SERVING, would set the capacity at 0)"
            ) from None


def _benchmark(settings: StreamBenchmarkSettings) -> dict[str, Any]:
    """One run of the stream: its figures as artifacts and its outcome, or the failure."""
    produced, summary, group = run_once(settings)
    shown = {
        "source": settings.shown_source, "streams": settings.streams, "loop": settings.loop,
        "max_frames": settings.max_frames, "duration_s": settings.duration, "fps": settings.fps,
        "target": settings.client.target, "bootstrap_servers": settings.kafka.bootstrap_servers,
        "consumers": settings.consumers, "consumer_concurrency": settings.concurrency,
        "group": group, "frames_topic": settings.kafka.frames_topic,
        "max_frame_age_ms": settings.max_frame_age_ms,
    }  # fmt: skip
    publish_artifacts(summary, produced, shown)
    e2e = summary["e2e_ms"]
    latency = f"e2e p50 {e2e['p50']:.1f} ms p99 {e2e['p99']:.1f} ms" if e2e["count"] else "no e2e"
    get_run_logger().info(
        "stream benchmark: %.1f fps, %s, %d results, %d dlq, %d errors",
        summary["fps"], latency, summary["results_published"], summary["dlq"], summary["errors"],
    )  # fmt: skip
    outcome = {"summary": summary, "producer": produced, "settings": shown}
    _raise_if_failed(outcome, settings)
    return outcome


def _raise_if_failed(outcome: dict[str, Any], settings: StreamBenchmarkSettings) -> None:
    """The run's failure, if it had one, carrying its figures: a run that measured less than
    it says (a lost broker or source, no frame classified, a service that stopped answering)
    must not end Completed with figures that read as a healthy run's."""
    summary, produced = outcome["summary"], outcome["producer"]
    if lost := broker_lost(summary, produced):
        raise BrokerLostDuringRunError(
            f"the broker was lost during the run ({lost}); the report covers the run until then",
            outcome,
        )
    if lost_source := produced.get("source_error"):
        raise SourceLostError(f"{lost_source}; the report covers the run until then", outcome)
    _raise_if_nothing_went_through(outcome, settings)
    if undelivered := summary.get("delivery_error"):
        raise ResultsUndeliveredError(
            f"a consumer stopped: {undelivered}; the frames after it stay uncommitted", outcome
        )
    if nothing_answered(summary):
        raise NothingAnsweredError(
            f"not one of the {summary['frames_consumed']} frames consumed (of "
            f"{produced['delivered']} the producer delivered) was answered ({summary['errors']} "
            f"failed calls): is the inference service at {settings.client.target} up and right? "
            "The consumer's warnings in this run's log say why the calls failed",
            outcome,
        )
    if summary["frames_consumed"] and not summary["results_published"]:
        raise NothingAnsweredError(
            f"none of the {summary['frames_consumed']} frames consumed was classified: "
            f"{summary['dlq']} went to the dead-letter topic {settings.kafka.dlq_topic} (their "
            f"headers say why), {summary['skipped_stale']} were skipped as older than "
            "--max-frame-age-ms; the run measured no classification",
            outcome,
        )
    if summary["stalled"]:
        raise GroupStalledError(
            f"the group answered {summary['outcomes']} of the {produced['delivered']} frames "
            f"the producer delivered, then nothing for {DRAIN_S:g} s: is the inference service at "
            f"{settings.client.target} still up? {summary['unanswered']} consumed frame(s) were "
            "left unanswered (uncommitted); the report covers the run until then",
            outcome,
        )
    if summary["unanswered"] and not RUN_STOP.is_set():  # a deadline, not a drain, ended it
        raise GroupStalledError(
            f"the group ended at its deadline with {summary['unanswered']} consumed frame(s) "
            f"unanswered or unpublished (uncommitted): did the inference service at "
            f"{settings.client.target} stop answering, or the results broker taking them? The "
            "figures cover the frames answered before",
            outcome,
        )


def _raise_if_nothing_went_through(
    outcome: dict[str, Any], settings: StreamBenchmarkSettings
) -> None:
    """The run's failure where no frame went from the source through the broker to the group."""
    summary, produced = outcome["summary"], outcome["producer"]
    # Decoded, not published: a frame the producer's client refused at once (over the size
    # limit) was read all the same, and is the broker's failure below.
    if not produced["frames_decoded"] and not produced["failed"] and not RUN_STOP.is_set():
        raise NothingReadError(
            f"the producer read no frame from {settings.shown_source} (a stream that sent "
            "none, a file whose frames do not decode): the run measured nothing",
            outcome,
        )
    if produced["failed"] and not produced["delivered"]:
        raise FramesUndeliveredError(
            f"the broker took none of the producer's frames ({produced['failed']} failed; the "
            "producer's errors in this run's log say why: a message size limit, an ACL)",
            outcome,
        )
    if produced["delivered"] and not summary["frames_consumed"] and not RUN_STOP.is_set():
        raise NothingConsumedError(
            f"the broker took {produced['delivered']} frames, and the consumer group read none: "
            "did its members get the topic's partitions? (a group coordinator the broker could "
            "not give, a group ACL; the consumers' warnings in this run's log say why)",
            outcome,
        )


def run_once(settings: StreamBenchmarkSettings) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The producer and the consumer group side by side on the run's topics: what the producer
    did, the group's merged summary, and the group's id."""
    kafka, client = settings.kafka, settings.client
    cameras = len(source_list(settings.source)) * settings.streams
    busy = min(cameras, kafka.partitions)  # a camera's frames stay in one partition
    consumer_settings = flow_consumer_settings(
        group=settings.group or f"stream-benchmark-{uuid.uuid4().hex[:8]}",
        concurrency=settings.concurrency,
        group_members=min(settings.consumers, busy),  # those with work share the service
        duration=group_deadline_s(settings.duration),
        idle_timeout=5.0,
        max_frame_age_ms=settings.max_frame_age_ms,
        # A new group starts at the topic's first frame: an earlier run's frames were counted
        # (and their age in the latencies), and so were those of another producer writing to
        # the topic meanwhile. A group given by name goes on where it was.
        produced_since_ms=None if settings.group else int(time.time() * 1000),
        producer_session=None if settings.group else new_session(),
    )
    producer_settings = flow_producer_settings(
        source=settings.source, fps=settings.fps, loop=settings.loop,
        max_frames=settings.max_frames, streams=settings.streams,
    )  # fmt: skip
    if settings.consumers > busy:
        get_run_logger().warning(
            "%d consumers share %d camera(s) on %d partition(s): only %d consumer(s) get work "
            "(--streams N replays the source as N cameras; VIDFLOW_KAFKA_PARTITIONS)",
            settings.consumers, cameras, kafka.partitions, busy,
        )  # fmt: skip
    # A group given by name reads on until idle: it also drains what an earlier run left.
    produced, summary = run_producer_and_group(
        kafka, producer_settings, settings.duration, consumer_settings, settings.consumers, client,
        read_on_until_idle=bool(settings.group),
    )  # fmt: skip
    stopped_otherwise = RUN_STOP.is_set() or summary.delivery_error or summary.broker_error
    if summary.lag and (settings.group or produced.frames_end() is None) and not stopped_otherwise:
        # No end to drain to: a deadline ends it (another producer on the topic would keep it
        # busy for ever), and what it left was said nowhere but in "lag at end".
        get_run_logger().warning(
            "the group stopped at its deadline (%g s from its start) with %d frame(s) of the "
            "topic unread: a named group, or a run whose producer could not say where its "
            "frames end, reads on until 5 s idle or that deadline",
            consumer_settings.duration, summary.lag,
        )  # fmt: skip
    return produced.as_dict(), summary.as_dict(), consumer_settings.group


def _warnings(summary: dict[str, Any], produced: dict[str, Any]) -> str:
    """The report's opening warnings: why its figures cover less than the run."""
    lost = broker_lost(summary, produced)
    warning = f"**BROKER LOST: {lost}**; the figures cover the run until then.\n\n" if lost else ""
    if lost_source := produced.get("source_error"):
        warning += f"**SOURCE LOST: {lost_source}**; the figures cover the run until then.\n\n"
    if undelivered := summary.get("delivery_error"):
        warning += (
            f"**A CONSUMER STOPPED: {undelivered}**; the frames after it stay uncommitted.\n\n"
        )
    if summary.get("unanswered") and not summary.get("stalled"):
        warning += (
            f"**{summary['unanswered']} FRAME(S) UNANSWERED** at the group's end (uncommitted): "
            "the figures cover the frames answered.\n\n"
        )
    if produced["delivered"] and not summary["frames_consumed"]:
        warning += "**THE GROUP READ NO FRAME** of those the broker took.\n\n"
    if summary.get("stalled"):
        warning += (
            "**THE SERVICE STOPPED ANSWERING** before the group had answered every frame: "
            "the figures cover the run until then.\n\n"
        )
    return warning


def publish_artifacts(
    summary: dict[str, Any], produced: dict[str, Any], shown: dict[str, Any]
) -> None:
    """The latency table and the markdown report, as artifacts of the flow run (each recorded
    whether or not the other could be: the run's figures are not lost for either)."""
    record_each(
        [
            functools.partial(
                create_table_artifact,
                key=artifact_keys.STREAM_LATENCY,
                table=latency_table(summary),
                description=(
                    f"Latency percentiles (ms) of {summary['e2e_ms']['count']} classified frames; "
                    f"{summary['fps']:.1f} frames/s"
                ),
            ),
            functools.partial(
                create_markdown_artifact,
                key=artifact_keys.STREAM_REPORT,
                markdown=markdown_report(summary, produced, shown),
                description="Throughput, latency breakdown, errors and settings",
            ),
        ]
    )
