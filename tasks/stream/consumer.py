"""`vidflow consume`: a consumer-group member that classifies frames through the gRPC service.

Up to `concurrency` inference calls are in flight (under a latency budget no more than the
service works on at once, plus one). Each frame's result goes to the results topic;
a message that is not a decodable frame goes to the dead-letter topic with the reason in a
header. Offsets are committed only once the result (or dead-letter copy) of every earlier
message of the partition is delivered: at least once, never lost. While the service is
unavailable, calls are retried with exponential backoff and nothing is dropped; a frame the
service fails on otherwise (INTERNAL, ...) is tried `--max-attempts` times, then dead-lettered
with its status, details and attempt count, so the group moves on past it. A broker gone for
longer than `--broker-grace-s` ends the run with `broker_error` set; the summary then counts the
frames consumed whose result never got out (`unanswered`): uncommitted, so the group redoes them.
An outcome that cannot be published while the broker is up (the results topic refuses it) ends
the run the same way, with `delivery_error` set.

With a latency budget (`--max-frame-age-ms`), a frame already older than the budget when its
inference call is due (first call or retry) is not classified: it gets a result record with
`skipped="stale"` and its age, and its offset is committed like a result's, so latency stays
bounded under overload and every frame still has exactly one outcome.

This module is the loop (poll, schedule, stop, summarize); the calls are in inference_caller.py,
the outcomes and commits in publisher.py, the summary's type in consumer_summary.py.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message

from common.stats import summarize_ms
from tasks.stream.assignment import Assignment
from tasks.stream.broker_watch import BrokerLostError, BrokerWatch
from tasks.stream.consumer_metrics import ConsumerMetrics
from tasks.stream.consumer_summary import ConsumerSummary, format_summary, merge_summaries
from tasks.stream.frame_codec import HEADER_SESSION, FrameFormatError, decode_frame
from tasks.stream.inference_caller import InferenceCaller
from tasks.stream.input_end import InputEnd
from tasks.stream.kafka_io import Membership, consumer_config, leave_group
from tasks.stream.publisher import Publisher
from tasks.stream.settings import ConsumerSettings, KafkaSettings

# Imported from here by the CLI, flows, benchmarks and tests.
__all__ = [
    "ConsumerSummary",
    "FrameConsumer",
    "format_summary",
    "merge_summaries",
]

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 5.0
COMMIT_EVERY_S = 0.5
CLOSE_GRACE_S = 5.0  # leaving waits this long beyond the session timeout (leave_group)
# Messages taken per pass of the loop at most: skipping a backlog of stale frames needs no
# inference slot, and completions must still be handled meanwhile.
ADMIT_PER_PASS = 256
REVOKE_WAIT_S = 2.0  # the longest a rebalance waits for this member's calls in flight
STUCK_S = 2.0  # no frame taken this long at the in-flight limit: stuck (_poll_while_full)


def _consumer_config(member: FrameConsumer) -> dict[str, Any]:
    """The shared group-member settings, watched by its broker watch, its commits' reports to
    its offsets (made after the client, with the publisher: asked only once it polls)."""
    return {
        **consumer_config(member.kafka, member.settings.group),
        **member.broker.client_config(),
        "on_commit": lambda *report: member.offsets.commit_reported(*report),
    }


class FrameConsumer:
    """The consume -> classify -> publish -> commit loop of one group member (one thread)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: ConsumerSettings,
        target: str,
        stop: threading.Event | None = None,
        tls_ca: Path | None = None,
        input_end: InputEnd | None = None,  # a benchmark's: stop once its frames are read
    ) -> None:
        self.kafka, self.settings, self.target = kafka, settings, target
        self.stop, self.input_end = stop or threading.Event(), input_end or InputEnd.unknown()
        self.membership = Membership()  # `joined` is set once the group has answered its join
        self.metrics, self.summary = ConsumerMetrics(), ConsumerSummary()
        self.broker = BrokerWatch(kafka.bootstrap_servers, kafka.broker_grace_s)
        self._consumer = Consumer(_consumer_config(self))
        self.publisher = Publisher(kafka, self._consumer, self.broker, self.summary, self.metrics)
        self.offsets = self.publisher.offsets
        self.assignment = Assignment(  # the rebalance callbacks'
            self.membership, self.publisher, start_from_ms=settings.produced_since_ms
        )
        self.caller = InferenceCaller(target, tls_ca, settings, self.publisher, self.assignment)
        self.assignment.before_revoke = lambda: _hand_over(self)
        self.in_flight_limit = settings.concurrency  # lowered under a budget (see caller)
        self._limit_pending = settings.max_frame_age_ms is not None  # until the service answers
        self._started = self._last_message_at = 0.0
        self._last_busy_at = 0.0  # idle time counts from the last message or call, not busy
        self._broker_down_at = 0.0  # when the broker was last seen away (a drain's stall clock)
        self._first_message_at: float | None = None

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> ConsumerSummary:
        """Consume until a stop condition, then deliver, commit and return the summary."""
        self._consumer.subscribe(
            [self.kafka.frames_topic],
            on_assign=self.assignment.on_assign,
            on_revoke=self.assignment.on_revoke,
        )
        # A benchmark's member (its input's end still to come) runs until the frames are
        # answered: its duration only bounds the wait for its producer's end.
        until = "until its run's frames are answered" if not self.input_end.is_set() else (
            f"for up to {self.settings.duration:.0f} s"
        )  # fmt: skip
        log.info(
            "consuming %s as group %r, calling %s with %d in flight %s",
            self.kafka.frames_topic, self.settings.group, self.target, self.settings.concurrency,
            until,
        )  # fmt: skip
        if self.caller.connect(timeout_s=5, stop=self.stop):
            self._settle_in_flight_limit()
        else:
            log.warning("inference service %s not reachable yet; frames will wait", self.target)
        self._started = self._last_message_at = time.monotonic()
        try:
            self._loop()
            _finish_in_flight(self)
        except BrokerLostError as exc:
            self.summary.broker_error = str(exc)
        finally:
            self._close()
            end = self.publisher.last_outcome_at or time.monotonic()
            self.summary.duration_s = max(0.0, end - (self._first_message_at or end))
        if failure := self.summary.broker_error or self.summary.delivery_error:
            log.error(
                "%s; %d consumed frames unanswered (left uncommitted for the group to redo)",
                failure, self.summary.unanswered,
            )  # fmt: skip
        return self.summary

    def _loop(self) -> None:
        last_commit = last_progress = self._started
        progress = 0
        while not self._should_stop():
            self.broker.check()
            if self._limit_pending and self.caller.answered:
                self._settle_in_flight_limit(final=True)  # it came up after this consumer
            self._admit_available()
            self._poll_while_full()
            self.caller.drain(timeout_s=0.002 if self.caller.busy else 0)
            self.caller.resend_due(stopping=self.stop.is_set)
            self.publisher.poll()
            if progress != (progress := self.summary.outcomes + self.caller.answered):
                self.input_end.progressed()  # an answer or an outcome: the group is not stalled
            now = time.monotonic()
            if now - last_commit >= COMMIT_EVERY_S:
                self.publisher.commit(wait=False)
                last_commit = now
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                _log_progress(self, now - (self._first_message_at or now))

    def _settle_in_flight_limit(self, final: bool = False) -> None:
        """Ask the service how many calls to keep in flight. Unless `final`, a service that
        cannot say yet (still loading its model) is asked again once it answers a call; then
        the limit is settled whatever it says."""
        limit = self.caller.in_flight_limit()
        if limit is None and not final:
            return
        self.in_flight_limit = limit or self.settings.concurrency
        self._limit_pending = False

    def _admit_available(self) -> None:
        """Take messages while inference slots are free, at most ADMIT_PER_PASS of them."""
        taken = 0
        while (
            self.caller.busy < self.in_flight_limit
            and taken < ADMIT_PER_PASS
            and not self._should_stop()
        ):
            message = self._consumer.poll(0 if self.caller.busy else 0.05)
            if message is None:
                return
            taken += 1  # passed over too: a backlog was passed over in one pass, no answer handled
            self._take(message)

    def _take(self, message: Message) -> bool:
        """Admit a polled message; False for an error event or another run's frame."""
        if message.error():
            if message.error().code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", message.error())
            return False
        if _another_runs(message, self.settings):
            # another run's frame, on a shared topic: passed over and committed, not counted,
            # so a benchmark measures its own frames only. Busy all the same: a member passing
            # over a long backlog (a broker that could not say where the run's frames start)
            # stopped as idle before it reached them.
            self.publisher.passed_over(message)
            self._last_busy_at = time.monotonic()
            return False
        self._last_message_at = time.monotonic()
        self._first_message_at = self._first_message_at or self._last_message_at
        self._admit(message)
        return True

    def _poll_while_full(self) -> None:
        """Stuck at the in-flight limit, no frame taken for STUCK_S (a service down: every call
        waiting to retry), still poll, the partitions paused (Assignment.poll_paused). Not
        sooner: a pause drops the frames fetched ahead, which a busy member reads next."""
        if self.caller.busy < self.in_flight_limit:
            self.assignment.resume(self._consumer)
        elif time.monotonic() - self._last_message_at < STUCK_S:
            return
        elif (message := self.assignment.poll_paused(self._consumer)) is not None:
            self._take(message)  # a frame fetched before the pause is still taken

    def _admit(self, message: Message) -> None:
        self.summary.frames_consumed += 1
        self.metrics.frames_consumed.inc()
        self.publisher.started(message)
        try:
            frame = decode_frame(message.value(), message.headers())
        except FrameFormatError as exc:
            self.publisher.dead_letter(message, str(exc))
            return
        self.caller.submit(message, frame)

    def _should_stop(self) -> bool:
        now = time.monotonic()
        if self.stop.is_set():
            return True
        if self.summary.delivery_error is not None:  # nothing more of it could be committed
            return True
        limit = self.settings.max_frames
        if limit is not None and self.summary.frames_consumed >= limit:
            return True
        if self.input_end.draining():  # a benchmark's producer has ended: no deadline now
            return _drained(self)
        if now - self._started >= self.settings.duration:
            return True
        if self.caller.busy or self.broker.down:
            self._last_busy_at = now  # frames may wait that it could not take meanwhile
            return False
        idle = self.settings.idle_timeout
        assigned_at = self.assignment.assigned_at
        if idle is None or assigned_at is None or not self.input_end.is_set():
            return False  # before the input ends, no message as none can come yet
        return now - max(self._last_message_at, assigned_at, self._last_busy_at) >= idle

    def _close(self) -> None:
        """Deliver and commit (publisher), then leave the group and close the channel.

        With the broker gone this member does not leave the group: nothing can be committed,
        the group drops the member after its session timeout, and librdkafka's close can hang
        for ever in the revoke callback it runs (librdkafka#4041, confluent-kafka-go#1016; seen
        here once, a consumer whose broker was killed still in `close` 13 min later). It hangs
        holding the GIL, so no signal handler could end the process. Freeing the client
        without `close` does not wait for the group (RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE)."""
        self.publisher.finish()
        if self.broker.down:
            log.warning(
                "not leaving group %r: the broker is gone; the group drops this member after its "
                "session timeout", self.settings.group,
            )  # fmt: skip
        else:
            wait_s = self.kafka.session_timeout_ms / 1000 + CLOSE_GRACE_S
            leave_group(self._consumer, self.membership, wait_s, lambda: self.broker.down)
        self.caller.close()


def _finish_in_flight(member: FrameConsumer) -> None:
    """Let calls in flight complete, and send again the frames waiting to retry for a failure of
    their own: one left waiting held its partition's commit point back, and every answered frame
    after it was classified again by the next owner (so at a revoke, `_hand_over`). Once: one
    that fails again keeps its backoff (resent back to back, a short hiccup used up its tries and
    dead-lettered it: found in review, stop 62). Frames waiting out the service's outage stay
    uncommitted."""
    caller, stopped_at = member.caller, time.monotonic()
    deadline = stopped_at + member.settings.rpc_timeout_s + 5
    while time.monotonic() < deadline and (
        caller.in_flight or any(not call.outage for call in caller.waiting_retry)
    ):
        caller.resend_due(stopping=lambda: False, own_failures_before=stopped_at)
        caller.drain(timeout_s=0.05)
        member.publisher.poll()
        member.broker.check()
    if caller.busy:
        log.warning("stopping with %d frames unfinished; their offsets stay uncommitted",
                    caller.busy)  # fmt: skip


def _drained(member: FrameConsumer) -> bool:
    """Every frame of a benchmark's ended producer is answered (the group's commit points at its
    ends, whatever else it still works on: another producer on the topic kept a member busy for
    ever), or the group stalled: no answer from the service and no outcome for the input's
    `stall_s` (a service gone or hung), the frames left counted unanswered. A broker away is
    waited for as long as its grace (then BrokerLostError ends the run), the stall counted from
    its return."""
    now = time.monotonic()
    # Said by the check that ends the loop: an earlier one (taking messages) may find the
    # group stalled and the same pass then get an answer (the run failed as stalled, done).
    member.summary.stalled = False
    if member.broker.down:
        member._broker_down_at = now
        return False
    # As far as the commits stood when it got or lost a partition, then its own commit points
    answered_to = {partition: at for (_, partition), at in member.assignment.answered_to.items()}
    for topic, partition in member.assignment.owned:
        if (point := member.offsets.commit_point(topic, partition)) is not None:
            answered_to[partition] = max(point, answered_to.get(partition, -1))
    if member.input_end.read_to(answered_to):
        return True
    joined = member.assignment.assigned_at
    if joined is None:  # still joining: no outcome could come from it yet
        return now - member._started >= member.settings.duration
    if member.input_end.stalled(since=max(joined, member._broker_down_at)):
        member.summary.stalled = True
        return True
    return False


def _hand_over(member: FrameConsumer) -> None:
    """As its partitions go (a rebalance), while they are still its own: the member sends the
    frames waiting to retry for a failure of their own at once, waits up to REVOKE_WAIT_S for
    its calls in flight and publishes their answers, which the revoke then commits. It dropped
    them (a join takes seconds, and every call ended in it), and the next owner classified
    those frames again; frames still unanswered go to it, counted."""
    if member.broker.down:  # nothing could be published or committed
        return
    deadline = time.monotonic() + REVOKE_WAIT_S
    member.caller.drain(timeout_s=0)
    # Frames waiting out a backoff for a failure of their own go now, with the calls in flight
    member.caller.resend_due(stopping=lambda: False, own_failures_before=time.monotonic())
    while member.caller.in_flight and time.monotonic() < deadline:
        member.caller.drain(timeout_s=0.05)


def _log_progress(member: FrameConsumer, elapsed_s: float) -> None:
    """The member's figures so far, every PROGRESS_EVERY_S in its log (and its lag gauge)."""
    summary = member.summary
    e2e = summarize_ms(summary.e2e_ms.recent)
    lag = member.publisher.lag(cached=True) if not member.broker.down else "unknown (broker down)"
    # Unknown, not the last figure from before the broker went: that one read as current.
    member.metrics.lag.set(lag if isinstance(lag, int) else float("nan"))
    # No frame classified yet: no figure, not 0.0 ms, which would read as a measurement.
    latency = f"e2e p50 {e2e['p50']:.1f} ms p99 {e2e['p99']:.1f} ms" if e2e["count"] else "no e2e"
    log.info(
        "progress: %d consumed, %d results, %d stale, %d dlq, %d errors, %.1f fps, "
        "%s (last 500), lag %s",
        summary.frames_consumed, summary.results_published, summary.skipped_stale,
        summary.dlq, summary.errors,
        summary.results_published / elapsed_s if elapsed_s > 0 else 0.0,
        latency, lag,
    )  # fmt: skip


def _another_runs(message: Message, settings: ConsumerSettings) -> bool:
    """Whether the message is a frame of another run than the one `settings` count."""
    return _before(message, settings.produced_since_ms) or _not_from(
        message, settings.producer_session
    )


def _before(message: Message, since_ms: int | None) -> bool:
    """Whether the message was produced before `since_ms` (epoch ms; None: no limit)."""
    return since_ms is not None and message.timestamp()[1] < since_ms


def _not_from(message: Message, session: str | None) -> bool:
    """Whether the message is not a frame of producer start `session` (None: any producer's)."""
    if session is None:
        return False
    return (HEADER_SESSION, session.encode()) not in (message.headers() or [])
