"""Creates the topics a run needs (idempotent)."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from tasks.stream.kafka_logs import librdkafka_logging

log = logging.getLogger(__name__)


class BrokerUnreachableError(RuntimeError):
    """No answer from the bootstrap servers within the timeout (which already waits for a
    broker that is starting)."""


def ensure_topics(
    bootstrap_servers: str,
    topics: list[str],
    partitions: int,
    timeout_s: float = 15.0,
    *,
    client_config: dict[str, Any] | None = None,
) -> list[str]:
    """Create missing topics; return the ones created. Existing topics are left as they are.
    `client_config`: how to reach the broker (`KafkaSettings.client_config`: TLS, SASL)."""
    config = {"bootstrap.servers": bootstrap_servers, **(client_config or {})}
    admin = AdminClient({**config, **librdkafka_logging()})
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:  # say which broker, not only "transport failure"
        raise BrokerUnreachableError(
            f"Kafka broker {bootstrap_servers} unreachable for {timeout_s:.0f} s: {exc}"
        ) from exc
    missing = [t for t in dict.fromkeys(topics) if t not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in missing],
        operation_timeout=timeout_s,
    )
    created = []
    for topic, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            created.append(topic)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):  # another member created it first
                raise
    log.info("created topics %s with %d partitions", created, partitions)
    return created
