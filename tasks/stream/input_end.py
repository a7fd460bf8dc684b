"""Where a benchmark's input ends, so that its consumer group stops once every frame of the run is
read and answered, rather than after an idle timeout with nothing left to do.

The producer's delivery reports give each partition's end exactly (the offset after the last
frame it delivered there). The broker's high watermarks would not do: Tansu, the local broker,
reports a partition's end as its last batch's first offset + 1 (see `results.read_messages`),
so a group that stopped there left the run's last frames unread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping


class InputEnd:
    """Set by the run once its producer has ended; read by every member of its group (threads
    of one process).

    Members report how far the partitions they own are answered (their commit points: every
    frame before it has its outcome); the run's input is done once each partition that got
    frames is answered to its end by some member. A partition's frames may move between members
    in a rebalance, so the reports are merged rather than each member judging its own share.
    """

    def __init__(self, stall_s: float = 10.0) -> None:
        self.stall_s = stall_s  # no progress in the group this long after the end: stalled
        self._ended = threading.Event()
        self._lock = threading.Lock()
        self._ends: dict[int, int] | None = None
        self._answered_to: dict[int, int] = {}  # by partition
        self._ended_at = self._last_progress_at = 0.0  # monotonic

    @classmethod
    def unknown(cls) -> InputEnd:
        """An input whose end nobody will say (`vidflow consume`): its members end when idle."""
        input_end = cls()
        input_end.set(None)
        return input_end

    def set(self, partition_ends: Mapping[int, int] | None) -> None:
        """The producer has ended, its frames ending at `partition_ends` (partition -> the
        offset after its last frame); None where that is unknown (the producer failed, some
        frames may be on the broker unreported, or the group is to read on), and the members
        then end only as before, when idle."""
        with self._lock:
            self._ends = dict(partition_ends) if partition_ends is not None else None
            self._ended_at = time.monotonic()
        self._ended.set()

    def is_set(self) -> bool:
        return self._ended.is_set()

    def draining(self) -> bool:
        """The producer has ended where it says: the members work to its ends, however long
        that takes while the service answers (a backlog it works through), and
        neither a fixed deadline nor an idle timeout cuts them short (one member leaving as
        idle revoked its busy peers' partitions mid-drain)."""
        return self.is_set() and self._ends is not None

    def progressed(self) -> None:
        """A member got an answer from the service or gave a frame an outcome (a result, a
        stale record, a dead letter)."""
        self._last_progress_at = time.monotonic()

    def stalled(self, since: float = 0.0) -> bool:
        """Draining, and no member made progress (`progressed`) for `stall_s` since the producer
        ended, the last progress or `since` (monotonic: a member's join, a broker's return),
        frames left (the caller's to know): a service gone or hung, which the group would
        otherwise wait on for ever. The run then ends with those frames unanswered."""
        if not self.draining():
            return False
        quiet_since = max(self._ended_at, self._last_progress_at, since)
        return time.monotonic() - quiet_since >= self.stall_s

    def read_to(self, positions: Mapping[int, int]) -> bool:
        """Report how far a member's partitions are answered (partition -> the offset every
        frame before has its outcome); True once every partition with frames of this run is
        answered to its end."""
        with self._lock:
            for partition, position in positions.items():
                self._answered_to[partition] = max(position, self._answered_to.get(partition, -1))
            if self._ends is None:
                return False
            return all(self._answered_to.get(p, -1) >= end for p, end in self._ends.items())
