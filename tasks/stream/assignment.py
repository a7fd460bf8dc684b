"""The partitions a group member holds, kept by the rebalance callbacks, and those it has
paused while its in-flight limit is reached."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer, Message, TopicPartition

from tasks.stream.kafka_io import Membership
from tasks.stream.offsets import PartitionKey
from tasks.stream.publisher import Publisher

log = logging.getLogger("tasks.stream.consumer")
# How often a member at its in-flight limit still polls (its partitions paused)
FULL_POLL_EVERY_S = 0.5


class Assignment:
    """What the group gave this member: its partitions, since when, and which it paused."""

    def __init__(self, membership: Membership, publisher: Publisher) -> None:
        self.membership, self.publisher = membership, publisher
        self.owned: set[PartitionKey] = set()
        self.assigned_at: float | None = None  # idle time counts only once partitions are ours
        self._paused: list[TopicPartition] = []
        self._polled_at = 0.0  # when poll_paused last polled
        # Run as partitions go, while they are still ours: the consumer publishes the answers
        # of its calls in flight first (consumer._hand_over).
        self.before_revoke: Callable[[], None] = lambda: None

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned_at = time.monotonic()
        self.owned |= {(p.topic, p.partition) for p in partitions}
        self.membership.assigned()
        log.info("assigned partitions %s", [p.partition for p in partitions])

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is delivered for the partitions lost; their frames go to the next owner."""
        self.membership.revoked()  # first: a commit that fails below must not hide the revoke
        lost = {(p.topic, p.partition) for p in partitions}
        try:
            self.before_revoke()
        finally:  # a broker lost as it published: what follows is still done
            self.publisher.revoke(list(lost))
            self.owned -= lost
        # librdkafka keeps a partition paused across a rebalance (only `resume` clears it):
        # one handed back would never be fetched again.
        if going := [p for p in self._paused if (p.topic, p.partition) in lost]:
            consumer.resume(going)
        self._paused = [p for p in self._paused if (p.topic, p.partition) not in lost]
        log.info("revoked partitions %s", [p.partition for p in partitions])

    def owns(self, message: Message) -> bool:
        return (message.topic(), message.partition()) in self.owned

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
