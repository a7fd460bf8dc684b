"""The Prefect run's logger for code that runs in a flow or task run, so its lines reach the
run's log in the UI: a module logger's lines on a Ray worker stay in the worker's own log,
which a private Ray keeps from the console and the UI."""

from __future__ import annotations

import logging


def in_run() -> bool:
    """Whether this code runs in a flow or task run (not in a thread of its own, a test or a
    library user's call)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def run_logger(fallback: logging.Logger) -> logging.Logger | logging.LoggerAdapter:
    """The flow or task run's logger, or `fallback` outside a run."""
    from prefect import get_run_logger

    return get_run_logger() if in_run() else fallback


def send_logs_now() -> None:
    """Send this process's queued log lines to the Prefect API before going on.

    Prefect sends them in batches every 2 s, and a private Ray's workers end with the run: on a
    short run every task run's log in the UI was empty, the warnings that name the failed videos
    included. Sending at once costs a new sender afterwards (~50 ms of CPU), so only a stage
    with failures does it (docs/benchmarks.md: a 0.5-s batch interval for every line cost 2-3 %
    of a 48-clip run). Only the log sender is drained: Prefect's `APILogHandler.flush` drains
    every queue service of the process, its events sender too."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.instance().drain()
