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
