"""Partial files: written under a hidden name, renamed whole; orphans of killed runs swept."""

from __future__ import annotations

import os
import time
from pathlib import Path

from common.files import STALE_PARTIAL_S, partial_path, remove_stale_partials


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
    assert remove_stale_partials(tmp_path, final.name) == 1
    assert not orphan.exists() and writing.exists() and other.exists()
    assert remove_stale_partials(tmp_path) == 1  # every final name: other.mp4's orphan
    assert not other.exists() and writing.exists() and hidden.exists() and final.exists()
    assert remove_stale_partials(tmp_path / "missing") == 0
