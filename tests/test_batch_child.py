"""Batch children (ffmpeg): they die with the process that started them, even when it is
SIGKILLed, and run the asked number of steps below it, with and without setpriv and nice."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.processes import batch_child

REPO = Path(__file__).resolve().parents[1]

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
@pytest.mark.parametrize("path", ["launchers", "fallback"])
def test_a_batch_child_runs_lower_and_dies_with_its_killed_parent(path: str) -> None:
    lower_by = 7
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, path, str(lower_by)],
        cwd=REPO,
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
