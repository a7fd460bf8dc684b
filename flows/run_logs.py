"""The stream's own log lines (producer and consumers, the `tasks.stream` loggers) in the flow
run's log in the Prefect UI, not only on the terminal or a worker's console.

Prefect sends its own loggers' records to its API, and those of loggers named in
PREFECT_LOGGING_EXTRA_LOGGERS, read once when Prefect starts: every terminal and deployment
worker would have to be given it. A handler on the loggers for the flow run's length does it
for every start. Lines from threads that carry no run context (librdkafka's, a producer's camera
threads) stay on the console: Prefect could not say which run they belong to.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def logs_in_run(logger_name: str) -> Iterator[None]:
    """While the flow runs: `logger_name`'s records from its flow and task runs go to its log."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(logger_name)
    if any(isinstance(handler, APILogHandler) for handler in logger.handlers):
        yield  # PREFECT_LOGGING_EXTRA_LOGGERS named it: Prefect sends them already
        return
    handler = APILogHandler()
    handler.addFilter(lambda _: bool(FlowRunContext.get() or TaskRunContext.get()))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
