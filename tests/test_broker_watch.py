"""The broker watch's reading of librdkafka's callbacks, in the orders they can be served.

These are unit tests with librdkafka-shaped events: an error served long after it was raised
(a client that did not poll for a while) cannot be timed on purpose with a real broker; the
real outages are in test_stream_faults.py."""

from __future__ import annotations

import json
import os
import time

import pytest
from confluent_kafka import KafkaError

from tasks.stream.broker_watch import BrokerLostError, BrokerWatch
from tasks.stream.kafka_io import message_timeout_ms, producer_config
from tasks.stream.settings import KafkaSettings


def _stats(*brokers: tuple[str, float]) -> str:
    """A statistics snapshot: each broker connection's state and its age in seconds."""
    listed = {f"b{i}": {"state": state, "stateage": int(age * 1e6)}
              for i, (state, age) in enumerate(brokers)}  # fmt: skip
    return json.dumps({"brokers": listed})


def test_an_outage_served_late_ends_when_its_queued_snapshots_show_the_broker_back() -> None:
    """The error, the snapshots of the outage and those after it are served together, long
    after the broker came back: every UP connection is older than the outage's start as the
    watch sees it, and the broker was declared lost after the grace while it was up."""
    watch = BrokerWatch("127.0.0.1:9092", grace_s=0.01)
    watch.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    watch.on_stats(_stats(("DOWN", 3.0), ("INIT", 3.0)))  # queued during the outage
    watch.on_stats(_stats(("UP", 40.0), ("INIT", 50.0)))  # back 40 s before it was served
    assert not watch.down
    time.sleep(0.02)  # past the grace
    watch.check()  # not lost


def test_a_snapshot_from_before_the_outage_does_not_end_it() -> None:
    watch = BrokerWatch("127.0.0.1:9092", grace_s=0.01)
    watch.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    watch.on_stats(_stats(("UP", 60.0)))  # taken before the connection dropped
    assert watch.down
    time.sleep(0.02)  # past the grace
    with pytest.raises(BrokerLostError, match="lost the Kafka broker"):
        watch.check()
    watch.on_stats(_stats(("UP", 0.0)))  # a connection that came up since: back
    assert not watch.down


def test_a_queued_message_outlasts_the_wait_for_its_broker() -> None:
    """librdkafka fails a message after 300 s: with `--broker-grace-s 600` an outcome queued
    in an outage failed while the run still waited for the broker, was counted nowhere, and
    its partition committed nothing more for the rest of the run."""
    assert message_timeout_ms(600.0) > 600_000 and message_timeout_ms(30.0) == 300_000
    # ... and the producer is given it (the settings `make_producer` builds its client from)
    long_grace = KafkaSettings(bootstrap_servers="127.0.0.1:9092", broker_grace_s=600.0)
    assert producer_config(long_grace)["message.timeout.ms"] == message_timeout_ms(600.0)


def test_a_grace_of_weeks_or_none_is_refused_or_capped_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--broker-grace-s 3000000` overflowed librdkafka's int (a traceback at start), and
    `inf` raised OverflowError; a poll interval under the session timeout was librdkafka's
    traceback from inside the consumer's start."""
    assert message_timeout_ms(3_000_000.0) == 2**31 - 1
    for variable in [name for name in os.environ if name.upper().startswith("VIDFLOW_KAFKA_")]:
        monkeypatch.delenv(variable)  # the developer's own broker settings
    with pytest.raises(ValueError, match="finite number"):
        KafkaSettings(broker_grace_s=float("inf"))
    with pytest.raises(ValueError, match="must be at least --session-timeout-ms"):
        KafkaSettings(max_poll_interval_ms=5000, session_timeout_ms=10_000)
