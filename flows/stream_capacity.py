"""The capacity mode of `stream-benchmark`: how many live streams this box keeps in real time.

Each step replays the source as N live cameras (one producer, `streams=N`, each at the source's
pacing) for `step_seconds` into fresh topics, with the consumer group classifying under the
latency budget (`max_frame_age_ms`); the step's figures come from its result records. A count
that fails gets `step_tries` tries in all and fails only if each does. The stream count doubles
until a count fails, then bisects (flows/capacity_rules.py). The sweep is
recorded as a table artifact and a markdown report with a chart, also written as a PNG file.
"""

from __future__ import annotations

import functools
import uuid
from pathlib import Path
from typing import Any

import cv2
from confluent_kafka import KafkaException
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows import artifact_keys
from flows.capacity_chart import capacity_chart_png, png_data_uri
from flows.capacity_rules import (
    MIN_FPS_RATIO,
    WARMUP_S,
    StepFigures,
    capacity,
    deciding_steps,
    holds,
    next_streams,
    shortfalls,
    step_figures,
    verdict_line,
)
from flows.run_artifacts import record_each
from flows.stream_failures import (
    BrokerLostDuringRunError,
    FramesUndeliveredError,
    GroupStalledError,
    NothingAnsweredError,
    NothingConsumedError,
    ResultsUndeliveredError,
    StepRunFailedError,
    StreamRunFailedError,
)
from flows.stream_settings import (
    LIVE_REFUSED,
    StreamBenchmarkSettings,
    flow_consumer_settings,
    flow_producer_settings,
    refuse_live_for_capacity,
)
from tasks.stream.consumer_summary import ConsumerSummary
from tasks.stream.live_source import has_no_end
from tasks.stream.prefect_tasks import (
    DRAIN_S,
    RUN_STOP,
    group_deadline_s,
    run_producer_and_group,
)
from tasks.stream.producer import ProduceStats, open_source, target_fps
from tasks.stream.results import read_records
from tasks.stream.settings import KafkaSettings, source_list
from tasks.stream.topics import BrokerUnreachableError, delete_topics, topic_names

# A step's consumers stop once they have answered every frame its producer delivered; this long
# after the last frame where the producer cannot say where its frames end.
IDLE_TIMEOUT_S = 3.0


def source_format(source: str, fps: str) -> tuple[int, int, float]:
    """Width, height and the per-stream frame rate a step paces at (the source's when native)."""
    [one] = source_list(source)  # the settings refuse several for a sweep
    refuse_live_for_capacity([one])  # an env:NAME source is known only now
    with open_source(one) as capture:
        if has_no_end(one, capture):  # an IP camera's http(s) stream: live, as rtsp:// is
            raise ValueError(LIVE_REFUSED)
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        pace = target_fps(fps, capture)
    if pace is None:
        raise ValueError("capacity mode paces each stream like a camera: --fps max does not apply")
    return width, height, pace


def step_kafka(base: KafkaSettings, streams: int, consumers: int = 1) -> KafkaSettings:
    """Fresh topics for one step, with a partition per stream (at least the base's count),
    rounded up to a multiple of the consumers: members take partitions in turn, and only then
    do a step's cameras, on consecutive partitions, reach every member alike."""
    suffix = f"cap{streams}-{uuid.uuid4().hex[:8]}"
    partitions = -(-max(base.partitions, streams) // consumers) * consumers
    return base.with_fresh_topics(suffix, partitions=partitions)


def run_step(sweep: StreamBenchmarkSettings, streams: int) -> tuple[StepFigures, dict[str, str]]:
    """One step: `streams` live cameras for step_seconds, read back from its results topic;
    and the step's topics left on the broker (`kept_topics`)."""
    kafka = step_kafka(sweep.kafka, streams, sweep.consumers)
    consumer_settings = flow_consumer_settings(
        group=f"capacity-{kafka.frames_topic}",
        concurrency=sweep.concurrency,
        group_members=min(sweep.consumers, streams, kafka.partitions),  # those with work
        duration=group_deadline_s(sweep.step_seconds),
        idle_timeout=IDLE_TIMEOUT_S,
        max_frame_age_ms=sweep.budget_ms,
    )
    producer_settings = flow_producer_settings(
        source=sweep.source, fps=sweep.fps, loop=True, streams=streams, stream_id="camera"
    )
    step = f"{streams} stream{'s' if streams > 1 else ''}: "  # task runs named by step and part
    summary = None
    try:
        produced, summary = run_producer_and_group(
            kafka, producer_settings, sweep.step_seconds, consumer_settings, sweep.consumers,
            sweep.client, label=step,
        )  # fmt: skip
        _raise_if_step_failed(sweep, step[:-2], produced, summary)
        try:
            records = read_records(kafka, kafka.results_topic)
        except KafkaException as exc:  # gone as the step ended
            raise StepBrokerLostError(f"the broker was lost after the step of {step[:-2]} "
                                      f"({exc.args[0].str()})") from exc  # fmt: skip
    except BaseException as ended:  # a lost broker, a failed member: the run fails, its frames go
        # What it left on the broker goes with the error, for the sweep's `topics`.
        ended.kept_topics = kept_topics(  # type: ignore[attr-defined]
            sweep, kafka, summary.dlq if summary is not None else None, timeout_s=5.0
        )
        raise
    figures = step_figures(streams, produced.target_fps or 0.0, records, produced.per_stream,
                           produced.frames_read, summary.lag)  # fmt: skip
    return figures, kept_topics(sweep, kafka, dead_letters=summary.dlq)


def _raise_if_step_failed(
    sweep: StreamBenchmarkSettings, step: str, produced: ProduceStats, summary: ConsumerSummary
) -> None:
    """The step's failure, where it measured something else than this box's capacity: the
    sweep ends there and the run fails (a step where nothing went through read "0 streams")."""
    if lost := produced.broker_error or summary.broker_error:  # nothing left to read back
        raise StepBrokerLostError(f"the broker was lost in the step of {step} ({lost})")
    if undelivered := summary.delivery_error:  # its figures would read as a count failing
        raise StepUndeliveredError(f"a consumer stopped in the step of {step}: {undelivered}")
    if produced.failed:  # frames the broker never took: the step measured the broker
        raise StepFramesUndeliveredError(
            f"the producer could not deliver {produced.failed} frame(s) in the step of "
            f"{step} (its log says why): the step would measure the broker, not this box"
        )
    if produced.delivered and not summary.frames_consumed and not RUN_STOP.is_set():
        raise StepNothingConsumedError(  # found in review, stop 62: it read "0 streams"
            f"the broker took {produced.delivered} frames in the step of {step}, and the "
            "consumer group read none: did its members get the topic's partitions? (a group "
            "coordinator the broker could not give, a group ACL; the consumers' warnings say why)"
        )
    classified_none = summary.frames_consumed and not summary.results_published
    if classified_none and (summary.errors or summary.dlq or not summary.skipped_stale):
        raise StepNothingAnsweredError(  # a service gone, or one that answers no frame
            f"the service at {sweep.client.target} classified none of the "
            f"{summary.frames_consumed} frames of the step of {step} ({summary.errors} failed "
            f"calls, {summary.dlq} dead-lettered; the consumers' warnings in the run's log say "
            "why)"
        )
    if summary.stalled:  # its figures would cover the step until then only
        raise StepStalledError(
            f"the service at {sweep.client.target} stopped answering in the step of "
            f"{step}: {summary.outcomes} of the {produced.delivered} frames answered, "
            f"then none for {DRAIN_S:g} s"
        )


class StepEndedError(RuntimeError):
    """A step that could not be measured: the sweep ends there, and the run fails with
    `failure`, its report covering the steps before."""

    failure: type[StreamRunFailedError] = BrokerLostDuringRunError


class StepBrokerLostError(StepEndedError):
    """A step's producer or consumers gave up on the broker."""


class StepUndeliveredError(StepEndedError):
    """A consumer stopped: the results topic refused a result for good (the broker up)."""

    failure = ResultsUndeliveredError


class StepFramesUndeliveredError(StepEndedError):
    """The broker refused the step's frames (a size limit, an ACL) with the broker up."""

    failure = FramesUndeliveredError


class StepNothingConsumedError(StepEndedError):
    """The broker took the step's frames and the group read none (no partitions for it)."""

    failure = NothingConsumedError


class StepNothingAnsweredError(StepEndedError):
    """Every call of the step failed: the service is gone, or answers no frame."""

    failure = NothingAnsweredError


class StepStalledError(StepEndedError):
    """The service stopped answering before the step's frames were all answered."""

    failure = GroupStalledError


class StepFailedError(StepEndedError):
    """Any other fault of a step (a source that no longer opens, a topic not made)."""

    failure = StepRunFailedError


def kept_topics(
    sweep: StreamBenchmarkSettings,
    kafka: KafkaSettings,
    dead_letters: int | None,
    timeout_s: float = 15.0,
) -> dict[str, str]:
    """Delete a step's topics once read, unless `keep_step_topics`: on the local broker, which
    keeps every message in memory, a default sweep left hundreds of MB behind. A dead-letter
    topic with letters in it stays (or whose letters are not known: None, a step that failed
    before its count), as does any topic the broker would not delete."""
    topics = {"frames": kafka.frames_topic, "results": kafka.results_topic, "dlq": kafka.dlq_topic}
    if sweep.keep_step_topics:
        return topics
    if dead_letters is None:  # a step that failed making its topics has none to keep
        on_broker = topic_names(kafka, timeout_s)
        dead_letters = 0 if on_broker is not None and kafka.dlq_topic not in on_broker else None
    doomed = [name for role, name in topics.items() if role != "dlq" or dead_letters == 0]
    if dead_letters:
        get_run_logger().warning(
            "dead-letter topic %s keeps its %d message(s)", kafka.dlq_topic, dead_letters
        )
    elif dead_letters is None:
        get_run_logger().warning("dead-letter topic %s kept: the step ended before its letters "
                                 "were counted", kafka.dlq_topic)  # fmt: skip
    left = set(delete_topics(kafka, doomed, timeout_s))
    return {role: name for role, name in topics.items() if name not in doomed or name in left}


def sweep_rows(steps: list[StepFigures], budget_ms: float) -> list[dict[str, Any]]:
    """The table artifact's rows, one per step in order of stream count."""
    rows = []
    for step in sorted(steps, key=lambda s: (s.streams, s.attempt)):
        reasons = shortfalls(step, budget_ms)
        rows.append(
            {
                "streams": step.streams,
                "try": step.attempt,
                "fps_min": round(step.fps_min, 2),
                "fps_mean": round(step.fps_mean, 2),
                # none classified: no figure (0.0 ms would read as a measurement)
                "e2e_p50_ms": step.e2e_p50_ms if step.classified else None,
                "e2e_p99_ms": step.e2e_p99_ms if step.classified else None,
                "stale_skips": step.skipped_stale,
                "no_result": step.without_outcome,
                "lag_at_end": "unknown" if step.lag_at_end is None else step.lag_at_end,
                "holds": "no" if reasons else "yes",
                "why_not": "; ".join(reasons),
            }
        )
    return rows


def capacity_report(
    verdict: str,
    rows: list[dict[str, Any]],
    png: bytes,
    chart_path: Path | None,
    sweep: StreamBenchmarkSettings,
) -> str:
    """The markdown artifact: the verdict, the rule, the chart inline and the sweep's table."""
    columns = list(rows[0]) if rows else []
    table = "\n".join(
        ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        + ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    )
    return f"""# Stream capacity

**{verdict}**

A step holds real time when every stream's results arrive at >= {MIN_FPS_RATIO} of its source
fps, the end-to-end p99 of classified frames is within {sweep.budget_ms:g} ms, no frame is
skipped as stale (the consumers skip frames older than {sweep.budget_ms:g} ms) and every frame
has a result; frames captured in a step's first {WARMUP_S:g} s are warm-up, not judged (the
`no_result` column counts the whole step). Each step:
{sweep.step_seconds:g} s of live streams from `{sweep.shown_source}`, {sweep.consumers} consumer(s)
with at most {sweep.concurrency} calls in flight each (under the budget no more than the service
works on at once, plus one, shared by the consumers), against `{sweep.client.target}`.

![per-stream fps and e2e p99 against live streams]({png_data_uri(png)})

Chart file: {f"`{chart_path}`" if chart_path else "not written (see the run's log)"}

{table}
"""


def _run_step_or_end(
    sweep: StreamBenchmarkSettings, streams: int
) -> tuple[StepFigures, dict[str, str]]:
    """`run_step`; any other fault of the step (a source that no longer opens, a topic not
    made) raised as StepFailedError, so the sweep so far is reported all the same."""
    try:
        return run_step(sweep, streams)
    except (StepEndedError, BrokerUnreachableError):
        raise
    except Exception as exc:
        get_run_logger().exception("the step of %d streams failed", streams)
        failure = StepFailedError(
            f"the step of {streams} streams failed: {type(exc).__name__}: {exc}"
        )
        failure.kept_topics = getattr(exc, "kept_topics", {})  # type: ignore[attr-defined]
        raise failure from exc


def _step_line(figures: StepFigures) -> str:
    p99 = f"e2e p99 {figures.e2e_p99_ms:.1f} ms" if figures.classified else "none classified"
    return (
        f"slowest {figures.fps_min:.2f} fps, mean {figures.fps_mean:.2f} fps, {p99}, "
        f"{figures.skipped_stale} stale, lag {figures.lag_at_end}"
    )


def capacity_sweep(sweep: StreamBenchmarkSettings) -> dict[str, Any]:
    """Find the largest number of live streams that holds real time (up to `max_streams`);
    record the sweep, its chart under `output_dir`."""
    logger = get_run_logger()
    width, height, fps = source_format(sweep.source, sweep.fps)  # judged by check_inputs
    outcomes: dict[int, bool] = {}
    steps: list[StepFigures] = []
    topics: list[dict[str, Any]] = []  # the steps' topics left on the broker
    streams = next_streams(outcomes, sweep.max_streams)
    stopped, ended = False, None
    while streams is not None and not stopped:
        # A count fails only when every one of its tries fails: a one-off stall of a shared
        # machine (a p99 past the budget in one 10 s window) should not set the capacity.
        for attempt in range(1, sweep.step_tries + 1):
            if stopped := RUN_STOP.is_set():  # Ctrl-C between steps: no new step is set up
                logger.warning("stopped before the step of %d streams: reporting the sweep so far",
                               streams)  # fmt: skip
                break
            try:
                figures, kept = _run_step_or_end(sweep, streams)
            except (StepEndedError, BrokerUnreachableError) as exc:  # the rest reported
                ended, stopped = exc, True
                logger.error("%s: reporting the sweep so far", exc)
                if kept := getattr(exc, "kept_topics", None):  # what the failed step left
                    topics.append({"streams": streams, "try": attempt, **kept})
                break
            if kept:
                topics.append({"streams": streams, "try": attempt, **kept})
            if stopped := RUN_STOP.is_set():  # Ctrl-C: a step cut short is not judged
                logger.warning("stopped during the step of %d streams: reporting the sweep so far",
                               streams)  # fmt: skip
                break
            figures.attempt = attempt
            reasons = shortfalls(figures, sweep.budget_ms)
            steps.append(figures)
            logger.info(
                "%d streams (try %d): %s: %s", streams, attempt, _step_line(figures),
                "; ".join(reasons) or "holds",
            )  # fmt: skip
            if not reasons:
                break
        if not stopped:
            outcomes[streams] = not reasons
            streams = next_streams(outcomes, sweep.max_streams)
    failed_at = streams if ended is not None else None
    result = sweep_result(sweep, outcomes, steps, (width, height, fps), failed_at)
    result["topics"] = topics
    if ended is not None:
        failure = getattr(ended, "failure", BrokerLostDuringRunError)
        raise failure(f"{ended}; the sweep's report covers the steps before it", result)
    return result


def sweep_result(
    sweep: StreamBenchmarkSettings,
    outcomes: dict[int, bool],
    steps: list[StepFigures],
    source: tuple[int, int, float],
    failed_at: int | None = None,
) -> dict[str, Any]:
    """The sweep's verdict and figures, its chart and artifacts published (`failed_at`: the
    stream count whose step failed and ended the sweep)."""
    held = capacity(outcomes)
    unfinished = next_streams(outcomes, sweep.max_streams) is not None
    # For a verdict of none held: why the one stream's deciding try did not hold.
    one_failed = shortfalls(deciding_steps(steps)[0], sweep.budget_ms) if steps else None
    width, height, fps = source
    verdict = verdict_line(
        held, width, height, fps, sweep.max_streams, unfinished, one_failed, failed_at
    )
    chart_path = publish_sweep(sweep, steps, verdict)
    get_run_logger().info("capacity: %s (chart %s)", verdict, chart_path)
    return {
        "capacity": held,
        "verdict": verdict,
        "budget_ms": sweep.budget_ms,
        "source": {"width": width, "height": height, "fps": fps},
        "steps": [{**s.as_dict(), "holds": holds(s, sweep.budget_ms)} for s in steps],
        "chart": str(chart_path) if chart_path else None,
    }


def publish_sweep(
    sweep: StreamBenchmarkSettings, steps: list[StepFigures], verdict: str
) -> Path | None:
    """The sweep's chart as a PNG file (its path returned; None if it could not be written),
    and its table and report as artifacts of the flow run."""
    png = capacity_chart_png(deciding_steps(steps), sweep.budget_ms, verdict)
    chart_name = f"capacity-{flow_run.id or uuid.uuid4().hex[:8]}.png"
    chart_path: Path | None = (sweep.output_dir / chart_name).resolve()
    try:
        sweep.output_dir.mkdir(parents=True, exist_ok=True)
        chart_path.write_bytes(png)
    except OSError as exc:  # a full disk: the sweep's record and verdict are not lost for it
        get_run_logger().warning("the chart could not be written to %s (%s); it is in the "
                                 "report artifact", chart_path, exc)  # fmt: skip
        chart_path = None
    rows = sweep_rows(steps, sweep.budget_ms)
    record_each([  # a refused report (its chart inline is large) costs the sweep nothing else
        functools.partial(
            create_table_artifact, key=artifact_keys.CAPACITY_TABLE, table=rows,
            description=verdict,
        ),
        functools.partial(
            create_markdown_artifact, key=artifact_keys.CAPACITY_REPORT,
            markdown=capacity_report(verdict, rows, png, chart_path, sweep), description=verdict,
        ),
    ])  # fmt: skip
    return chart_path
