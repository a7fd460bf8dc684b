"""Kafka clients: the one producer and group-member configuration, and producing with
back-pressure.

Both the frame producer and the consumer's publisher write through these, so a full local queue
or a lost broker is handled the same way on both sides; the consumer and the benchmarks' naive
loop join their groups with the same settings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from tasks.stream.broker_watch import BrokerWatch
from tasks.stream.frame_codec import Headers
from tasks.stream.settings import KafkaSettings

log = logging.getLogger(__name__)

DeliveryCallback = Callable[[KafkaError | None, Message], None]


def leave_group(consumer: Consumer, timeout_s: float, joined: threading.Event) -> bool:
    """Hand the member's partitions back, then close it, within `timeout_s`; whether it ended.
    `joined` is set by the member's assignment callback.

    A rebalance left for `close` to answer is answered inside it by confluent-kafka, with a
    librdkafka call that waits for the closing group while holding Python's GIL; that wait can
    last for ever (librdkafka#4041, #4884). Seen here in about one `vidflow consume` of 30
    stopped as it joined its group (py-spy: rd_kafka_assign or rd_kafka_rebalance_protocol in
    Consumer_rebalance_cb under rd_kafka_consumer_close, every other thread waiting for the
    GIL, so not even `close_within` could go on). So, as #4527 suggests, every rebalance is
    answered in `poll` first: a join under way is let finish, the member unsubscribes and its
    revoke is served, and `close` finds nothing to answer. Frames fetched meanwhile are
    dropped: uncommitted, so the group's next member reads them."""
    deadline = time.monotonic() + timeout_s
    try:
        while not joined.is_set() and time.monotonic() < deadline:
            consumer.poll(0.1)
        consumer.unsubscribe()
        consumer.poll(0)
        while consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(0.1)
    except KafkaException as exc:  # close still tries, as it did before this step
        log.warning("giving partitions back before closing failed: %s", exc)
    return close_within(consumer, max(0.0, deadline - time.monotonic()))


def close_within(consumer: Consumer, timeout_s: float) -> bool:
    """Leave the group and free the client, waiting at most `timeout_s`; whether it ended.

    librdkafka's close can wait for ever on a group that will not settle: seen here once with
    two members idling out together, one of them told "unknown member" on its last commit,
    revoked, then still in `close` minutes later (the process never exited). confluent-kafka
    releases the GIL for the wait, so the close runs on a thread of its own and the caller goes
    on after `timeout_s`; the group then drops the member after its session timeout, as it
    does one whose process died."""
    failure: list[Exception] = []

    def close() -> None:
        try:
            consumer.close()
        except Exception as exc:  # raised again on the caller's thread
            failure.append(exc)

    closing = threading.Thread(target=close, name="kafka-consumer-close", daemon=True)
    closing.start()
    closing.join(timeout_s)
    if failure:
        raise failure[0]
    return not closing.is_alive()


def make_producer(kafka: KafkaSettings, watch: BrokerWatch | None = None) -> Producer:
    """The producer of frames and results; `watch` hears of its broker connection's state."""
    return Producer(
        {
            **kafka.client_config(),
            "message.max.bytes": kafka.max_message_bytes,
            "acks": "all",
            "linger.ms": 2,
            "enable.idempotence": False,  # an idempotent producer dies on a broker restart
            **(watch.client_config() if watch is not None else {}),
        }
    )


def consumer_config(kafka: KafkaSettings, group: str) -> dict[str, Any]:
    """A group member that commits by hand (only what is delivered) and fetches without delay."""
    return {
        **kafka.client_config(),
        "group.id": group,
        # Members take partitions in turn: a run's cameras sit on consecutive partitions
        # (producer.run_cameras), and the range assignor gave a run of 2 cameras on 4
        # partitions to one member of 2 whenever they fell in the same half.
        "partition.assignment.strategy": "roundrobin",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": kafka.session_timeout_ms,
        "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
        "fetch.wait.max.ms": kafka.fetch_wait_max_ms,
        "fetch.max.bytes": max(kafka.max_message_bytes, 52428800),
        "max.partition.fetch.bytes": kafka.max_message_bytes,
    }


def produce_with_backpressure(
    producer: Producer,
    watch: BrokerWatch,
    topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    on_delivery: DeliveryCallback,
    headers: Headers | None = None,
    partition: int | None = None,
    poll_s: float = 0.05,
) -> None:
    """Queue one message, waiting while librdkafka's local queue is full.

    A full queue (BufferError) means the broker takes messages slower than they come: serve
    delivery reports for `poll_s` to make room, then retry. The broker is checked meanwhile, so
    one gone for longer than its grace ends the wait (BrokerLostError) instead of blocking."""
    placement = {} if partition is None else {"partition": partition}
    while True:
        try:
            producer.produce(
                topic, key=key, value=value, headers=headers, on_delivery=on_delivery, **placement
            )
            return
        except BufferError:
            producer.poll(poll_s)
            watch.check()
