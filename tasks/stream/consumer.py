"""`vidflow consume`: a consumer-group member that classifies frames through the gRPC service.

Up to `concurrency` inference calls are in flight. Each frame's result goes to the results topic;
a message that is not a decodable frame goes to the dead-letter topic with the reason in a
header. Offsets are committed only once the result (or dead-letter copy) of every earlier
message of the partition is delivered: at least once, never lost. While the service is
unavailable, calls are retried with exponential backoff and nothing is dropped; a frame the
service fails on otherwise (INTERNAL, ...) is tried `--max-attempts` times, then dead-lettered
with its status, details and attempt count, so the group moves on past it. A broker gone for
longer than `--broker-grace-s` ends the run with `broker_error` set; the summary then counts the
frames consumed whose result never got out (`unanswered`): uncommitted, so the group redoes them.

With a latency budget (`--max-frame-age-ms`), a frame already older than the budget when its
inference call is due (first call or retry) is not classified: it gets a result record with
`skipped="stale"` and its age, and its offset is committed like a result's, so latency stays
bounded under overload and every frame still has exactly one outcome.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from common.stats import summarize_ms
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import open_channel
from tasks.stream.broker_watch import BrokerLostError, BrokerWatch
from tasks.stream.consumer_metrics import ConsumerMetrics
from tasks.stream.frame_codec import (
    HEADER_DLQ_REASON,
    HEADER_DLQ_SOURCE,
    Frame,
    FrameFormatError,
    FrameResult,
    decode_frame,
    stale_result,
)
from tasks.stream.offsets import OffsetTracker
from tasks.stream.producer import make_producer
from tasks.stream.settings import ConsumerSettings, KafkaSettings

log = logging.getLogger(__name__)

# The service is down or restarting, not the frame's fault: wait for it, however long it takes.
WAIT_FOR_SERVICE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
# The frame itself is the problem: retrying cannot help.
DEAD_LETTER = {grpc.StatusCode.INVALID_ARGUMENT}
# Any other status (INTERNAL, UNKNOWN, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...) may be a
# passing hiccup or a frame the service cannot classify: retried up to --max-attempts, then
# dead-lettered, so one poison frame cannot hold its partition's commit point for ever.
HEADER_DLQ_STATUS = "vidflow-dlq-status"
HEADER_DLQ_ATTEMPTS = "vidflow-dlq-attempts"
PROGRESS_EVERY_S = 5.0
COMMIT_EVERY_S = 0.5
# Messages taken per pass of the loop at most: skipping a backlog of stale frames needs no
# inference slot, and completions must still be handled meanwhile.
ADMIT_PER_PASS = 256


@dataclass
class _Call:
    """One frame on its way through the service."""

    message: Message
    frame: Frame
    attempt: int = 0  # failed calls so far, whatever the status (sets the backoff)
    counted: int = 0  # failed calls that count towards --max-attempts (not the service's outages)
    sent_at: float = 0.0
    retry_at: float = 0.0


@dataclass
class ConsumerSummary:
    frames_consumed: int = 0
    results_published: int = 0  # classified frames; the latencies below are theirs only
    skipped_stale: int = 0  # frames past the latency budget, recorded as skipped
    dlq: int = 0
    errors: int = 0
    retries: int = 0
    duration_s: float = 0.0
    lag: int | None = 0  # None: unknown (the broker was gone at the end)
    broker_error: str | None = None
    inference_ms: list[float] = field(default_factory=list)
    rpc_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.results_published / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def unanswered(self) -> int:
        """Frames consumed whose result (or dead-letter copy) was never delivered."""
        return max(0, self.frames_consumed - self.results_published - self.skipped_stale - self.dlq)

    @property
    def skipped_fraction(self) -> float:
        """Of the frames with an outcome, the part skipped as stale."""
        outcomes = self.results_published + self.skipped_stale + self.dlq
        return self.skipped_stale / outcomes if outcomes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames_consumed": self.frames_consumed,
            "results_published": self.results_published,
            "skipped_stale": self.skipped_stale,
            "skipped_fraction": round(self.skipped_fraction, 4),
            "dlq": self.dlq,
            "errors": self.errors,
            "retries": self.retries,
            "fps": round(self.fps, 2),
            "duration_s": round(self.duration_s, 3),
            "lag": self.lag,
            "unanswered": self.unanswered,
            "broker_error": self.broker_error,
            "inference_ms": summarize_ms(self.inference_ms),
            "rpc_ms": summarize_ms(self.rpc_ms),
            "e2e_ms": summarize_ms(self.e2e_ms),
        }


class FrameConsumer:
    """The consume -> classify -> publish -> commit loop of one group member (one thread)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: ConsumerSettings,
        target: str,
        stop: threading.Event | None = None,
        tls_ca: Path | None = None,
    ) -> None:
        self.kafka, self.settings, self.target = kafka, settings, target
        self.stop = stop or threading.Event()
        self.assigned = threading.Event()  # set once the group gave this member partitions
        self.metrics = ConsumerMetrics()
        self.summary = ConsumerSummary()
        self.offsets = OffsetTracker()
        self._completions: queue.Queue[tuple[_Call, grpc.Future]] = queue.Queue()
        self._in_flight = 0
        self._waiting_retry: deque[_Call] = deque()
        self._assigned_at: float | None = None  # idle time counts only once partitions are ours
        self._last_result_at: float | None = None
        self._owned: set[tuple[str, int]] = set()  # kept by the rebalance callbacks
        self.broker = BrokerWatch(kafka.bootstrap_servers, kafka.broker_grace_s)
        self._consumer = Consumer(
            {
                "bootstrap.servers": kafka.bootstrap_servers,
                "group.id": settings.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": kafka.session_timeout_ms,
                "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
                "fetch.wait.max.ms": kafka.fetch_wait_max_ms,
                "fetch.max.bytes": max(kafka.max_message_bytes, 52428800),
                "max.partition.fetch.bytes": kafka.max_message_bytes,
                **self.broker.client_config(),
            }
        )
        self._producer: Producer = make_producer(self.kafka, self.broker)
        self._channel = open_channel(target, tls_ca)  # TLS when the service's CA is given
        self._stub = inference_pb2_grpc.ClassifierStub(self._channel)

    # ---- rebalancing ----------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = time.monotonic()
        self._owned |= {(p.topic, p.partition) for p in partitions}
        self.assigned.set()
        log.info("assigned partitions %s", [p.partition for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is delivered for partitions we lose; the rest goes to the next owner.

        With the broker gone (the group revokes after a session timeout) nothing can be
        delivered or committed: waiting would only hold up the loop that notices the loss."""
        if not self.broker.down:
            self._producer.flush(10)
            self._commit()
        lost = {(p.topic, p.partition) for p in partitions}
        self._owned -= lost
        self.offsets.forget(list(lost))
        log.info("revoked partitions %s", [p.partition for p in partitions])

    # ---- one frame ------------------------------------------------------------------------

    def _send(self, call: _Call) -> None:
        call.sent_at = time.perf_counter()
        request = inference_pb2.ClassifyRequest(image=call.frame.jpeg, request_id=call.frame.key)
        future = self._stub.Classify.future(request, timeout=self.settings.rpc_timeout_s)
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        future.add_done_callback(lambda done: self._completions.put((call, done)))

    def _admit(self, message: Message) -> None:
        self.summary.frames_consumed += 1
        self.metrics.frames_consumed.inc()
        self.offsets.started(message.topic(), message.partition(), message.offset())
        try:
            frame = decode_frame(message.value(), message.headers())
        except FrameFormatError as exc:
            self._dead_letter(message, str(exc))
            return
        call = _Call(message, frame)
        if not self._skipped_as_stale(call):
            self._send(call)

    def _skipped_as_stale(self, call: _Call) -> bool:
        """Publish a stale record instead of calling the service if the frame is past the
        budget; say whether it did."""
        budget = self.settings.max_frame_age_ms
        if budget is None:
            return False
        age_ms = (time.time_ns() - call.frame.capture_ts_ns) / 1e6
        if age_ms <= budget:
            return False
        message = call.message
        record = stale_result(call.frame, message.partition(), message.offset(), age_ms)

        def delivered() -> None:
            self.summary.skipped_stale += 1
            self.metrics.skipped_stale.inc()

        log.debug("frame %s skipped: %.1f ms old", record.key, age_ms)
        self._publish(
            self.kafka.results_topic, record.key.encode(), record.to_json(), None,
            self._finish_callback(message, delivered),
        )  # fmt: skip
        return True

    def _finish_callback(self, message: Message, on_ok=None):
        topic, partition, offset = message.topic(), message.partition(), message.offset()

        def on_delivery(error: KafkaError | None, _delivered: Message) -> None:
            if error is not None:  # not lost: the offset stays uncommitted and is redone later
                self.summary.errors += 1
                self.metrics.errors.labels("publish").inc()
                log.error("publishing for %s/%d@%d failed: %s", topic, partition, offset, error)
                return
            self.offsets.finished(topic, partition, offset)
            if on_ok is not None:
                on_ok()

        return on_delivery

    def _dead_letter(
        self, message: Message, reason: str, extra_headers: tuple[tuple[str, bytes], ...] = ()
    ) -> None:
        log.warning(
            "dead-lettering %s/%d@%d: %s",
            message.topic(), message.partition(), message.offset(), reason,
        )  # fmt: skip
        headers = [
            *(message.headers() or []),
            (HEADER_DLQ_REASON, reason.encode()),
            (
                HEADER_DLQ_SOURCE,
                f"{message.topic()}/{message.partition()}@{message.offset()}".encode(),
            ),
            *extra_headers,
        ]

        def counted() -> None:
            self.summary.dlq += 1
            self.metrics.dead_lettered.inc()

        self._publish(
            self.kafka.dlq_topic, message.key(), message.value(), headers,
            self._finish_callback(message, counted),
        )  # fmt: skip

    def _publish(self, topic: str, key, value, headers, on_delivery) -> None:
        while True:
            try:
                self._producer.produce(
                    topic, key=key, value=value, headers=headers, on_delivery=on_delivery
                )
                return
            except BufferError:
                self._producer.poll(0.05)
                self.broker.check()

    def _complete(self, call: _Call, future: grpc.Future) -> None:
        self._in_flight -= 1
        self.metrics.in_flight.set(self._in_flight)
        rpc_s = time.perf_counter() - call.sent_at
        try:
            response = future.result()
        except grpc.RpcError as exc:
            self._failed(call, exc)
            return
        if (call.message.topic(), call.message.partition()) not in self._owned:
            return  # revoked while in flight: the new owner redoes it
        best = response.predictions[0]
        result_ts_ns = time.time_ns()
        result = FrameResult(
            stream_id=call.frame.stream_id,
            frame_index=call.frame.frame_index,
            label=best.label,
            class_index=best.class_index,
            score=round(best.score, 6),
            model_name=response.model_name,
            capture_ts_ns=call.frame.capture_ts_ns,
            result_ts_ns=result_ts_ns,
            inference_ms=round(response.timings.inference_ms, 3),
            rpc_ms=round(rpc_s * 1e3, 3),
            e2e_ms=round((result_ts_ns - call.frame.capture_ts_ns) / 1e6, 3),
            partition=call.message.partition(),
            offset=call.message.offset(),
        )

        def delivered() -> None:
            self._last_result_at = time.monotonic()
            summary = self.summary
            summary.results_published += 1
            summary.inference_ms.append(result.inference_ms)
            summary.rpc_ms.append(result.rpc_ms)
            summary.e2e_ms.append(result.e2e_ms)
            self.metrics.results_published.inc()
            for stage in ("inference", "rpc", "e2e"):
                self.metrics.latency_seconds.labels(stage).observe(
                    getattr(result, f"{stage}_ms") / 1e3
                )

        log.debug(
            "frame %s: %s %.3f inference %.1f ms rpc %.1f ms e2e %.1f ms",
            result.key, result.label, result.score, result.inference_ms, result.rpc_ms,
            result.e2e_ms,
        )  # fmt: skip
        self._publish(
            self.kafka.results_topic, result.key.encode(), result.to_json(), None,
            self._finish_callback(call.message, delivered),
        )  # fmt: skip

    def _failed(self, call: _Call, exc: grpc.RpcError) -> None:
        """Dead-letter, or retry with backoff: the service's outages without limit, else a few
        times. A frame not retried yet when this member stops keeps its offset uncommitted."""
        code = exc.code()
        self.summary.errors += 1
        self.metrics.errors.labels(code.name.lower()).inc()
        if (call.message.topic(), call.message.partition()) not in self._owned:
            return  # revoked while in flight: the new owner redoes it
        call.attempt += 1
        if code not in WAIT_FOR_SERVICE:
            call.counted += 1
        if code in DEAD_LETTER or call.counted >= self.settings.max_attempts:
            self._dead_letter(
                call.message,
                f"{code.name}: {exc.details()} (attempts: {call.attempt})",
                (
                    (HEADER_DLQ_STATUS, code.name.encode()),
                    (HEADER_DLQ_ATTEMPTS, str(call.attempt).encode()),
                ),
            )
            return
        self.summary.retries += 1
        backoff = min(self.settings.retry_max_backoff_s, 0.1 * 2 ** min(call.attempt, 10))
        call.retry_at = time.monotonic() + backoff * random.uniform(0.5, 1.0)
        if call.attempt == 1 or call.attempt % 10 == 0:
            log.warning(
                "inference call for %s failed (%s: %s); retrying, attempt %d",
                call.frame.key, code.name, exc.details(), call.attempt,
            )  # fmt: skip
        self._waiting_retry.append(call)

    # ---- the loop -------------------------------------------------------------------------

    def _commit(self, wait: bool = True) -> None:
        """Commit while running in the background (points that moved), or wait for all points.

        A background commit that fails is not retried by itself; the waiting commit on a
        rebalance and at the end sends every point again, so nothing done is left uncommitted.
        """
        offsets = self.offsets.to_commit(only_moved=not wait)
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=not wait)
            self.offsets.mark_committed(offsets)
        except Exception as exc:  # e.g. during a rebalance; the next commit catches up
            log.warning("offset commit failed: %s", exc)

    def _lag(self) -> int:
        total = 0
        for tp in self._consumer.assignment():
            try:
                _, high = self._consumer.get_watermark_offsets(tp, timeout=1, cached=False)
            except Exception:
                continue
            position = self.offsets.commit_point(tp.topic, tp.partition)
            if position is not None and high >= 0:
                total += max(0, high - position)
        return total

    def _should_stop(self, started: float, last_message_at: float) -> bool:
        now = time.monotonic()
        if self.stop.is_set() or now - started >= self.settings.duration:
            return True
        limit = self.settings.max_frames
        if limit is not None and self.summary.frames_consumed >= limit:
            return True
        idle = self.settings.idle_timeout
        if idle is None or self._assigned_at is None or self._in_flight or self._waiting_retry:
            return False
        if self.broker.down:  # no message because none can come: not the input's end
            return False
        return now - max(last_message_at, self._assigned_at) >= idle

    def run(self) -> ConsumerSummary:
        settings = self.settings
        self._consumer.subscribe(
            [self.kafka.frames_topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        log.info(
            "consuming %s as group %r, calling %s with %d in flight for up to %.0f s",
            self.kafka.frames_topic, settings.group, self.target, settings.concurrency,
            settings.duration,
        )  # fmt: skip
        try:  # connect now, so the first frames do not pay for it (or say the service is down)
            grpc.channel_ready_future(self._channel).result(timeout=5)
        except grpc.FutureTimeoutError:
            log.warning("inference service %s not reachable yet; frames will wait", self.target)
        started = last_message_at = last_commit = last_progress = time.monotonic()
        first_message_at: float | None = None
        try:
            while not self._should_stop(started, last_message_at):
                self.broker.check()
                busy = self._in_flight + len(self._waiting_retry)
                admitted = 0
                while (
                    busy < settings.concurrency
                    and admitted < ADMIT_PER_PASS
                    and not self._should_stop(started, last_message_at)
                ):
                    message = self._consumer.poll(0 if busy else 0.05)
                    if message is None:
                        break
                    if message.error():
                        if message.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", message.error())
                        continue
                    last_message_at = time.monotonic()
                    first_message_at = first_message_at or last_message_at
                    self._admit(message)
                    admitted += 1
                    busy = self._in_flight + len(self._waiting_retry)
                self._drain_completions(timeout_s=0.002 if busy else 0)
                self._resend_due()
                self._producer.poll(0)
                now = time.monotonic()
                if now - last_commit >= COMMIT_EVERY_S:
                    self._commit(wait=False)
                    last_commit = now
                if now - last_progress >= PROGRESS_EVERY_S:
                    last_progress = now
                    self._log_progress(now - (first_message_at or now))
            self._finish_in_flight()
        except BrokerLostError as exc:
            self.summary.broker_error = str(exc)
        finally:
            self._close()
            end = self._last_result_at or time.monotonic()
            self.summary.duration_s = max(0.0, end - (first_message_at or end))
        if self.summary.broker_error:
            log.error(
                "%s; %d consumed frames unanswered (left uncommitted for the group to redo)",
                self.summary.broker_error, self.summary.unanswered,
            )  # fmt: skip
        return self.summary

    def _close(self) -> None:
        """Deliver, commit and measure the lag, or, with the broker gone, only say so."""
        if self.broker.down:  # wait for it no longer than the rest of the grace
            self._producer.flush(max(1.0, self.broker.grace_s - self.broker.down_for_s()))
        else:
            self._producer.flush(30)
        if self.broker.down:
            self.summary.broker_error = self.summary.broker_error or self.broker.describe()
            self.summary.lag = None
        else:
            self._commit()
            self.summary.lag = self._lag()
            self.metrics.lag.set(self.summary.lag)
        self._consumer.close()
        self._channel.close()

    def _drain_completions(self, timeout_s: float) -> None:
        """Handle every finished call; wait up to `timeout_s` for the first one."""
        while True:
            try:
                if timeout_s:
                    call, future = self._completions.get(timeout=timeout_s)
                else:
                    call, future = self._completions.get_nowait()
            except queue.Empty:
                return
            self._complete(call, future)
            timeout_s = 0

    def _resend_due(self) -> None:
        now = time.monotonic()
        for _ in range(len(self._waiting_retry)):
            call = self._waiting_retry.popleft()
            if call.retry_at <= now and not self.stop.is_set():
                if (call.message.topic(), call.message.partition()) not in self._owned:
                    continue  # revoked while waiting: the new owner redoes it
                if not self._skipped_as_stale(call):
                    self._send(call)
            else:
                self._waiting_retry.append(call)

    def _finish_in_flight(self, timeout_s: float | None = None) -> None:
        """Let calls in flight complete; frames still waiting to retry stay uncommitted."""
        deadline = time.monotonic() + (timeout_s or self.settings.rpc_timeout_s + 5)
        while self._in_flight and time.monotonic() < deadline:
            self._drain_completions(timeout_s=0.05)
            self._producer.poll(0)
            self.broker.check()
        if self._waiting_retry or self._in_flight:
            log.warning(
                "stopping with %d frames unfinished; their offsets stay uncommitted",
                len(self._waiting_retry) + self._in_flight,
            )

    def _log_progress(self, elapsed_s: float) -> None:
        summary = self.summary
        e2e = summarize_ms(summary.e2e_ms[-500:])
        lag = self._lag() if not self.broker.down else "unknown (broker down)"
        if isinstance(lag, int):
            self.metrics.lag.set(lag)
        log.info(
            "progress: %d consumed, %d results, %d stale, %d dlq, %d errors, %.1f fps, "
            "e2e p50 %.1f ms p99 %.1f ms (last 500), lag %s",
            summary.frames_consumed, summary.results_published, summary.skipped_stale,
            summary.dlq, summary.errors,
            summary.results_published / elapsed_s if elapsed_s > 0 else 0.0,
            e2e["p50"], e2e["p99"], lag,
        )  # fmt: skip


def merge_summaries(summaries: list[ConsumerSummary]) -> ConsumerSummary:
    """One summary for several members of a group: counts add up, latencies pool together."""
    merged = ConsumerSummary()
    for summary in summaries:
        for name in (
            "frames_consumed", "results_published", "skipped_stale", "dlq", "errors", "retries",
        ):  # fmt: skip
            setattr(merged, name, getattr(merged, name) + getattr(summary, name))
        if merged.lag is not None:
            merged.lag = None if summary.lag is None else merged.lag + summary.lag
        if summary.broker_error:
            merged.broker_error = merged.broker_error or summary.broker_error
        merged.inference_ms += summary.inference_ms
        merged.rpc_ms += summary.rpc_ms
        merged.e2e_ms += summary.e2e_ms
        merged.duration_s = max(merged.duration_s, summary.duration_s)
    return merged


def format_summary(summary: dict[str, Any]) -> str:
    lag = "unknown" if summary["lag"] is None else summary["lag"]
    lines = [
        f"frames consumed {summary['frames_consumed']}, results {summary['results_published']}, "
        f"skipped stale {summary['skipped_stale']} ({summary['skipped_fraction']:.1%}), "
        f"dlq {summary['dlq']}, unanswered {summary['unanswered']}, errors {summary['errors']}, "
        f"{summary['fps']:.1f} fps, lag {lag}",
        *([f"BROKER LOST: {summary['broker_error']}"] if summary.get("broker_error") else []),
        f"{'ms':>10} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'mean':>8}",
    ]
    for name in ("inference_ms", "rpc_ms", "e2e_ms"):
        s = summary[name]
        lines.append(
            f"{name[:-3]:>10} {s['p50']:>8.1f} {s['p90']:>8.1f} {s['p99']:>8.1f} "
            f"{s['max']:>8.1f} {s['mean']:>8.1f}"
        )
    return "\n".join(lines)
