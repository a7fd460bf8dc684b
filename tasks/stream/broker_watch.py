"""Noticing a Kafka broker that is gone for good, so a stream command ends instead of idling.

librdkafka reconnects for ever and queues what it cannot send (for minutes), so on its own a
client with a dead broker looks merely idle. Its callbacks say more: `error_cb` reports
`_ALL_BROKERS_DOWN` the moment the last connection drops, and the statistics (`stats_cb`) list
each broker connection's state and its age once a second: a connection that came UP after the
outage began means the broker is back. A broker away for longer than the grace is lost.

A message read proves nothing (a consumer hands out prefetched messages), and neither does
the report of a message made before the outage (reports queued then can be served after it);
the report of one made after the outage began does (`delivered`): a broker back during a
producer's last flush read as lost until the next statistics came, if any did.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, Message

from tasks.stream.kafka_logs import librdkafka_logging

log = logging.getLogger(__name__)
STATS_INTERVAL_MS = 1000


class BrokerLostError(RuntimeError):
    """The broker has been unreachable for longer than the grace (or the client hit a fatal
    error): nothing more can be delivered or committed."""


class BrokerWatch:
    """Tells a broker that is gone from one that blinks, from librdkafka's own callbacks.

    librdkafka calls back on whichever thread polls: a stream command's own thread, or the
    threads of a producer's several sources. Each callback reads and writes the outage's start
    once (a reference swap under the GIL): at worst a report and a snapshot both say the broker
    is back.
    """

    def __init__(self, bootstrap_servers: str, grace_s: float) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.grace_s = grace_s
        self.last_error: str | None = None
        self._down_since: float | None = None
        self._down_since_wall = 0.0  # the same moment by the wall clock (message timestamps)
        self._stats_saw_down = False  # a statistics snapshot with no broker UP since then
        self._fatal: str | None = None

    def client_config(self) -> dict[str, Any]:
        """Settings that route a client's error and statistics callbacks here."""
        return {
            **librdkafka_logging(),
            "error_cb": self.on_error,
            "stats_cb": self.on_stats,
            "statistics.interval.ms": STATS_INTERVAL_MS,
        }

    def on_error(self, error: KafkaError) -> None:
        self.last_error = error.str()
        if error.fatal():
            self._fatal = error.str()
        if error.code() == KafkaError._ALL_BROKERS_DOWN and self._down_since is None:
            # The wall clock first: a delivery read on another thread that sees the outage
            # sees its start too.
            self._down_since_wall, self._stats_saw_down = time.time(), False
            self._down_since = time.monotonic()
            log.warning(
                "lost the connection to the Kafka broker %s; waiting up to %.0f s for it",
                self.bootstrap_servers, self.grace_s,
            )  # fmt: skip

    def on_stats(self, stats_json: str) -> None:
        if self._down_since is None:
            return
        brokers = json.loads(stats_json).get("brokers", {}).values()
        up_for_s = [b.get("stateage", 0) / 1e6 for b in brokers if b.get("state") == "UP"]
        if not up_for_s:
            self._stats_saw_down = True
            return
        # A snapshot may predate the outage: a connection counts if it came UP since then, or
        # after a snapshot that had none UP. (The outage starts when its error is served, which
        # a member that did not poll for a while serves late, after the broker is back: its
        # connections then all came UP "before the outage", and it was lost after the grace.)
        if self._stats_saw_down or min(up_for_s) < self.down_for_s():
            self.alive()

    def delivered(self, message: Message | None) -> None:
        """The broker took `message`: it is back, if it was away, where the message was made
        after the outage began (its create time, which librdkafka stamps at produce)."""
        if self._down_since is None or message is None:
            return
        kind, stamped_ms = message.timestamp()  # LogAppendTime would be the broker's clock
        # Compared in whole ms, as librdkafka stamps: a frame made in the outage's first
        # millisecond read as made before it (CI: ten frames, all within that ms).
        if kind == TIMESTAMP_CREATE_TIME and stamped_ms >= int(self._down_since_wall * 1000):
            self.alive()

    def alive(self) -> None:
        """A connection to the broker came up again."""
        since, self._down_since = self._down_since, None  # read once: another thread may too
        if since is not None:
            log.info(
                "the Kafka broker %s is back after %.1f s",
                self.bootstrap_servers, time.monotonic() - since,
            )  # fmt: skip

    @property
    def down(self) -> bool:
        """No connection to any broker right now (or a fatal client error)."""
        return self._down_since is not None or self._fatal is not None

    @property
    def fatal(self) -> bool:
        """A fatal client error: nothing more can be delivered, whatever the broker does."""
        return self._fatal is not None

    def down_for_s(self) -> float:
        since = self._down_since  # read once: another thread may end the outage meanwhile
        return 0.0 if since is None else time.monotonic() - since

    def check(self) -> None:
        """Raise BrokerLostError once the broker has been away for longer than the grace."""
        if self._fatal is not None:
            raise BrokerLostError(f"Kafka broker {self.bootstrap_servers}: {self._fatal}")
        if self._down_since is not None and self.down_for_s() >= self.grace_s:
            raise BrokerLostError(self.describe())

    def describe(self) -> str:
        return (
            f"lost the Kafka broker {self.bootstrap_servers}: no connection for "
            f"{self.down_for_s():.0f} s (grace {self.grace_s:.0f} s; last error: {self.last_error})"
        )
