"""The task-run logs of a private Ray's workers reach the Prefect API before the workers end.

Prefect sends a process's log lines in batches, every 2 s by default
(PREFECT_LOGGING_TO_API_BATCH_INTERVAL), and a private Ray's workers end with it when the run
does: whatever they logged in their last 2 s was lost. On a 3-video run every task run's log in
the UI was empty, the warnings naming the failed videos included. A private Ray's processes
send every 0.5 s instead (a few more small requests a run), and its shutdown waits, if need be,
until that much has passed since the run's last task run ended (the commit, the Parquet export
and the artifacts after it usually take longer already). A running cluster's workers outlive
the run and send their lines in their own time.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

BATCH_INTERVAL_VARIABLE = "PREFECT_LOGGING_TO_API_BATCH_INTERVAL"
WORKER_LOG_INTERVAL_S = 0.5
_SEND_MARGIN_S = 0.3  # for the request itself

_last_task_run_done: float | None = None


@contextlib.contextmanager
def worker_log_interval() -> Iterator[None]:
    """While a private Ray starts and runs: its processes inherit this environment. A batch
    interval the user set stays theirs."""
    if BATCH_INTERVAL_VARIABLE in os.environ:
        yield
        return
    os.environ[BATCH_INTERVAL_VARIABLE] = str(WORKER_LOG_INTERVAL_S)
    try:
        yield
    finally:
        os.environ.pop(BATCH_INTERVAL_VARIABLE, None)


def note_task_run_done() -> None:
    """The driver saw a task run end (its result came back): its last log lines are queued in
    the worker that ran it."""
    global _last_task_run_done
    _last_task_run_done = time.monotonic()


def wait_for_worker_logs() -> None:
    """Before a private Ray shuts down: until its workers have had one batch interval since
    the last task run ended."""
    if _last_task_run_done is None:
        return
    interval = float(os.environ.get(BATCH_INTERVAL_VARIABLE, WORKER_LOG_INTERVAL_S))
    remaining = _last_task_run_done + interval + _SEND_MARGIN_S - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
