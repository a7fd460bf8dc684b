"""The stream runs' building blocks as Prefect tasks (topics, one consumer, one producer), and
the producer run side by side with its consumer group."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from common.settings import MAX_WAIT_S
from services.inference.settings import ClientSettings
from tasks.stream.consumer import ConsumerSummary, FrameConsumer, merge_summaries
from tasks.stream.input_end import InputEnd
from tasks.stream.producer import ProduceStats, produce_frames
from tasks.stream.settings import ConsumerSettings, KafkaSettings, ProducerSettings
from tasks.stream.topics import BrokerUnreachableError, ensure_topics

log = logging.getLogger(__name__)

# Once the producer has ended, its consumer group works to its ends however long that takes
# while the service answers; a stretch this long with no answer and no outcome means a service
# gone or hung. After a Ctrl-C, the group gets this long to finish the frames sent.
DRAIN_S = 10.0
# The producer waits this long at most for the group to join before its frames.
JOIN_WAIT_S = 60.0


def group_deadline_s(producer_s: float) -> float:
    """A member's deadline from its start, for the producer's end to come by: the join wait,
    the producer's `producer_s` and a drain (from then on, InputEnd decides)."""
    return JOIN_WAIT_S + producer_s + DRAIN_S


# Set to end this process's stream runs early (Ctrl-C of `vidflow stream-benchmark`): the
# producer stops at once, the consumers finish the frames already sent, and the run reports
# what it did. A flow parameter cannot carry an event; the CLI runs the flow in this process.
RUN_STOP = threading.Event()


def _worth_retrying(task: Any, task_run: Any, state: State) -> bool:
    """A broker that did not answer for the whole timeout is not retried (each try would wait
    that long again); a topic creation that failed is."""
    return not isinstance(state.result(raise_on_failure=False), BrokerUnreachableError)


@task(
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=_worth_retrying,
    task_run_name="create topics {kafka.frames_topic}",
)
def create_topics(kafka: KafkaSettings) -> list[str]:
    return ensure_topics(kafka)


@task(cache_policy=NO_CACHE)
def run_consumer(
    kafka: KafkaSettings,
    settings: ConsumerSettings,
    target: str,
    assigned: threading.Event,
    tls_ca: Path | None = None,
    input_end: InputEnd | None = None,
    failed: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> ConsumerSummary:
    """One group member; with `input_end`, it stops once the group has read every frame the
    run's producer delivered, and its idle timeout counts only once the producer has ended (a
    member whose partitions get no frames left the group mid-run: a rebalance in the figures).
    A member that fails, or stops early (a lost broker, a result it could not publish), sets
    `failed` (and `assigned`, so the producer waits for it no more). `stop` ends it now (its
    calls in flight finished, what it did committed)."""
    try:
        consumer = FrameConsumer(
            kafka, settings, target, stop=stop, tls_ca=tls_ca, input_end=input_end
        )
        watcher = threading.Thread(
            target=lambda: consumer.membership.joined.wait(settings.duration) and assigned.set(),
            daemon=True,
        )
        watcher.start()
        summary = consumer.run()
        if failed is not None and (summary.delivery_error or summary.broker_error):
            failed.set()  # its frames would go to nobody: the producer stops
        return summary
    except BaseException:
        if failed is not None:
            failed.set()
        raise
    finally:
        assigned.set()  # a member that ended is waited for no more


@task(cache_policy=NO_CACHE)
def run_producer(
    kafka: KafkaSettings,
    settings: ProducerSettings,
    duration_s: float,
    consumers_ready: list[threading.Event],
    consumer_failed: threading.Event | None = None,
    session: str | None = None,
) -> ProduceStats:
    """Frames for `duration_s` once every consumer has joined; none once a consumer has failed
    (the run fails with its error; frames for nobody would only fill the topic), or Ctrl-C."""
    ends = [RUN_STOP] if consumer_failed is None else [RUN_STOP, consumer_failed]

    # frames sent before the group has joined would only queue up
    def all_joined() -> bool:
        return all(ready.is_set() for ready in consumers_ready)

    _wait_until(all_joined, ends, JOIN_WAIT_S)
    if not (all_joined() or any(end.is_set() for end in ends)):
        log.warning(
            "%d of %d consumer(s) had no answer to their group join within %g s: producing "
            "all the same (a group coordinator the broker cannot give, a group ACL?)",
            sum(not ready.is_set() for ready in consumers_ready), len(consumers_ready),
            JOIN_WAIT_S,
        )  # fmt: skip
    stop, producing = threading.Event(), threading.Event()

    def stop_when_due() -> None:
        # From the first frame's schedule: the sources' opening and the broker client's start
        # came out of the run's length, a short capacity step's too (found in review, stop 62)
        _wait_until(lambda: producing.is_set() or stop.is_set(), ends, MAX_WAIT_S)
        _wait_until(stop.is_set, ends, duration_s)
        stop.set()

    threading.Thread(target=stop_when_due, daemon=True).start()
    try:
        return produce_frames(settings, kafka, stop, session, producing)
    finally:
        stop.set()  # ends the watch


def _wait_until(done: Callable[[], bool], ends: list[threading.Event], timeout_s: float) -> None:
    """Return once `done()` holds, one of `ends` is set, or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while not (done() or any(end.is_set() for end in ends)) and time.monotonic() < deadline:
        time.sleep(0.05)


def run_producer_and_group(
    kafka: KafkaSettings,
    producer: ProducerSettings,
    duration_s: float,
    group: ConsumerSettings,
    members: int,
    client: ClientSettings,
    label: str = "",
    read_on_until_idle: bool = False,
) -> tuple[ProduceStats, ConsumerSummary]:
    """The run's topics, then the producer and `members` consumers of `group` side by side as
    task runs (named by `label` and their part). The producer starts once every member has
    joined and stops if one fails; no member idles out before the producer has ended, and the
    members stop once they have answered every frame it delivered (`read_on_until_idle`: they
    read on until idle, as a named group draining an earlier run's frames). What the producer
    did, and the group's merged summary."""
    topics = create_topics(kafka)
    joined = [threading.Event() for _ in range(members)]
    input_end, failed, halt = InputEnd(stall_s=DRAIN_S), threading.Event(), threading.Event()
    member = (kafka, group, client.target)
    consumer_runs = [
        run_consumer.with_options(task_run_name=f"{label}consumer {i + 1}/{members}").submit(
            *member, joined[i], client.tls_ca, input_end, failed, halt, wait_for=[topics]
        )
        for i in range(members)
    ]
    producer_run = run_producer.with_options(task_run_name=f"{label}producer").submit(
        kafka, producer, duration_s, joined, failed, group.producer_session, wait_for=[topics]
    )
    produced: ProduceStats | None = None
    try:
        produced = producer_run.result()
    except BaseException as exc:  # the members idle out on the frames sent: then it is raised
        # An error not the producer's (the flow's SIGTERM, a second Ctrl-C) stops it, and the
        # members at once: they went on for the run's whole length, a backlog too.
        failed.set()
        if not isinstance(exc, Exception):
            halt.set()
        input_end.set(None)
        for run in consumer_runs:
            run.wait(timeout=group.duration + 10.0)
        raise
    input_end.set(None if read_on_until_idle else produced.frames_end())
    drained = threading.Event()
    threading.Thread(target=_cut_short_on_stop, args=(drained, halt), daemon=True).start()
    try:
        summaries = [run.result() for run in consumer_runs]
    except BaseException:  # a second Ctrl-C, SIGTERM while the group drains: it stops at once
        halt.set()
        raise
    finally:
        drained.set()
    return produced, merge_summaries(summaries)


def _cut_short_on_stop(drained: threading.Event, halt: threading.Event) -> None:
    """A Ctrl-C while the group drains (or before, as the producer stopped): the frames sent
    are finished for DRAIN_S, not a backlog however long, then `halt` stops the members."""
    while not drained.wait(0.1):
        if RUN_STOP.is_set():
            if not drained.wait(DRAIN_S):
                halt.set()
            return
