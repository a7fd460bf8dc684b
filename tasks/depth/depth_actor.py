"""The Ray actor that holds a loaded depth model for the shards of a run (and of later runs on
a cluster that outlives it)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tasks.depth.depth_loader import load_depth_estimator
from tasks.depth.depth_maps import estimate_depth_many
from tasks.depth.settings import DepthSettings
from tasks.depth.video_record import VideoRecord

log = logging.getLogger(__name__)


class DepthActor:
    """Holds one loaded depth model (a Ray actor; see tasks/depth/shard_tasks.py) and takes whole
    shards, batching their frames.

    On a cluster that outlives the run, later runs find it loaded (the model's imports and
    weights cost seconds of CPU): it ends itself after `keep_alive_s` without a call. A run
    that uses it calls `keep_alive` meanwhile (shard_tasks.actors_held), so a long wait for
    downloads or transcodes never ends it mid-run. It lives here, away from Prefect, so its
    process imports no orchestration code.
    """

    def __init__(
        self, settings: DepthSettings, device: str, threads: int, keep_alive_s: float
    ) -> None:
        # `threads`: the CPUs its callers reserve, not the whole node.
        self.estimator = load_depth_estimator(settings, device, threads)
        self.last_call, self.busy, self.keep_alive_s = time.monotonic(), False, keep_alive_s
        if keep_alive_s > 0:
            threading.Thread(target=self._end_when_idle, daemon=True).start()

    def depth_maps(
        self, records: Sequence[VideoRecord], maps_dir: Path, settings: DepthSettings
    ) -> list[VideoRecord]:
        self.busy = True
        try:
            return estimate_depth_many(records, maps_dir, settings, self.estimator)
        finally:
            self.busy, self.last_call = False, time.monotonic()

    def keep_alive(self, keep_alive_s: float | None = None) -> None:
        """Restart the idle clock: a run holds this actor (its next depth call may be minutes
        away, behind slow downloads). `keep_alive_s` is that run's: an actor a run of a shorter
        keep-alive started ended within the holding run's interval between calls."""
        if keep_alive_s is not None and keep_alive_s > 0:
            self.keep_alive_s = keep_alive_s
        self.last_call = time.monotonic()

    def _end_when_idle(self) -> None:
        import ray

        while True:
            time.sleep(min(self.keep_alive_s, 5.0))
            if not self.busy and time.monotonic() - self.last_call > self.keep_alive_s:
                log.info("depth actor idle for %.0f s: ending it", self.keep_alive_s)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
