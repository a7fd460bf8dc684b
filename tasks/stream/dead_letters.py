"""Dead-letter copies: what goes to the dead-letter topic for a frame with no other outcome,
and sending the largest copy that librdkafka and the broker take."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, KafkaException, Message

from tasks.stream.frame_codec import (
    HEADER_DLQ_REASON,
    HEADER_DLQ_SOURCE,
    HEADER_DLQ_VALUE_DROPPED,
    Headers,
)
from tasks.stream.kafka_io import DeliveryCallback

log = logging.getLogger("tasks.stream.publisher")

DeadLetterCopy = tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]


# Kafka's refusals of a message too large: librdkafka's own and the broker's
TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


def dead_letter_copies(
    message: Message, reason: str, extra_headers: Sequence[tuple[str, bytes]] = ()
) -> list[DeadLetterCopy]:
    """What a dead-letter copy holds (key, value, headers), most first: the whole message with
    why it is dead-lettered and where it came from; without its value; then without its key
    and own headers, the reason cut short (fits the smallest message size librdkafka takes)."""
    source = f"{message.topic()}/{message.partition()}@{message.offset()}"
    why = [(HEADER_DLQ_SOURCE, source.encode()), *extra_headers]
    own = message.headers() or []
    dropped = [(HEADER_DLQ_VALUE_DROPPED, str(len(message.value() or b"")).encode())]
    return [
        (message.key(), message.value(), [*own, (HEADER_DLQ_REASON, reason.encode()), *why]),
        (message.key(), None, [*own, (HEADER_DLQ_REASON, reason.encode()), *why, *dropped]),
        (None, None, [(HEADER_DLQ_REASON, _cut(reason, 300)), *why, *dropped]),
    ]


def _cut(text: str, size: int) -> bytes:
    """`text` as UTF-8 in at most `size` bytes, never cut within a character."""
    return text.encode()[:size].decode("utf-8", "ignore").encode()


def send_dead_letter(
    copies: deque[DeadLetterCopy],
    publish: Callable[[bytes | None, bytes | None, Headers | None, DeliveryCallback], None],
    finish: DeliveryCallback,
) -> None:
    """Send the largest of `copies` left that librdkafka and then the broker take, through
    `publish` (to the dead-letter topic; raises only librdkafka's size refusal); `finish` gets
    the delivery report of the copy sent. A frame near the size limit is over it with the
    reason headers: librdkafka refuses it at once, a broker with a lower limit (Redpanda's
    batch size, a topic's max.message.bytes) in its delivery report. Either ended the member,
    on every restart: less is sent instead."""

    def on_delivery(error: KafkaError | None, delivered: Message) -> None:
        if error is not None and error.code() in TOO_LARGE and copies:
            log.warning("the broker refused the dead-letter copy as too large: sending less")
            send_dead_letter(copies, publish, finish)
            return
        finish(error, delivered)

    while copies:
        key, value, headers = copies.popleft()
        try:
            publish(key, value, headers, on_delivery)
            return
        except KafkaException as exc:  # over librdkafka's limit
            if not copies:
                finish(exc.args[0], None)
                return
            log.warning("the dead-letter copy is too large: sending less of the message")
