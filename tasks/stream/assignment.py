"""The partitions a group member holds, kept by the rebalance callbacks, and those it has
paused while its in-flight limit is reached."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from tasks.stream.kafka_io import Membership
from tasks.stream.offsets import PartitionKey
from tasks.stream.publisher import Publisher

log = logging.getLogger("tasks.stream.consumer")
# How often a member at its in-flight limit still polls (its partitions paused)
FULL_POLL_EVERY_S = 0.5


class Assignment:
    """What the group gave this member: its partitions, since when, and which it paused."""

    def __init__(
        self, membership: Membership, publisher: Publisher, start_from_ms: int | None = None
    ) -> None:
        self.membership, self.publisher = membership, publisher
        self.start_from_ms = start_from_ms  # where a partition the group never read starts
        self.owned: set[PartitionKey] = set()
        # Revokes so far, and the last one of each partition: a frame taken before its
        # partition was last revoked is no longer this member's to answer, even where the
        # partition came back to it (its frames are read again from the commit point).
        self.epoch = 0
        self._lost_at: dict[PartitionKey, int] = {}
        # How far partitions were answered as this member saw it beyond its offsets tracker:
        # the group's commits at an assignment, its own commit points as it lost them. A
        # partition answered to its end and then revoked left no trace in the tracker, and a
        # drain waiting for it to be reported never ended.
        self.answered_to: dict[PartitionKey, int] = {}
        self.assigned_at: float | None = None  # idle time counts only once partitions are ours
        self._paused: list[TopicPartition] = []
        self._polled_at = 0.0  # when poll_paused last polled
        # Run as partitions go, while they are still ours: the consumer publishes the answers
        # of its calls in flight first (consumer._hand_over).
        self.before_revoke: Callable[[], None] = lambda: None

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned_at = time.monotonic()
        if self.start_from_ms is not None:
            self.answered_to.update(start_at_time(consumer, partitions, self.start_from_ms))
        self.owned |= {(p.topic, p.partition) for p in partitions}
        self.membership.assigned()
        log.info("assigned partitions %s", [p.partition for p in partitions])

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is delivered for the partitions lost; their frames go to the next owner."""
        self.membership.revoked()  # first: a commit that fails below must not hide the revoke
        lost = {(p.topic, p.partition) for p in partitions}
        try:
            self.before_revoke()  # the calls that end meanwhile are still answered
        finally:  # a broker lost as it published: what follows is still done
            self.answered_to.update(self.publisher.revoke(list(lost)))
            self.owned -= lost
            self.epoch += 1  # from here, an answer to a frame taken before is not ours
            self._lost_at.update(dict.fromkeys(lost, self.epoch))
        # librdkafka keeps a partition paused across a rebalance (only `resume` clears it):
        # one handed back would never be fetched again.
        if going := [p for p in self._paused if (p.topic, p.partition) in lost]:
            consumer.resume(going)
        self._paused = [p for p in self._paused if (p.topic, p.partition) not in lost]
        log.info("revoked partitions %s", [p.partition for p in partitions])

    def owns(self, message: Message, taken_at_epoch: int) -> bool:
        """Whether a frame taken at `taken_at_epoch` is still this member's to answer."""
        key = (message.topic(), message.partition())
        return key in self.owned and self._lost_at.get(key, 0) <= taken_at_epoch

    def poll_paused(self, consumer: Consumer) -> Message | None:
        """For a member at its in-flight limit: pause its partitions and still poll, every
        FULL_POLL_EVERY_S. Without a poll for max.poll.interval.ms (5 min) librdkafka dropped
        the member from its group (a service down that long, every call waiting to retry):
        its commits failed, and its frames in flight were classified again by whoever took
        the partitions, itself included. Poll also runs the group's callbacks."""
        now = time.monotonic()
        if now - self._polled_at < FULL_POLL_EVERY_S:
            return None
        self._polled_at = now
        if not self._paused and (assigned := consumer.assignment()):
            consumer.pause(assigned)
            self._paused = assigned
        return consumer.poll(0)

    def resume(self, consumer: Consumer) -> None:
        if self._paused:
            consumer.resume(self._paused)
            self._paused = []


def start_at_time(
    consumer: Consumer, partitions: list[TopicPartition], since_ms: int
) -> dict[PartitionKey, int]:
    """Start the partitions the group has no committed offset for at their first message
    produced at `since_ms` (epoch ms) or later, in an assignment callback, and commit there;
    where each partition's commit stands now (none of this run's frames is before it).

    A benchmark's new group on a shared topic began at its first message and passed over
    every earlier run's frames one by one (consumer._before): on a topic that keeps a week of
    them, minutes of reading, all in its first frames' latencies. A partition with no message
    since starts at its end as it was read before the lookup (a fixed offset: a frame produced
    meanwhile comes after it). The starts are committed, so that a partition this run never
    uses does not count the older frames as lag, and a later rebalance starts there too.
    Where the broker cannot say, a partition starts where the group would (the older frames
    still passed over). Tansu, the local broker, answers 0 for a time after its last message:
    there, a partition with nothing since is read from its start, as before.
    """
    committed = _asked(lambda: consumer.committed(partitions, timeout=5), "the group's offsets")
    if committed is None:
        return {}
    stands = {(p.topic, p.partition): p.offset for p in committed if p.offset >= 0}
    # A partition whose lookup failed (its `error` set, offset -1001) may have a commit point:
    # taken as unread, its start was committed over it, backwards (found in review, stop 62)
    unread = [
        TopicPartition(p.topic, p.partition, since_ms)
        for p in committed
        if p.offset < 0 and p.error is None
    ]
    starts = _offsets_since(consumer, unread) if unread else {}
    if not starts:
        return stands
    try:
        consumer.commit(offsets=[TopicPartition(*key, at) for key, at in starts.items()],
                        asynchronous=False)  # fmt: skip
    except KafkaException as exc:  # started there all the same: the next commits catch up
        log.info("the run's start offsets could not be committed (%s)", exc)
    for partition in partitions:
        partition.offset = starts.get((partition.topic, partition.partition), partition.offset)
    consumer.assign(partitions)  # the offsets set above (the callback's own list is not read)
    return {**stands, **starts}


def _offsets_since(consumer: Consumer, unread: list[TopicPartition]) -> dict[PartitionKey, int]:
    """Each partition's first offset at or after its timestamp (its end, read before the
    lookup, where nothing came since); a partition the broker cannot say is left out."""
    ends = {}
    for partition in unread:
        try:
            ends[(partition.topic, partition.partition)] = consumer.get_watermark_offsets(
                partition, timeout=5
            )[1]
        except KafkaException:  # its leader away for now: its start is the group's
            continue
    found = _asked(lambda: consumer.offsets_for_times(unread, timeout=5), "the start's offsets")
    if found is None:
        return {}
    starts = {}
    for tp in found:
        key = (tp.topic, tp.partition)
        offset = tp.offset if tp.offset >= 0 else ends.get(key, -1)  # < 0: nothing since
        if tp.error is None and offset >= 0:
            starts[key] = offset
    return starts


def _asked(ask: Callable[[], list[TopicPartition]], what: str) -> list[TopicPartition] | None:
    """`ask()` of the broker, or None (said) where it cannot answer now: the run's partitions
    then start where the group would, earlier runs' frames passed over as read."""
    try:
        return ask()
    except KafkaException as exc:
        log.info("%s could not be read (%s): earlier runs' frames are passed over", what, exc)
        return None
