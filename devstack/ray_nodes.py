"""Stopping the Ray nodes that a test or benchmark started with `ray start`, and only those.

`ray stop --force` ends every Ray process of the machine by name: a developer's own cluster,
or a `vidflow depth` run in another terminal, died with a test's teardown. A node's processes
are found instead by what their command lines hold (its temp dir, its GCS address), and their
children with them (the agents and workers, whose titles Ray rewrites).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def stop_ray_nodes(temp_dir: Path, gcs_address: str, timeout_s: float = 1.0) -> int:
    """End the Ray processes of the nodes started under `temp_dir` for the cluster at
    `gcs_address`: SIGTERM, then SIGKILL to those still there after `timeout_s` (as `ray stop
    --force` would at once: Ray's autoscaler monitor ignores SIGTERM, and a 30-s grace held
    every cluster test's teardown for all of it). Returns how many processes it signalled."""
    needles = (str(temp_dir), f"--address={gcs_address}", f"--gcs-address={gcs_address}")
    doomed = _with_descendants(needles)
    _signal(doomed, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while (alive := {pid for pid in doomed if _alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(alive, signal.SIGKILL)
    return len(doomed)


def _with_descendants(needles: tuple[str, ...]) -> set[int]:
    processes = _processes()
    found = {pid for pid, (command, _) in processes.items() if any(n in command for n in needles)}
    found.discard(os.getpid())
    while grown := {pid for pid, (_, parent) in processes.items() if parent in found} - found:
        found |= grown
    return found


def _processes() -> dict[int, tuple[str, int]]:
    """Every process's command line and parent, from /proc."""
    processes = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
        processes[int(entry.name)] = (command, parent)
    return processes


def _signal(pids: set[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, signum)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; its parent has yet to reap it
