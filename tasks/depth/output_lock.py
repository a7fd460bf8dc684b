"""One run at a time per output folder.

Each run commits its shards' rows after deleting the earlier rows of the same videos; two runs
into one folder each did so for the same videos and left two rows per video (and each re-run
kept both). A lock file in the folder, held by the driver for the whole run, refuses the second
run instead. `flock` ends with its holder, even one killed with SIGKILL, so a killed run never
leaves the folder locked; the processes the driver starts do not inherit it (Python opens
files non-inheritable).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".vidflow-run.lock"


class OutputBusyError(RuntimeError):
    """Another run is writing to the output folder."""


class NoLocksError(OutputBusyError):
    """The output folder's file system takes no lock: whether another run holds it is unknown."""


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold `folder` for this run; raise OutputBusyError, naming the holder, if another run
    holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a run"
            raise OutputBusyError(
                f"another run ({holder}) is writing to {folder}: wait for it to end, or give "
                "this one another output folder"
            ) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without locks (Lustre, FUSE)
            raise NoLocksError(
                f"{folder}: its file system takes no lock ({exc.strerror or exc}), and one run "
                "at a time per output folder is how its rows stay unique: give an output folder "
                "on a file system with locks (a local disk, NFS with locking, Lustre mounted "
                "with -o flock)"
            ) from exc
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_output_free(folder: Path) -> None:
    """Raise OutputBusyError if a run is writing to `folder` now (the flow takes the lock
    itself; this lets the CLI refuse before it starts Prefect and Ray)."""
    if (folder / LOCK_NAME).exists():
        with output_lock(folder):
            pass
