"""Finding the processes a stack, test or benchmark started, wherever they ended up (other
sessions and process groups, reparented to init), and stopping those and no others."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable

import psutil

log = logging.getLogger("vidflow.stack")


def marked_processes(variable: str, value: str) -> list[int]:
    """PIDs (this one aside) whose environment holds variable=value: what a stack started
    with its marker, and everything those started in turn."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):  # gone, or not ours to read
            if process.environ().get(variable) == value:
                found.append(process.pid)
    return found


def processes_with_descendants(matches: Callable[[str], bool]) -> list[psutil.Process]:
    """The processes (this one aside) whose command line `matches`, and their descendants."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if not matches(" ".join(process.info["cmdline"] or [])):
            continue
        found[process.pid] = process
        with contextlib.suppress(psutil.Error):  # ended meanwhile
            found.update((child.pid, child) for child in process.children(recursive=True))
    found.pop(os.getpid(), None)
    return list(found.values())


def end_processes(processes: Iterable[psutil.Process], grace_s: float) -> None:
    """SIGTERM each process, then SIGKILL those still there after `grace_s`, and wait (a few
    seconds at most) until those are gone too: a caller that went on at once still found
    them, their ports still open, on a loaded machine."""
    # psutil.Error: ended meanwhile, or not this account's to signal (a match by command line
    # may be another user's): said, left out of the wait, and the others are still ended.
    signalled = [process for process in processes if _signal(process, process.terminate)]
    _, alive = psutil.wait_procs(signalled, timeout=grace_s)
    killed = [process for process in alive if _signal(process, process.kill)]
    psutil.wait_procs(killed, timeout=KILLED_WAIT_S)


# How long a SIGKILLed process may take to be gone (a zombie its parent has not yet reaped
# counts as there to psutil).
KILLED_WAIT_S = 5.0


def _signal(process: psutil.Process, send: Callable[[], None]) -> bool:
    """Whether `send` reached `process` (False where it had ended or may not be signalled)."""
    try:
        send()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error as exc:
        log.warning("could not stop process %d: %s", process.pid, exc)
        return False
    return True


def kill_marked_processes(variable: str, value: str, grace_s: float = 10) -> list[int]:
    """End every process marked variable=value (`end_processes`); their PIDs.

    A process may start another while it is being stopped (a worker launching a flow run, Ray
    a worker): a few more rounds catch those.
    """
    stopped: list[int] = []
    for _ in range(3):
        if not (pids := marked_processes(variable, value)):
            break
        doomed = []
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                doomed.append(psutil.Process(pid))
        end_processes(doomed, grace_s)
        stopped += [pid for pid in pids if pid not in stopped]
    if stopped:
        log.info("stopped %d leftover processes of this run", len(stopped))
    return stopped


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid`, or one it started, listens on TCP `port`."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for process in family:
        with contextlib.suppress(psutil.Error):
            for connection in process.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                    return True
    return False
