"""At-least-once bookkeeping: which offsets may be committed.

A message's offset is finished when its result (or its dead-letter copy) has been delivered.
Per partition the commit point is the lowest offset still unfinished, so a crash never skips a
frame whose result was not yet delivered; the price is that a restart may redo a few frames.
"""

from __future__ import annotations

from confluent_kafka import TopicPartition

PartitionKey = tuple[str, int]


class OffsetTracker:
    def __init__(self) -> None:
        self._unfinished: dict[PartitionKey, set[int]] = {}
        self._next_offset: dict[PartitionKey, int] = {}
        self._committed: dict[PartitionKey, int] = {}

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
