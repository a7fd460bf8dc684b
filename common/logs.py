"""Logging set-up shared by every vidflow command: ISO timestamps, stderr and an optional file."""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from common.settings import LogSettings


class IsoFormatter(logging.Formatter):
    """Formats times as ISO-8601 UTC with milliseconds, so lines from many hosts sort together."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")


QUIET_LOGGERS = ("httpx", "httpcore")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(settings: LogSettings | None = None) -> None:
    """Send vidflow's log lines to stderr and, when configured, to a file."""
    settings = settings or LogSettings()
    formatter = IsoFormatter(LOG_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file is not None:
        Path(settings.file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(settings.file, encoding="utf-8"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # The level this process chose (`--log-level` too) is the one its flow runs log at
    # (flows.run_logs) and the one its child processes read.
    os.environ["VIDFLOW_LOG_LEVEL"] = settings.level.upper()
    # Client libraries log every HTTP request at INFO (the Prefect API client sends many).
    for chatty in QUIET_LOGGERS:
        logging.getLogger(chatty).setLevel(max(root.level, logging.WARNING))
