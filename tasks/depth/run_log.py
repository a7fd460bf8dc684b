"""The Prefect run's logger for code that runs in a flow or task run, so its lines reach the
run's log in the UI: a module logger's lines on a Ray worker stay in the worker's own log,
which a private Ray keeps from the console and the UI."""

from __future__ import annotations

import logging


def run_logger(fallback: logging.Logger) -> logging.Logger | logging.LoggerAdapter:
    """The flow or task run's logger, or `fallback` outside a run (a thread of its own, a
    test, a library user)."""
    from prefect import get_run_logger
    from prefect.context import FlowRunContext, TaskRunContext

    in_run = TaskRunContext.get() is not None or FlowRunContext.get() is not None
    return get_run_logger() if in_run else fallback
