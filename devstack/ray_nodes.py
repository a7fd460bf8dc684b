"""Stopping the Ray nodes that a test or benchmark started with `ray start`, and only those.

`ray stop --force` ends every Ray process of the machine by name: a developer's own cluster,
or a `vidflow depth` run in another terminal, died with a test's teardown. A node's processes
are found instead by what their command lines hold (its temp dir, its GCS address), and their
children with them (the agents and workers, whose titles Ray rewrites).
"""

from __future__ import annotations

from pathlib import Path

from devstack.processes import end_processes, processes_with_descendants


def stop_ray_nodes(temp_dir: Path, gcs_address: str, timeout_s: float = 1.0) -> int:
    """End the Ray processes of the nodes started under `temp_dir` for the cluster at
    `gcs_address`: SIGTERM, then SIGKILL to those still there after `timeout_s` (as `ray stop
    --force` would at once: Ray's autoscaler monitor ignores SIGTERM, and a 30-s grace held
    every cluster test's teardown for all of it). Returns how many processes it signalled."""
    needles = (str(temp_dir), f"--address={gcs_address}", f"--gcs-address={gcs_address}")
    doomed = processes_with_descendants(lambda command: any(n in command for n in needles))
    end_processes(doomed, timeout_s)
    return len(doomed)
