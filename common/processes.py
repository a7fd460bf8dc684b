"""Stopping child processes the same way everywhere: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from collections.abc import Callable


def stop_process(process: subprocess.Popen, timeout_s: float) -> int:
    """Ask a child to stop, give it `timeout_s` to drain, then kill it; return its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _resolve_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


# Resolved here, not in the child: between fork and exec the child may only make plain calls.
_PRCTL = _resolve_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for a child that must not outlive the thread that started it.

    Linux delivers SIGKILL to the child when its parent dies, even by SIGKILL, so a killed run
    leaves no ffmpeg or server behind. Hand-written: one prctl call is smaller than a
    dependency. Elsewhere it does nothing.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def signal_on_parent_death() -> None:
    """`preexec_fn` for a watcher: SIGTERM (which it can catch) when its parent dies.

    Unlike `die_with_parent`, the child lives on to clean up after the parent, e.g. to end the
    processes a SIGKILLed parent could no longer stop.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
