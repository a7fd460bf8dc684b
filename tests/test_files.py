"""Partial files: written under a hidden name, renamed whole; orphans of killed runs swept."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from common.files import (
    STALE_PARTIAL_S,
    atomic_output,
    exclusive_lock,
    partial_path,
    remove_stale_partials,
)


def _aged(path: Path, seconds: float) -> Path:
    path.write_bytes(b"half")
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_only_partials_older_than_an_hour_go(tmp_path: Path) -> None:
    final = tmp_path / "clip.mp4"
    final.write_bytes(b"whole")
    orphan = _aged(partial_path(final), STALE_PARTIAL_S + 60)  # a run killed long ago
    writing = _aged(partial_path(final), 5)  # another process writing it now
    other = _aged(partial_path(tmp_path / "other.mp4"), STALE_PARTIAL_S + 60)
    hidden = _aged(tmp_path / ".notes", STALE_PARTIAL_S + 60)  # not a partial file
    # Nor the user's own hidden files with ".part" in their names: the output's root is swept
    # too, and it may be any folder.
    users = [_aged(tmp_path / name, STALE_PARTIAL_S + 60) for name in (".participants.csv",
             ".env.part", ".a.part.mp4")]  # fmt: skip
    assert remove_stale_partials(tmp_path, final.name) == 1
    assert not orphan.exists() and writing.exists() and other.exists()
    assert remove_stale_partials(tmp_path) == 1  # every final name: other.mp4's orphan
    assert not other.exists() and writing.exists() and hidden.exists() and final.exists()
    assert all(path.exists() for path in users)
    assert remove_stale_partials(tmp_path / "missing") == 0


def test_a_durable_output_reaches_the_disk_before_its_rename_and_the_rename_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host crash cannot be caused here: what is checked is the order of the fsyncs that make
    # a trusted cache (an ONNX export) survive one, seen through the real calls.
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[
            1
        ],
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1]
    )
    final = tmp_path / "model.onnx"
    with atomic_output(final, durable=True) as partial:
        partial.write_bytes(b"graph")
    assert final.read_bytes() == b"graph"
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1] != str(final) and events[0][1].endswith(".onnx")  # the partial file
    assert events[2][1] == str(tmp_path)  # the folder: the new name itself

    events.clear()
    with atomic_output(tmp_path / "row.json") as partial:
        partial.write_text("{}")
    assert events == [("replace", str(tmp_path / "row.json"))]  # outputs rowed later: no fsync


def test_a_lock_where_none_can_be_made_lets_its_holder_go_on_unlocked(tmp_path: Path) -> None:
    """A read-only cache (the lock file cannot be made): the depth stand-in crashed on it, and
    every video of its shard failed, where the model would have run."""
    with exclusive_lock(tmp_path / "no-such-folder" / ".x.lock") as locked:
        assert locked is False
    with exclusive_lock(tmp_path / ".x.lock") as locked:
        assert locked is True


def test_an_output_whose_writing_fails_is_neither_kept_nor_left_half_written(
    tmp_path: Path,
) -> None:
    """A block that raises (a full disk): no file under the final name, which a resumed run
    would take as done, and no partial left (found in review, stop 57: only blocks that
    succeed were tried)."""
    with pytest.raises(OSError, match="disk full"), atomic_output(tmp_path / "cut.mp4") as part:
        part.write_bytes(b"half a clip")
        raise OSError(28, "disk full")
    assert list(tmp_path.iterdir()) == []
