"""The commit point never passes a frame whose result is not yet delivered."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tasks.stream.offsets import OffsetTracker


def test_commit_point_waits_for_the_lowest_unfinished_offset() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.started("frames", 0, offset)
    tracker.finished("frames", 0, 1)
    tracker.finished("frames", 0, 2)
    assert tracker.commit_point("frames", 0) == 0
    tracker.finished("frames", 0, 0)
    assert tracker.commit_point("frames", 0) == 3
    tracker.finished("frames", 0, 3)
    tracker.finished("frames", 0, 4)
    assert tracker.commit_point("frames", 0) == 5


def test_only_moved_points_unless_all_are_asked_for() -> None:
    tracker = OffsetTracker()
    tracker.started("frames", 1, 7)
    tracker.finished("frames", 1, 7)
    points = tracker.to_commit()
    assert [(p.partition, p.offset) for p in points] == [(1, 8)]
    tracker.mark_committed(points)
    assert tracker.to_commit() == []
    assert [(p.partition, p.offset) for p in tracker.to_commit(only_moved=False)] == [(1, 8)]
    tracker.forget([("frames", 1)])
    assert tracker.to_commit(only_moved=False) == []


@given(st.permutations(list(range(30))), st.integers(0, 30))
def test_never_commits_past_an_unfinished_offset(order: list[int], done_count: int) -> None:
    tracker = OffsetTracker()
    for offset in range(30):
        tracker.started("t", 0, offset)
    finished = set(order[:done_count])
    for offset in finished:
        tracker.finished("t", 0, offset)
    point = tracker.commit_point("t", 0)
    assert all(offset in finished for offset in range(point))
    assert point == 30 or point not in finished


def test_a_partition_whose_commit_point_could_not_be_read_keeps_it() -> None:
    """Found in review, stop 62: `committed()` reports a partition it could not read with its
    `error` set and offset -1001, which read as "never committed": the run's start offset was
    looked up and committed over the group's own commit point, backwards. (A stand-in for
    the consumer: a broker that fails one partition's lookup cannot be had on demand.)"""
    from types import SimpleNamespace

    from confluent_kafka import TopicPartition

    from tasks.stream.assignment import start_at_time

    class OneLookupFailing:
        def __init__(self) -> None:
            self.looked_up: list[int] = []
            self.committed_offsets: list[tuple[int, int]] = []

        def committed(self, partitions, timeout):
            unreadable, never = ("timed out", 0), (None, 1)
            return [
                SimpleNamespace(topic="frames", partition=index, offset=-1001, error=error)
                for error, index in (unreadable, never)
            ]

        def get_watermark_offsets(self, partition, timeout):
            return (0, 40)

        def offsets_for_times(self, partitions, timeout):
            self.looked_up += [p.partition for p in partitions]
            return [TopicPartition(p.topic, p.partition, 30) for p in partitions]

        def commit(self, offsets, asynchronous):
            self.committed_offsets += [(p.partition, p.offset) for p in offsets]

        def assign(self, partitions) -> None:
            pass

    consumer = OneLookupFailing()
    partitions = [TopicPartition("frames", 0), TopicPartition("frames", 1)]
    starts = start_at_time(consumer, partitions, since_ms=1_000)  # type: ignore[arg-type]
    assert consumer.looked_up == [1] and consumer.committed_offsets == [(1, 30)]
    assert starts == {("frames", 1): 30}
