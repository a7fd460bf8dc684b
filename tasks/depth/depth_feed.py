"""A shard's videos handed to its depth actor while the shard still transcodes.

A shard's depth step used to start when its last transcode had ended: the model then ran on the
whole shard (0.3-0.5 s for 12 videos on a CPU) while the CPU that shard had transcoded on sat
idle, since the next shard starts only once this one is written, and the last shards' depth
was the tail of every run. The transcode task now hands the videos to the actor as they are
transcoded, a model batch at a time, and the depth task only collects the maps and does what is
left (docs/benchmarks.md, tenth pass). Kept free of Prefect: it is Ray and the actor only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.depth.frame_choice import frame_indices
from tasks.depth.run_log import run_logger, send_logs_now
from tasks.depth.settings import DepthSettings
from tasks.depth.video_record import VideoRecord

log = logging.getLogger(__name__)


def feeds_early(settings: DepthSettings) -> bool:
    """Whether a shard's videos go to the depth model as they are transcoded. Not where the
    depth step reserves CPUs (`depth_cpus`, for a model heavy on the CPU): the model would then
    run on CPUs the transcodes hold, outside what Ray was asked to keep for it."""
    return settings.depth_cpus == 0


class PendingDepth:
    """The depth calls a shard's transcode task made, still under way or done.

    Not a dataclass on purpose: Prefect and prefect-ray walk a task's arguments through
    dataclasses and resolve every Ray object reference they find, which would turn a failed call
    into a failed task instead of videos to redo (`results`)."""

    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls  # Ray object references to lists of VideoRecord

    def results(self) -> dict[str, VideoRecord]:
        """The videos whose depth came back, by id. A call that failed (its actor died or was
        restarted) leaves its videos out, for the depth task to run again."""
        import ray

        done: dict[str, VideoRecord] = {}
        for call in self.calls:
            try:
                records = ray.get(call)
            except Exception as exc:  # a Ray error: the depth task redoes these videos
                reason = f"{type(exc).__name__}: {exc}"
                logger = run_logger(log)
                logger.warning("an early depth call failed (%s); redoing its videos", reason)
                if logger is not log:  # in the run's log before a private Ray's worker ends
                    send_logs_now()
                continue
            done.update((record.video_id, record) for record in records)
        return done


class DepthFeed:
    """Hands transcoded videos to a depth actor in calls of a full model batch of frames
    (`depth_batch_size`; one video at `--frames all`), the rest when the transcodes end: a GPU
    still sees full batches, and the actor is called a few times a shard, not once a video."""

    def __init__(self, actor: Any, maps_dir: Path, settings: DepthSettings) -> None:
        self.actor, self.maps_dir, self.settings = actor, maps_dir, settings
        self.waiting: list[VideoRecord] = []
        self.waiting_frames = 0
        self.calls: list[Any] = []

    def add(self, record: VideoRecord) -> VideoRecord:
        """Queue a transcoded video (a failed one is left to its row); send the queue once it
        holds a batch. Returns the record, for chaining."""
        if not record.failed:
            self.waiting.append(record)
            self.waiting_frames += len(frame_indices(self.settings.frames, record.frame_count or 0))
            if self.waiting_frames >= self.settings.depth_batch_size:
                self._send()
        return record

    def close(self, going: set[str]) -> PendingDepth:
        """Send what is still queued of the videos still `going` (by id: a transcode task that
        crashed on its last try has failed them all, and their depth was made for nothing);
        the calls, for the depth task."""
        self.waiting = [record for record in self.waiting if record.video_id in going]
        self._send()
        return PendingDepth(self.calls)

    def _send(self) -> None:
        if self.waiting:
            self.calls.append(
                self.actor.depth_maps.remote(self.waiting, self.maps_dir, self.settings)
            )
            self.waiting, self.waiting_frames = [], 0


def discard_maps(record: VideoRecord) -> None:
    """Remove the maps an early call made for a video whose row has failed since."""
    for made in (record.depth_path, record.depth_preview_path):
        if made:
            Path(made).unlink(missing_ok=True)
