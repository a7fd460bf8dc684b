"""A consumer's way out: each frame's one outcome published, and offsets committed once delivered.

An outcome is a result record, a stale record (past the latency budget) or a dead-letter copy.
An offset is finished only when its outcome's delivery is confirmed, and commits never pass an
unfinished offset (OffsetTracker): at least once, never lost. A failed delivery leaves its offset
uncommitted, so the group redoes that frame.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from tasks.stream.broker_watch import BrokerWatch
from tasks.stream.consumer_metrics import ConsumerMetrics
from tasks.stream.consumer_summary import ConsumerSummary
from tasks.stream.dead_letters import dead_letter_copies, send_dead_letter
from tasks.stream.frame_codec import (
    Frame,
    FrameResult,
    Headers,
    stale_result,
)
from tasks.stream.kafka_io import DeliveryCallback, make_producer, produce_with_backpressure
from tasks.stream.offsets import OffsetTracker, PartitionKey
from tasks.stream.settings import KafkaSettings

log = logging.getLogger(__name__)


class Publisher:
    """Publishes outcomes to the results and dead-letter topics and commits what is delivered.

    Counts each outcome in the summary and metrics when its delivery is confirmed, not when it
    is queued, so the summary never claims a result that did not get out."""

    def __init__(
        self,
        kafka: KafkaSettings,
        consumer: Consumer,
        broker: BrokerWatch,
        summary: ConsumerSummary,
        metrics: ConsumerMetrics,
    ) -> None:
        self.kafka, self.broker = kafka, broker
        self.summary, self.metrics = summary, metrics
        self.offsets = OffsetTracker()
        # When the latest outcome of any kind was delivered: the end of the member's window.
        self.last_outcome_at: float | None = None
        self._consumer = consumer  # commits go through the group member that read the frames
        self._producer = make_producer(kafka, broker)

    def started(self, message: Message) -> None:
        """A message read: its offset is unfinished until its outcome is delivered."""
        self.offsets.started(message.topic(), message.partition(), message.offset())

    def passed_over(self, message: Message) -> None:
        """A message read and left alone (not this consumer's to answer): committed past."""
        self.summary.passed_over += 1
        self.offsets.started(message.topic(), message.partition(), message.offset())
        self.offsets.finished(message.topic(), message.partition(), message.offset())

    def result(self, message: Message, result: FrameResult) -> None:
        """Publish a classified frame's result."""

        def delivered() -> None:
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
            "frame %r: %s %.3f inference %.1f ms rpc %.1f ms e2e %.1f ms",
            result.key, result.label, result.score, result.inference_ms, result.rpc_ms,
            result.e2e_ms,
        )  # fmt: skip
        self._publish(
            self.kafka.results_topic, result.key.encode(), result.to_json(), None,
            self._finish_callback(message, delivered),
        )  # fmt: skip

    def stale(self, message: Message, frame: Frame, age_ms: float) -> None:
        """Publish the record of a frame skipped as older than the latency budget."""
        record = stale_result(frame, message.partition(), message.offset(), age_ms)

        def delivered() -> None:
            self.summary.skipped_stale += 1
            self.metrics.skipped_stale.inc()

        log.debug("frame %r skipped: %.1f ms old", record.key, age_ms)
        self._publish(
            self.kafka.results_topic, record.key.encode(), record.to_json(), None,
            self._finish_callback(message, delivered),
        )  # fmt: skip

    def dead_letter(
        self, message: Message, reason: str, extra_headers: Sequence[tuple[str, bytes]] = ()
    ) -> None:
        """Copy a message to the dead-letter topic with the reason and its origin in headers."""
        # %r: the reason can quote the frame's key, which whoever produced the frame chose.
        log.warning(
            "dead-lettering %s/%d@%d: %r",
            message.topic(), message.partition(), message.offset(), reason,
        )  # fmt: skip

        def counted() -> None:
            self.summary.dlq += 1
            self.metrics.dead_lettered.inc()

        copies = deque(dead_letter_copies(message, reason, extra_headers))
        publish = functools.partial(self._publish, self.kafka.dlq_topic, smaller_copies=True)
        send_dead_letter(copies, publish, self._finish_callback(message, counted))

    def _publish(self, topic: str, key: bytes | None, value: bytes | None,
                 headers: Headers | None, on_delivery: DeliveryCallback,
                 smaller_copies: bool = False) -> None:  # fmt: skip
        """Produce. Refused before it left (a topic deleted, no access, too large): a failed
        delivery, not an exception that ended the member with no summary; a dead letter too
        large raises (`smaller_copies`: its path sends less)."""
        try:
            produce_with_backpressure(
                self._producer, self.broker, topic,
                key=key, value=value, headers=headers, on_delivery=on_delivery,
            )  # fmt: skip
        except KafkaException as exc:
            if smaller_copies and exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            on_delivery(exc.args[0], None)

    def _finish_callback(
        self, message: Message, on_ok: Callable[[], None] | None = None
    ) -> DeliveryCallback:
        topic, partition, offset = message.topic(), message.partition(), message.offset()

        def on_delivery(error: KafkaError | None, _delivered: Message | None) -> None:
            if error is not None:  # not lost: the offset stays uncommitted and is redone later
                self.summary.errors += 1
                self.metrics.errors.labels("publish").inc()
                log.error("publishing for %s/%d@%d failed: %s", topic, partition, offset, error)
                # librdkafka retried it until message.timeout.ms: with the broker there, this
                # is for good (authorization, a record the topic refuses). Its partition could
                # commit nothing more, so the member stops instead of working on uncommitted.
                if not self.broker.down and self.summary.delivery_error is None:
                    self.summary.delivery_error = (
                        f"the outcome of {topic}/{partition}@{offset} could not be "
                        f"published: {error.str()}"
                    )
                return
            # An outcome the broker took: back, if it was away (a member's outcomes are made
            # as their calls end, and a blink during its last flush cost it its commit).
            self.broker.alive()
            self.offsets.finished(topic, partition, offset)
            self.last_outcome_at = time.monotonic()
            if on_ok is not None:
                on_ok()

        return on_delivery

    def poll(self) -> None:
        """Serve delivery reports that are due, without waiting."""
        self._producer.poll(0)

    def commit(self, wait: bool = True) -> None:
        """Commit while running in the background (points that moved), or wait for all points.

        A background commit that fails (`OffsetTracker.commit_reported`) is sent again by the next;
        the waiting commit on a rebalance and at the end sends every point again."""
        offsets = self.offsets.to_commit(only_moved=not wait)
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=not wait)
            self.offsets.mark_committed(offsets)
        except Exception as exc:  # e.g. during a rebalance; the next commit catches up
            log.warning("offset commit failed: %s", exc)

    def revoke(self, lost: list[PartitionKey]) -> dict[PartitionKey, int]:
        """Commit what is delivered for partitions we lose (the rest goes to the next owner);
        how far each was answered. With the broker gone (the group revokes after a session
        timeout) nothing can be delivered or committed: no wait holds up the loop."""
        if not self.broker.down:
            self._producer.flush(10)
            self.commit()
        return self.offsets.forget(lost)

    def lag(self, cached: bool = False) -> int:
        """Messages between the commit points and the ends of the assigned partitions; a
        partition this member has not read from yet counts from the group's committed offset
        (or its start, where the group has none). `cached`: the ends the fetches last saw,
        for the loop's progress line: asked, each partition was a round trip on the loop's
        thread, a second each where its leader was gone (a partition not read yet still asks
        its group's committed offset)."""
        ends: dict[tuple[str, int], tuple[int, int]] = {}
        for tp in self._consumer.assignment():
            with contextlib.suppress(Exception):  # unknown for now: left out
                ends[(tp.topic, tp.partition)] = self._consumer.get_watermark_offsets(
                    tp, timeout=1, cached=cached
                )
        positions = {key: self.offsets.commit_point(*key) for key in ends}
        unread = [TopicPartition(*key) for key, point in positions.items() if point is None]
        if unread:  # one request to the group coordinator for all of them
            with contextlib.suppress(Exception):
                for tp in self._consumer.committed(unread, timeout=1):
                    low = ends[(tp.topic, tp.partition)][0]
                    positions[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else low
        return sum(
            max(0, high - position)
            for key, (_, high) in ends.items()
            if (position := positions[key]) is not None and high >= 0
        )

    def finish(self) -> None:
        """Deliver, commit and measure the lag, or, with the broker gone, only say so."""
        if self.broker.down:  # wait for it no longer than the rest of the grace
            self._producer.flush(max(1.0, self.broker.grace_s - self.broker.down_for_s()))
        else:
            self._producer.flush(30)
        if self.broker.down:
            self.summary.broker_error = self.summary.broker_error or self.broker.describe()
            self.summary.lag = None
        else:
            self.commit()
            self.summary.lag = self.lag()
            self.metrics.lag.set(self.summary.lag)
