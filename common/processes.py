"""Stopping processes the same way everywhere: a child with SIGTERM, a grace period, then
SIGKILL; this process's own job at its next step on SIGTERM or Ctrl-C."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


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


@functools.cache
def _launchers() -> tuple[str, str] | None:
    """util-linux's `setpriv` and coreutils' `nice`, where both are on PATH (on Linux only) and
    run a command the way `batch_child` asks them to; asked once per process."""
    if not sys.platform.startswith("linux"):
        return None
    setpriv, nice = shutil.which("setpriv"), shutil.which("nice")
    if not (setpriv and nice):
        return None
    return (setpriv, nice) if _launchers_work(setpriv, nice) else None


def _launchers_work(setpriv: str, nice: str) -> bool:
    """Whether `setpriv --pdeathsig KILL -- nice -n 1 true` runs: util-linux before 2.33 (RHEL
    8's setpriv) has no --pdeathsig, and with it every batch child, each ffmpeg, failed at once
    with "unrecognized option". Where it does not, the preexec_fn does their work (logged once)."""
    probe = [setpriv, "--pdeathsig", "KILL", "--", nice, "-n", "1", "true"]
    try:
        ran = subprocess.run(probe, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        why = f"{type(exc).__name__}: {exc}"
    else:
        if ran.returncode == 0:
            return True
        why = (ran.stderr.strip().splitlines() or [f"exit {ran.returncode}"])[-1]
    log.info("%s cannot start batch children, a preexec_fn does its work: %s", setpriv, why)
    return False


def batch_child(
    command: Sequence[str], niceness: int = 0
) -> tuple[list[str], Callable[[], None] | None]:
    """`(args, preexec_fn)` for subprocess to run `command` as a child that dies with the
    thread that starts it (as `die_with_parent`) and runs `niceness` steps lower.

    Where `setpriv` and `nice` are found and work (`_launchers_work`), they do both in front of
    the command (the death signal and the niceness survive their exec of it) and there is no
    preexec_fn. Then Python starts the child with vfork and runs no Python code in it: a
    preexec_fn is unsafe in a process with threads (a Ray worker has several, and Lance warns it
    is not fork-safe), and it needs a full fork of a process holding Prefect, Ray, Lance and
    OpenCV. Measured from such a process (`ffmpeg -version`, 30 runs): 13 ms and 13 CPU-ms a
    run, against 20 ms and 20 CPU-ms with a preexec_fn. Elsewhere a preexec_fn does both.
    """
    launchers = _launchers()
    if launchers is None:
        return list(command), functools.partial(_die_with_parent_below, niceness)
    setpriv, nice = launchers
    lowered = [nice, "-n", str(niceness)] if niceness else []
    return [setpriv, "--pdeathsig", "KILL", "--", *lowered, *command], None


def _die_with_parent_below(niceness: int) -> None:
    die_with_parent()
    if niceness:
        os.nice(niceness)


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """An event set by SIGTERM or Ctrl-C, so a job can finish its current step and report;
    `stop` if given, else a new one. A second Ctrl-C does not wait for that (exit 130)."""
    stop = stop or threading.Event()
    start_setting_from_handlers()

    def request_stop(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        set_from_handler(stop)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    return stop


# Events a signal handler asks to be set, and the thread that sets them. A handler runs on
# the main thread between two of its steps: `Event.set` there takes the event's lock, which the
# main thread holds for a moment in every `event.wait()`, and waited for its own thread for
# ever (a command that then ignored every SIGTERM); so would starting a thread (threading's own
# lock). A SimpleQueue's put is safe to call from a handler.
_TO_SET: queue.SimpleQueue[threading.Event] = queue.SimpleQueue()
_setter_started = threading.Lock()
_setter: threading.Thread | None = None


def start_setting_from_handlers() -> None:
    """Start the thread that sets the events handlers ask for (once; before any handler is
    installed that calls `set_from_handler`)."""
    global _setter
    with _setter_started:
        if _setter is None:
            _setter = threading.Thread(target=_set_asked, name="set-from-signal", daemon=True)
            _setter.start()


def _set_asked() -> None:
    while True:
        _TO_SET.get().set()


def set_from_handler(event: threading.Event) -> None:
    """Set `event` from a signal handler, without taking a lock the interrupted main thread may
    hold (`start_setting_from_handlers` must have run)."""
    _TO_SET.put(event)


def ignore_lance_fork_warning() -> None:
    """Lance warns on any fork once it is loaded, and a depth run forks only to exec at once
    (Ray's GCS and raylet, a temporary Prefect server): warnings on every run's stderr that
    asked nothing of the user."""
    warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
