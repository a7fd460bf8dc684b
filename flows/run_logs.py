"""The stream's own log lines (producer and consumers, the `tasks.stream` loggers) in the flow
run's log in the Prefect UI, not only on the terminal or a worker's console.

Prefect sends its own loggers' records to its API, and those of loggers named in
PREFECT_LOGGING_EXTRA_LOGGERS, read once when Prefect starts: every terminal and deployment
worker would have to be given it. A handler on the loggers for the flow run's length does it
for every start. Lines from threads that carry no run context (librdkafka's, a producer's camera
threads) stay on the console: Prefect could not say which run they belong to.

The loggers' level is the run's too: where nothing set one (a deployment's flow run, where
Prefect leaves the root logger at WARNING), their INFO lines (the producer's start, the
consumers' progress every 5 s) were never made, and the UI showed only warnings. For the run's
length they log at VIDFLOW_LOG_LEVEL (default INFO), as the `vidflow` commands do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_ours: dict[str, tuple[logging.Handler, int]] = {}  # logger name -> our handler, runs using it
_levels_set: dict[str, int] = {}  # logger name -> the level we set (undone with our handler)


@contextlib.contextmanager
def logs_in_run(logger_name: str) -> Iterator[None]:
    """While the flow runs: `logger_name`'s records from its flow and task runs go to its log.

    One handler per logger however many flow runs of this process use it at once (each record
    says its own run), removed when the last of them ends."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(logger_name)
    with _lock:
        handler, users = _ours.get(logger_name, (None, 0))
        # PREFECT_LOGGING_EXTRA_LOGGERS named it or a logger above it (records propagate up):
        # Prefect sends its records already, and a handler here sent every line twice.
        prefect_sends = handler is None and _sends_to_api(logger, APILogHandler)
        if handler is None and not prefect_sends:
            handler = APILogHandler()
            handler.addFilter(lambda _: bool(FlowRunContext.get() or TaskRunContext.get()))
            logger.addHandler(handler)
            _lower_level_for_the_run(logger)
        if handler is not None:
            _ours[logger_name] = (handler, users + 1)
    if handler is None:
        yield
        return
    try:
        yield
    finally:
        with _lock:
            handler, users = _ours.pop(logger_name)
            if users > 1:
                _ours[logger_name] = (handler, users - 1)
            else:
                logger.removeHandler(handler)
                # Undone only if still ours: a level set meanwhile is someone else's choice.
                if _levels_set.pop(logger_name, None) == logger.level:
                    logger.setLevel(logging.NOTSET)


def _lower_level_for_the_run(logger: logging.Logger) -> None:
    """VIDFLOW_LOG_LEVEL for `logger` where nothing set its level and it would log less."""
    # The variable as it is, not through LogSettings: a name it refuses (the command that
    # set it refused it first) must not crash a deployment's run (a number for a known name).
    wanted = logging.getLevelName(os.environ.get("VIDFLOW_LOG_LEVEL", "INFO").strip().upper())
    if not isinstance(wanted, int):
        return
    if logger.level == logging.NOTSET and logger.getEffectiveLevel() > wanted:
        logger.setLevel(wanted)
        _levels_set[logger.name] = wanted


def _sends_to_api(logger: logging.Logger, handler_type: type[logging.Handler]) -> bool:
    """Whether `logger`'s records reach a handler of `handler_type` on it or above it."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(isinstance(handler, handler_type) for handler in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False
