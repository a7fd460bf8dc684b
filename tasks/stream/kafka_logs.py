"""librdkafka's own log lines, through Python logging and without repeats.

While a broker is down librdkafka prints every failed connection attempt to stderr, about 20
lines a second ("Connect to ipv4#... failed: Connection refused"), burying the one line that
says what is wrong. Given to a client as its `logger` (confluent-kafka's setting), they go
through Python logging with the run's timestamps instead, each distinct line at most once a
minute; the clients' error callbacks (`BrokerWatch`) and `ensure_topics` say what it means.
No library does this filtering; it is a logging.Filter.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

LIBRDKAFKA_LOG = logging.getLogger("vidflow.librdkafka")
REPEAT_EVERY_S = 60.0
_MAX_REMEMBERED = 1000
# The part of a line that changes between two reports of the same failure.
_VARYING = re.compile(
    r"\s*\((after \d+ms in state \w+)?(, )?(\d+ identical error\(s\) suppressed)?\)"
)


class OncePerInterval(logging.Filter):
    """Lets each distinct message through at most once per `interval_s`."""

    def __init__(self, interval_s: float = REPEAT_EVERY_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last_shown: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = _VARYING.sub("", record.getMessage())
        now = time.monotonic()
        with self._lock:
            if now - self._last_shown.get(key, -self.interval_s) < self.interval_s:
                return False
            if len(self._last_shown) >= _MAX_REMEMBERED:
                self._last_shown.clear()
            self._last_shown[key] = now
        return True


LIBRDKAFKA_LOG.addFilter(OncePerInterval())


def librdkafka_logging() -> dict[str, Any]:
    """The client setting that sends librdkafka's lines to `LIBRDKAFKA_LOG`."""
    return {"logger": LIBRDKAFKA_LOG}
