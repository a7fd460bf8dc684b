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
        self.notes: list[str] = []  # why it runs otherwise than placed, for the driver to say
        self.estimator = load_depth_estimator(settings, device, threads, self.notes)
        self.busy, self.keep_alive_s = False, keep_alive_s
        self.ends_at = time.monotonic() + keep_alive_s  # unless a call or a hold comes first
        if keep_alive_s > 0:
            threading.Thread(target=self._end_when_idle, daemon=True).start()

    def depth_maps(
        self, records: Sequence[VideoRecord], maps_dir: Path, settings: DepthSettings
    ) -> list[VideoRecord]:
        self.busy = True
        try:
            return estimate_depth_many(records, maps_dir, settings, self.estimator)
        finally:
            # Held before it reads idle: a call longer than the keep-alive left `ends_at` past,
            # and the idle check between the two lines ended the actor, its answer lost.
            self._hold_for(self.keep_alive_s)
            self.busy = False

    def describe(self) -> tuple[str, list[str]]:
        """How its model runs ("ONNX Runtime on cpu"), and why not as placed: its own log
        stays in its process, and the run said "on cuda" of an actor that ran on the CPU."""
        runtime = "ONNX Runtime" if type(self.estimator).__name__.startswith("Onnx") else "torch"
        return f"{runtime} on {self.estimator.device}", self.notes

    def keep_alive(self, keep_alive_s: float | None = None) -> None:
        """Restart the idle clock: a run holds this actor (its next depth call may be minutes
        away, behind slow downloads) for `keep_alive_s`, that run's keep-alive. Runs of
        different keep-alives may hold it at once: it lives to the latest end any of them
        asked for (else it ended within the interval between the longer one's calls)."""
        self._hold_for(keep_alive_s if keep_alive_s and keep_alive_s > 0 else self.keep_alive_s)

    def _hold_for(self, seconds: float) -> None:
        self.ends_at = max(self.ends_at, time.monotonic() + seconds)

    def _end_when_idle(self) -> None:
        import ray

        while True:
            time.sleep(min(self.keep_alive_s, 5.0))
            if not self.busy and time.monotonic() > self.ends_at:
                log.info("depth actor idle past its keep-alive: ending it")
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
