"""Batch children (ffmpeg): they die with the process that started them, even when it is
SIGKILLed, and run the asked number of steps below it, with and without setpriv and nice, and
with a setpriv too old to set a death signal."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from common import processes
from common.processes import batch_child
from tasks.depth.settings import DepthSettings
from tasks.depth.transcode import transcode
from tasks.depth.video_record import VideoRecord
from tests.conftest import VIDEOS

REPO = Path(__file__).resolve().parents[1]

# util-linux 2.32's setpriv (RHEL 8) as it answers an option it does not have (--pdeathsig came
# in 2.33); it counts its runs in the file named by $SETPRIV_RUNS.
OLD_SETPRIV = """#!/bin/sh
[ -n "$SETPRIV_RUNS" ] && echo run >> "$SETPRIV_RUNS"
for arg in "$@"; do
    case "$arg" in
        --pdeathsig)
            echo "setpriv: unrecognized option '--pdeathsig'" >&2
            echo "Try 'setpriv --help' for more information." >&2
            exit 1 ;;
        --) break ;;
    esac
done
exec /usr/bin/setpriv "$@"
"""


def _old_setpriv_first_on_path(folder: Path) -> str:
    """A PATH whose `setpriv` is OLD_SETPRIV (in `folder`), the rest as it was."""
    script = folder / "setpriv"
    script.write_text(OLD_SETPRIV)
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture
def launchers_asked_again() -> Iterator[None]:
    """`_launchers` asks again in this test, and again after it (its answer is cached)."""
    processes._launchers.cache_clear()
    yield
    processes._launchers.cache_clear()


# A parent that starts `sleep 60` as a batch child, prints its pid, and waits to be killed.
# "fallback" makes it use the preexec_fn path, as on a machine without setpriv or nice.
PARENT = """
import subprocess, sys, time
from common import processes
if sys.argv[1] == "fallback":
    processes._launchers = lambda: None
args, preexec_fn = processes.batch_child(["sleep", "60"], int(sys.argv[2]))
child = subprocess.Popen(args, preexec_fn=preexec_fn)
print(child.pid, flush=True)
time.sleep(60)
"""


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(name, status, niceness) of a process, or None once it is gone."""
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)  # a new handle each time: the name changes at each exec
        return process.name(), process.status(), process.nice()
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent death signal: Linux")
@pytest.mark.parametrize("path", ["launchers", "fallback", "old-setpriv"])
def test_a_batch_child_runs_lower_and_dies_with_its_killed_parent(
    path: str, tmp_path: Path
) -> None:
    lower_by = 7
    env = dict(os.environ)
    if path == "old-setpriv":  # found on PATH, but without --pdeathsig: the fallback's way
        env["PATH"] = _old_setpriv_first_on_path(tmp_path)
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, path, str(lower_by)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while (facts := _stat(child)) is not None and facts[0] != "sleep":
            assert time.monotonic() < deadline, facts  # setpriv and nice exec it in turn
            time.sleep(0.01)
        assert facts is not None and facts[0] == "sleep"
        assert facts[2] == os.nice(0) + lower_by
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while (facts := _stat(child)) is not None and facts[1] != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"the child outlived its killed parent: {facts}"
        time.sleep(0.05)


def test_with_setpriv_and_nice_there_is_no_preexec_fn() -> None:
    """No preexec_fn, so Python can start the child with vfork, not a fork of a big worker."""
    args, preexec_fn = batch_child(["ffmpeg", "-version"], 10)
    if args[0] == "ffmpeg":
        pytest.skip("no setpriv or nice on this machine")
    assert preexec_fn is None
    assert args[-2:] == ["ffmpeg", "-version"] and "10" in args


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setpriv: Linux")
def test_a_setpriv_without_pdeathsig_is_asked_once_and_ffmpeg_runs_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launchers_asked_again: None
) -> None:
    """RHEL 8's setpriv (util-linux 2.32) has no --pdeathsig: every ffmpeg it was put in front
    of failed with "unrecognized option", so every transcode failed. It is tried once, and
    the preexec_fn does its work."""
    runs = tmp_path / "setpriv-runs"
    monkeypatch.setenv("PATH", _old_setpriv_first_on_path(tmp_path))
    monkeypatch.setenv("SETPRIV_RUNS", str(runs))
    record = VideoRecord(
        video_id="clip", source_url="http://h/v.mp4", raw_path=str(VIDEOS / "pool_cleaning.mp4")
    )
    done = transcode(record, tmp_path / "out", DepthSettings())
    assert not done.failed, done.error
    assert done.frame_count == 300
    args, preexec_fn = batch_child(["ffmpeg", "-version"], 10)
    assert args == ["ffmpeg", "-version"] and preexec_fn is not None
    assert runs.read_text().splitlines() == ["run"]  # one probe for the process, not one a call
