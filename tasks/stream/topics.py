"""Creates the topics a run needs (idempotent), and removes a sweep step's once read."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from tasks.stream.kafka_logs import librdkafka_logging
from tasks.stream.settings import KafkaSettings

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0  # long enough for a broker that is still starting


def start_timeout_s(kafka: KafkaSettings) -> float:
    """How long a command waits for the broker before it starts anything: START_TIMEOUT_S, or
    `broker_grace_s` where that is shorter (one knob for "how long to wait for the broker")."""
    return min(START_TIMEOUT_S, kafka.broker_grace_s)


class TopicNotCreatedError(RuntimeError):
    """The broker did not make a topic a run needs (a replication factor over its broker count,
    a cluster's topic policy, no answer in time): said in one line, with the topic."""


class BrokerUnreachableError(RuntimeError):
    """No answer from the bootstrap servers within the timeout (which already waits for a
    broker that is starting)."""


def check_broker(kafka: KafkaSettings, timeout_s: float | None = None) -> None:
    """Raise BrokerUnreachableError unless the broker answers within `timeout_s` (default:
    start_timeout_s): for a command to say so before it starts anything else (a Prefect server,
    a flow run)."""
    admin = AdminClient({**kafka.client_config(), **librdkafka_logging()})
    _partition_counts(admin, kafka, start_timeout_s(kafka) if timeout_s is None else timeout_s)


def _partition_counts(admin: AdminClient, kafka: KafkaSettings, timeout_s: float) -> dict[str, int]:
    """The broker's topics and their partition counts, or BrokerUnreachableError naming the
    broker (librdkafka says only "transport failure", and the same of a broker that is up but
    speaks another protocol)."""
    try:
        topics = admin.list_topics(timeout=timeout_s).topics
        return {name: len(metadata.partitions) for name, metadata in topics.items()}
    except KafkaException as exc:
        protocol = kafka.security_protocol
        hint = (
            ""
            if protocol == "PLAINTEXT"
            else f" (or it does not speak {protocol}: check --security-protocol)"
        )
        raise BrokerUnreachableError(
            f"Kafka broker {kafka.bootstrap_servers} unreachable for {timeout_s:.0f} s{hint}: {exc}"
        ) from exc


def ensure_topics(
    kafka: KafkaSettings, topics: list[str] | None = None, timeout_s: float | None = None
) -> list[str]:
    """Create the missing ones of `topics` (default: every topic of `kafka`) with
    `kafka.partitions` partitions and `kafka.replication_factor` replicas, reaching the broker
    as `kafka` says (TLS, SASL), waiting for it up to `timeout_s` (default: start_timeout_s to
    reach it, START_TIMEOUT_S for a slow broker to create them); return the ones created.
    Existing topics are left as they are."""
    reach_s = start_timeout_s(kafka) if timeout_s is None else timeout_s
    timeout_s = START_TIMEOUT_S if timeout_s is None else timeout_s
    partitions = kafka.partitions
    admin = AdminClient({**kafka.client_config(), **librdkafka_logging()})
    existing = _partition_counts(admin, kafka, reach_s)
    topics = kafka.topics if topics is None else topics
    missing = [t for t in dict.fromkeys(topics) if t not in existing]
    for topic in dict.fromkeys(topics):
        if 0 < existing.get(topic, partitions) < partitions:
            log.warning(
                "topic %s exists with %d partition(s), fewer than the %d asked for "
                "(--partitions): it is used as it is, so at most %d consumer(s) of a group get "
                "its messages; delete it, or add partitions with the cluster's tools",
                topic, existing[topic], partitions, existing[topic],
            )  # fmt: skip
    if not missing:
        return []
    futures = admin.create_topics(
        [
            NewTopic(t, num_partitions=partitions, replication_factor=kafka.replication_factor)
            for t in missing
        ],
        operation_timeout=timeout_s,
    )
    created = []
    for topic, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            created.append(topic)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):  # else another member created it first
                raise _not_created(topic, kafka, timeout_s, exc) from exc
    log.info(
        "created topics %s with %d partitions, replication factor %d",
        created, partitions, kafka.replication_factor,
    )  # fmt: skip
    return created


def _not_created(
    topic: str, kafka: KafkaSettings, timeout_s: float, exc: Exception
) -> TopicNotCreatedError:
    """Why `topic` was not made, in words: librdkafka's error by its name (its exception
    escaped as a traceback), or the wait's end (a TimeoutError that says nothing)."""
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    if isinstance(error, KafkaError):
        why = f"{error.name()}: {error.str()}"
    else:
        why = str(exc) or f"no answer within {timeout_s:g} s"
    return TopicNotCreatedError(
        f"the broker did not create topic {topic!r} ({kafka.partitions} partitions, "
        f"--replication-factor {kafka.replication_factor}): {why}"
    )


def topic_names(kafka: KafkaSettings, timeout_s: float = 15.0) -> set[str] | None:
    """The topics the broker has (all asked for: one asked by name may be made by asking, on a
    broker that creates topics on use); None where it does not answer in time."""
    admin = AdminClient({**kafka.client_config(), **librdkafka_logging()})
    try:
        return set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException:
        return None


def delete_topics(kafka: KafkaSettings, topics: list[str], timeout_s: float = 15.0) -> list[str]:
    """Delete `topics` from the broker; return those it could not delete (logged, not
    raised: what is left costs the broker's room, not the run's figures). One the broker does
    not have (a step that failed making its topics) is not left."""
    admin = AdminClient({**kafka.client_config(), **librdkafka_logging()})
    left = []
    for topic, future in admin.delete_topics(topics, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except Exception as exc:
            error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue  # not there: nothing left
            log.warning("could not delete topic %s: %s", topic, exc)
            left.append(topic)
    return left
