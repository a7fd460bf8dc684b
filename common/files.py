"""Writing a file so that readers see the old one or the whole new one, never half of it; and
whether a folder takes files at all, asked before a run starts."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

# What `partial_path` names, and nothing else: a folder swept may be the user's own (the
# output's root), where any hidden name with ".part" in it went (`.participants.csv`).
PARTIAL_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.part(\.[^.]+)?$")


def partial_path(final: Path) -> Path:
    """A unique hidden name beside `final`: on the same file system, so the rename is atomic,
    and ending in `final`'s suffix, for writers that go by it (numpy, ffmpeg)."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex}.part{final.suffix}")


@contextlib.contextmanager
def atomic_output(final: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes `final` in one rename when the block ends
    without error, and is removed otherwise. A crash leaves at most a hidden `.part` file,
    never a truncated `final` that a resumed run would take as done.

    `durable` also survives a host crash (power loss, kernel panic): the file reaches the disk
    before the rename and the rename before the block ends. Without it the rename can reach the
    disk before the data, leaving an empty `final`: fine for outputs that a run rows as done only
    after it, not for a cache that is trusted on sight (an export). It costs an fsync or two."""
    partial = partial_path(Path(final))
    try:
        yield partial
        if durable:
            sync_to_disk(partial)
        os.replace(partial, final)
        if durable:
            sync_to_disk(Path(final).parent, contents=False)
    finally:
        partial.unlink(missing_ok=True)


def sync_to_disk(path: Path, contents: bool = True) -> None:
    """fsync `path`: a file, or a folder with (`contents`) the files directly in it (an export
    made of a graph and its weights beside it). A folder's fsync makes the names in it, renames
    included, durable."""
    path = Path(path)
    if contents and path.is_dir():
        for entry in os.scandir(path):
            if entry.is_file(follow_symlinks=False):
                sync_to_disk(Path(entry.path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A partial file this old is an orphan: no export, download, transcode or depth map takes an
# hour, and a process killed with SIGKILL (or ended without teardown) never removes its own.
STALE_PARTIAL_S = 3600.0


def remove_stale_partials(
    folder: Path, final_name: str | None = None, older_than_s: float = STALE_PARTIAL_S
) -> int:
    """Remove the partial files (`partial_path`) in `folder` older than `older_than_s`: all of
    them, or those of `final_name`. Returns how many went. One directory scan: call it once per
    folder and run, not once per file."""
    prefix = f".{final_name}." if final_name else "."
    cutoff = time.time() - older_than_s
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(prefix) and PARTIAL_NAME.match(entry.name) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):  # another process took it first
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
    return removed


class FolderNotWritableError(ValueError):
    """An output folder that cannot be made or written to (check_writable_folder)."""


def check_writable_folder(folder: Path) -> None:
    """Make `folder` (and its parents) and write a file there, or raise ValueError saying why:
    a run that cannot write its output should fail before its first download, not with a
    traceback when its first rows are due."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vidflow-write-check-"):
            pass
    except OSError as exc:
        raise FolderNotWritableError(f"cannot write to the output folder {folder}: {exc}") from exc


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on the file `path` (made if missing) until the block ends,
    waiting for it; yields whether it is held: on a file system without locks (some network
    mounts) or where the file cannot be made, False, and the caller goes on unlocked. Ends
    with its holder, even SIGKILLed. The one lock of the cache's writers (the batching memo,
    the ONNX export, the depth stand-in), so each does not keep its own."""
    try:
        lock = open(path, "a")  # noqa: SIM115 (closed below: closing releases the lock)
    except OSError:  # a read-only cache: no lock to hold, and the caller goes on as without one
        yield False
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            yield False
        else:
            yield True
