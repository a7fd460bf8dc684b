"""Kafka clients: the one producer and group-member configuration, and producing with
back-pressure.

Both the frame producer and the consumer's publisher write through these, so a full local queue
or a lost broker is handled the same way on both sides; the consumer and the benchmarks' naive
loop join their groups with the same settings, and a consumer leaves its group through
`leave_group`, which keeps librdkafka's close from waiting for ever on a rebalance.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer

from tasks.stream.broker_watch import BrokerWatch
from tasks.stream.frame_codec import Headers
from tasks.stream.settings import KafkaSettings

log = logging.getLogger(__name__)

QUIET_S = 0.2  # after leaving, how long no rebalance callback may come before close

DeliveryCallback = Callable[[KafkaError | None, Message], None]


class Membership:
    """What a group member's rebalance callbacks said last, for `leave_group`. The callbacks
    run inside `poll`, on the member's own thread."""

    def __init__(self) -> None:
        self.joined = threading.Event()  # its first assignment came (possibly of no partition)
        self.settled = False  # the last callback was an assignment: no rebalance under way
        self.revokes = 0
        self.callbacks = 0

    def assigned(self) -> None:
        self.settled, self.callbacks = True, self.callbacks + 1
        self.joined.set()

    def revoked(self) -> None:
        self.settled, self.revokes, self.callbacks = False, self.revokes + 1, self.callbacks + 1


def leave_group(
    consumer: Consumer,
    membership: Membership,
    wait_s: float,
    gone: Callable[[], bool],
    close_s: float = 5.0,
) -> bool:
    """Hand the member's partitions back in `poll`, then close it; whether it was closed.

    A rebalance left for `close` is answered inside it by confluent-kafka, with a librdkafka
    call that waits for the closing group while holding Python's GIL; that wait can last for
    ever (librdkafka#4041, #4884). Seen here in about one `vidflow consume` of 30 stopped as it
    joined its group: py-spy showed rd_kafka_assign or rd_kafka_rebalance_protocol in
    Consumer_rebalance_cb under rd_kafka_consumer_close, and every other thread waiting for the
    GIL, so not even `close_within` could go on. So every rebalance is served in `poll` first:
    a rebalance under way is let finish (the last callback an assignment), the member
    unsubscribes, its revoke is served, and a short quiet spell must bring no other callback.
    Where any of that does not happen within `wait_s`, or the broker is `gone()`, the client is
    not closed: it is freed when Python frees it (at the latest as its process ends), without
    waiting for the group (RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE); until then a member whose
    broker is up stays in the group, which drops it one session timeout after that.
    Frames fetched meanwhile are dropped: uncommitted, so the group's next member reads them."""
    deadline = time.monotonic() + wait_s

    def serve(done: Callable[[], bool], step: str) -> bool:
        while not done():
            if gone() or time.monotonic() >= deadline:
                log.warning("not closing the group member: %s did not happen within %.0f s%s",
                            step, wait_s, " (the broker is gone)" if gone() else "")  # fmt: skip
                return False
            consumer.poll(0.1)
        return True

    try:
        consumer.poll(0)
        if not serve(lambda: membership.settled, "the end of its rebalance"):
            return False
        consumer.unsubscribe()
        revokes = membership.revokes
        if not serve(lambda: membership.revokes > revokes and not consumer.assignment(),
                     "the revoke of its partitions"):  # fmt: skip
            return False
        callbacks, quiet_until = membership.callbacks, time.monotonic() + QUIET_S
        if not serve(lambda: time.monotonic() >= quiet_until, "a quiet spell"):
            return False
        if membership.callbacks != callbacks:
            log.warning("not closing the group member: a rebalance came after it left")
            return False
        if not close_within(consumer, close_s):
            log.warning("closing the group member took over %.0f s: going on without it", close_s)
            return False
    except Exception as exc:  # the summary and the service's channel must still be handled
        log.warning("not closing the group member: leaving failed: %s", exc)
        return False
    return True


def close_within(consumer: Consumer, timeout_s: float) -> bool:
    """Leave the group and free the client, waiting at most `timeout_s`; whether it ended.

    librdkafka's close can wait for ever on a group that will not settle: seen here once with
    two members idling out together, one of them told "unknown member" on its last commit,
    revoked, then still in `close` minutes later (the process never exited). confluent-kafka
    releases the GIL for that wait, so the close runs on a thread of its own and the caller goes
    on after `timeout_s`; the group then drops the member after its session timeout, as it
    does one whose process died. (Not for a rebalance left to `close`: that one is answered
    holding the GIL, which `leave_group` keeps from happening.)"""
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


def message_timeout_ms(broker_grace_s: float) -> int:
    """How long a produced message may wait for the broker: past the grace, and at least
    librdkafka's default (300 s)."""
    return min(2**31 - 1, max(300_000, int((broker_grace_s + 60.0) * 1000)))  # librdkafka's int


# The most a producer queues for the broker, unless one message is bigger (KiB)
QUEUE_KBYTES = 64 * 1024


def queue_kbytes(max_message_bytes: int) -> int:
    """A producer's local queue: QUEUE_KBYTES, or room for two of the largest messages."""
    return max(QUEUE_KBYTES, 2 * max_message_bytes // 1024 + 1)


def make_producer(kafka: KafkaSettings, watch: BrokerWatch | None = None) -> Producer:
    """The producer of frames and results; `watch` hears of its broker connection's state."""
    return Producer(producer_config(kafka, watch))


def producer_config(kafka: KafkaSettings, watch: BrokerWatch | None = None) -> dict[str, Any]:
    """`make_producer`'s librdkafka settings."""
    return {
        **kafka.client_config(),
        "message.max.bytes": kafka.max_message_bytes,
        "acks": "all",
        "linger.ms": 2,
        "enable.idempotence": False,  # an idempotent producer dies on a broker restart
        # A message queued while the broker is away fails only once the run has given up
        # on it: at librdkafka's 300 s, an outcome queued in a longer grace failed with the
        # broker "down", was counted nowhere, and froze its partition's commits for good.
        "message.timeout.ms": message_timeout_ms(kafka.broker_grace_s),
        # librdkafka queues up to 1 GiB by default: `--fps max` to a broker slower than the
        # source ran far ahead of it (its fps counting frames queued, not delivered), then
        # the exit's flush gave up on what was left. A few seconds of frames hold the
        # source back instead (produce_with_backpressure), and the flush ends in time.
        "queue.buffering.max.kbytes": queue_kbytes(kafka.max_message_bytes),
        **(watch.client_config() if watch is not None else {}),
    }


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
        "max.poll.interval.ms": kafka.max_poll_interval_ms,
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
    stopped: Callable[[], bool] | None = None,
) -> bool:
    """Queue one message, waiting while librdkafka's local queue is full; whether it was.

    A full queue (BufferError) means the broker takes messages slower than they come: serve
    delivery reports for `poll_s` to make room, then retry. The broker is checked meanwhile, so
    one gone for longer than its grace ends the wait (BrokerLostError) instead of blocking, and
    so is `stopped` (a Ctrl-C waited for the grace's end, or for ever where the broker was up
    but refused the messages with a retriable error): the message is then not queued."""
    placement = {} if partition is None else {"partition": partition}
    while True:
        try:
            producer.produce(
                topic, key=key, value=value, headers=headers, on_delivery=on_delivery, **placement
            )
            return True
        except BufferError:
            producer.poll(poll_s)
            watch.check()
            if stopped is not None and stopped():
                return False
