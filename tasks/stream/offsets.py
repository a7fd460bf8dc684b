"""At-least-once bookkeeping: which offsets may be committed.

A message's offset is finished when its result (or its dead-letter copy) has been delivered.
Per partition the commit point is the lowest offset still unfinished, so a crash never skips a
frame whose result was not yet delivered; the price is that a restart may redo a few frames.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, TopicPartition

PartitionKey = tuple[str, int]

log = logging.getLogger("tasks.stream.publisher")


class OffsetTracker:
    def __init__(self) -> None:
        self._unfinished: dict[PartitionKey, set[int]] = {}
        self._next_offset: dict[PartitionKey, int] = {}
        self._committed: dict[PartitionKey, int] = {}
        self._commits_failing = False  # the last commit reported failed

    def started(self, topic: str, partition: int, offset: int) -> None:
        key = (topic, partition)
        self._unfinished.setdefault(key, set()).add(offset)
        self._next_offset[key] = max(self._next_offset.get(key, 0), offset + 1)

    def finished(self, topic: str, partition: int, offset: int) -> None:
        self._unfinished.get((topic, partition), set()).discard(offset)

    def forget(self, partitions: list[PartitionKey]) -> dict[PartitionKey, int]:
        """Drop partitions this member no longer owns (after a rebalance); their commit points
        as they were."""
        points = {key: at for key in partitions if (at := self.commit_point(*key)) is not None}
        for key in partitions:
            self._unfinished.pop(key, None)
            self._next_offset.pop(key, None)
            self._committed.pop(key, None)
        return points

    def commit_point(self, topic: str, partition: int) -> int | None:
        key = (topic, partition)
        if key not in self._next_offset:
            return None
        unfinished = self._unfinished.get(key)
        return min(unfinished) if unfinished else self._next_offset[key]

    def to_commit(self, only_moved: bool = True) -> list[TopicPartition]:
        """Commit points that moved since they were last committed (or all of them)."""
        points = []
        for topic, partition in list(self._next_offset):
            point = self.commit_point(topic, partition)
            if point is None:
                continue
            if not only_moved or self._committed.get((topic, partition)) != point:
                points.append(TopicPartition(topic, partition, point))
        return points

    def mark_committed(self, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset

    def commit_reported(self, error: KafkaError | None, offsets: list[TopicPartition]) -> None:
        """librdkafka's report of a commit (the consumer's `on_commit`, served by its poll): a
        point whose commit failed counts as moved again, for the next background commit to
        send. Marked committed as it was sent, a failed one went again only with the commit at
        a rebalance or the end, and a member killed before that redid its frames."""
        failed = offsets if error is not None else [tp for tp in offsets if tp.error]
        # only partitions still this member's (one revoked meanwhile is the next owner's)
        failed = [tp for tp in failed if (tp.topic, tp.partition) in self._next_offset]
        for tp in failed:
            if self._committed.get((tp.topic, tp.partition)) == tp.offset:
                del self._committed[(tp.topic, tp.partition)]
        if failed and not self._commits_failing:  # said once a run of failures (a broker away:
            log.warning(  # one every commit interval)
                "offset commit failed (%s): sent again with the next commits",
                error or failed[0].error,
            )
        self._commits_failing = bool(failed)
