"""A consumer's inference calls: send each frame to the gRPC service, retry, back off, give up.

While the service is unavailable, calls are retried with exponential backoff and nothing is
dropped; a frame the service fails on otherwise (INTERNAL, ...) is tried `--max-attempts` times,
then dead-lettered with its status, details and attempt count, so the group moves on past it.
With a latency budget (`--max-frame-age-ms`), a frame already older than the budget when its
call is due (first call or retry) is not sent: the publisher records it as skipped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from confluent_kafka import Message

from common.backoff import jittered_backoff_s
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import open_channel
from tasks.stream.assignment import Assignment
from tasks.stream.consumer_metrics import ConsumerMetrics
from tasks.stream.consumer_summary import ConsumerSummary
from tasks.stream.frame_codec import (
    HEADER_DLQ_ATTEMPTS,
    HEADER_DLQ_STATUS,
    Frame,
    classified_result,
)
from tasks.stream.publisher import Publisher
from tasks.stream.settings import ConsumerSettings

log = logging.getLogger(__name__)
# A failed call is logged at most this often (with a count): with the service down, every
# frame failed once a frame period, and each line went to the flow run's log too.
RETRY_LOG_EVERY_S = 5.0

# The service is down or restarting, not the frame's fault: wait for it, however long it takes.
WAIT_FOR_SERVICE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
# Not the frame's fault either: --target is not a vidflow inference service (UNIMPLEMENTED), or
# this consumer may not call it. Dead-lettering every frame would lose the stream to a typo;
# the frames wait, uncommitted, for a service that answers, and the log says what is wrong.
MISCONFIGURED = {
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}
# The frame itself is the problem: retrying cannot help.
DEAD_LETTER = {grpc.StatusCode.INVALID_ARGUMENT}
# The status header of a frame the service answered OK without a prediction: a service of
# another make, or a broken one (it raised IndexError in the consumer, which then met the same
# frame on every restart).
EMPTY_ANSWER = b"EMPTY_ANSWER"
# Any other status (INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, ...) may be a passing hiccup or a
# frame the service cannot classify: retried up to --max-attempts, then dead-lettered, so one
# poison frame cannot hold its partition's commit point for ever.
# RESOURCE_EXHAUSTED is either: a frame over the message size limit ("larger than max", gRPC's
# own text) is the frame's fault; any other is a full server (its --max-concurrent-rpcs), which
# three refusals in half a second dead-lettered good frames for.
FRAME_TOO_LARGE = "larger than max"
RETRY_BACKOFF_S = 0.1  # the first retry's backoff, doubled per attempt up to the settings' cap


def counts_against_frame(code: grpc.StatusCode, details: str) -> bool:
    """Whether a failed call counts towards --max-attempts (not the service's outage, its
    misconfiguration or its being full)."""
    if code in WAIT_FOR_SERVICE | MISCONFIGURED:
        return False
    return code != grpc.StatusCode.RESOURCE_EXHAUSTED or FRAME_TOO_LARGE in details


class ServiceNotReadyError(RuntimeError):
    """The service cannot describe itself yet: loading its model, or not reachable."""


@dataclass
class Call:
    """One frame on its way through the service."""

    message: Message
    frame: Frame
    attempt: int = 0  # failed calls so far, whatever the status (sets the backoff)
    counted: int = 0  # failed calls that count towards --max-attempts (not the service's outages)
    sent_at: float = 0.0
    retry_at: float = 0.0
    failed_at: float = 0.0  # monotonic: its last failure
    outage: bool = False  # its last failure was the service's (down, misconfigured), not its own
    epoch: int = 0  # the member's assignment epoch when it was taken (Assignment.owns)


class InferenceCaller:
    """Keeps frames' calls in flight and hands each frame's outcome to the publisher.

    Completions arrive on gRPC's threads and are queued; they are handled on the loop's thread
    (`drain`), which is the only one touching Kafka clients. A frame revoked meanwhile is left
    to its partition's next owner (`Assignment.owns`), this member too if it came back."""

    def __init__(
        self,
        target: str,
        tls_ca: Path | None,
        settings: ConsumerSettings,
        publisher: Publisher,
        assignment: Assignment,
    ) -> None:
        self.settings, self.publisher, self._assignment, self.target = (
            settings, publisher, assignment, target
        )  # fmt: skip
        self._misconfigured_seen: set[grpc.StatusCode] = set()  # said once each in the log
        self._retry_logged_at = -RETRY_LOG_EVERY_S  # when a failed call was last logged
        self._retries_unlogged = 0  # failed calls since then
        self.summary: ConsumerSummary = publisher.summary
        self.metrics: ConsumerMetrics = publisher.metrics
        self.in_flight = 0
        self.max_in_flight = 0  # the most calls in flight at once so far
        self.answered = 0  # calls the service answered (progress, even before any outcome)
        self.waiting_retry: deque[Call] = deque()
        self._completions: queue.Queue[tuple[Call, grpc.Future, float]] = queue.Queue()
        self._channel = open_channel(target, tls_ca)  # TLS when the service's CA is given
        self._stub = inference_pb2_grpc.ClassifierStub(self._channel)

    @property
    def busy(self) -> int:
        """Frames taken and not yet answered: in flight or waiting to retry."""
        return self.in_flight + len(self.waiting_retry)

    def connect(self, timeout_s: float, stop: threading.Event | None = None) -> bool:
        """Connect now, so the first frames do not pay for it; say whether the service answered."""
        return _channel_ready(self._channel, timeout_s, stop or threading.Event())

    def service_parallelism(self, timeout_s: float) -> int | None:
        """How many requests the service works on at once (model workers x largest batch), or
        None if it does not say (a server older than `ModelInfo.model_workers`, or an error).

        Raises ServiceNotReadyError while the service is up but still loading its model (it
        answers UNAVAILABLE then), or cannot be reached: ask again once it answers."""
        try:
            info = self._stub.GetModelInfo(inference_pb2.ModelInfoRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() in (*WAIT_FOR_SERVICE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ServiceNotReadyError(f"{exc.code().name}: {exc.details()}") from exc
            log.warning("GetModelInfo failed (%s): in-flight limit stays as set", exc.code().name)
            return None
        if info.model_workers <= 0:
            return None
        return info.model_workers * max(1, info.max_batch_size)

    def in_flight_limit(self) -> int | None:
        """Calls to keep in flight: `concurrency`, or under a latency budget no more than the
        service can work on at once, plus one on its way; None while the service cannot say
        yet (loading its model, or unreachable).

        Calls beyond that wait in the service's queue, which a backlog does not mind but a live
        view does: at 1.5x capacity on 2 cores, 4 calls in flight classified as many frames as 8
        with e2e p99 176-199 ms against 241-267 ms (docs/benchmarks.md)."""
        limit = self.settings.concurrency
        if self.settings.max_frame_age_ms is None:
            return limit
        try:
            parallelism = self.service_parallelism(timeout_s=5)
        except ServiceNotReadyError as exc:
            log.info("in-flight limit decided once the service answers (%s)", exc)
            return None
        return budget_limit(limit, parallelism, self.settings.group_members)

    def submit(self, message: Message, frame: Frame) -> None:
        """Call the service for a frame, unless it is already past the latency budget."""
        call = Call(message, frame, epoch=self._assignment.epoch)
        if not self._skipped_as_stale(call):
            self._send(call)

    def _skipped_as_stale(self, call: Call) -> bool:
        """Publish a stale record instead of calling the service if the frame is past the
        budget; say whether it did."""
        budget = self.settings.max_frame_age_ms
        if budget is None:
            return False
        age_ms = (time.time_ns() - call.frame.capture_ts_ns) / 1e6
        if age_ms <= budget:
            return False
        self.publisher.stale(call.message, call.frame, age_ms)
        return True

    def _send(self, call: Call) -> None:
        call.sent_at = time.perf_counter()
        request = inference_pb2.ClassifyRequest(image=call.frame.jpeg, request_id=call.frame.key)
        future = self._stub.Classify.future(request, timeout=self.settings.rpc_timeout_s)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.metrics.in_flight.set(self.in_flight)
        # Stamped as it ends, not as the loop comes to it (a stall was charged to the service).
        future.add_done_callback(lambda f: self._completions.put((call, f, time.perf_counter())))

    def drain(self, timeout_s: float) -> None:
        """Handle every finished call; wait up to `timeout_s` for the first one."""
        while True:
            try:
                if timeout_s:
                    call, future, ended_at = self._completions.get(timeout=timeout_s)
                else:
                    call, future, ended_at = self._completions.get_nowait()
            except queue.Empty:
                return
            self._complete(call, future, ended_at - call.sent_at)
            timeout_s = 0

    def _complete(self, call: Call, future: grpc.Future, rpc_s: float) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            response = future.result()
        except grpc.RpcError as exc:
            self._failed(call, exc)
            return
        self.answered += 1
        if self._handed_over(call):
            return
        if not response.predictions:  # OK with nothing in it: no label to publish, ever
            _dead_letter_empty_answer(self.publisher, call.message)
            return
        where = call.message.partition(), call.message.offset()
        self.publisher.result(call.message, classified_result(call.frame, response, rpc_s, *where))

    def _failed(self, call: Call, exc: grpc.RpcError) -> None:
        """Dead-letter, or retry with backoff: the service's outages without limit, else a few
        times. A frame not retried yet when this member stops keeps its offset uncommitted."""
        code = exc.code()
        self.summary.errors += 1
        self.metrics.errors.labels(code.name.lower()).inc()
        if self._handed_over(call):
            return
        call.attempt += 1
        if code in MISCONFIGURED and code not in self._misconfigured_seen:
            self._misconfigured_seen.add(code)
            log.error(
                "the service at %s answers %s (%r): is --target a vidflow inference service, "
                "and may this consumer call it? Frames wait, uncommitted, for one that answers",
                self.target, code.name, exc.details(),
            )  # fmt: skip
        call.outage = not counts_against_frame(code, exc.details() or "")
        call.counted += not call.outage
        if code in DEAD_LETTER or call.counted >= self.settings.max_attempts:
            _dead_letter_failed(self.publisher, call, code, exc.details() or "")
            return
        self.summary.retries += 1
        backoff_s = jittered_backoff_s(
            call.attempt, RETRY_BACKOFF_S, self.settings.retry_max_backoff_s
        )
        call.failed_at = time.monotonic()
        call.retry_at = call.failed_at + backoff_s
        self._retries_unlogged += 1
        now = time.monotonic()
        if now - self._retry_logged_at >= RETRY_LOG_EVERY_S:
            # %r: the key comes from a Kafka header anyone who can produce may write, and the
            # service's details may echo it; a newline in it must not forge a log line.
            log.warning(
                "inference call for %r failed (%s: %r); retrying, attempt %d (%d failed calls "
                "since the last line like this)",
                call.frame.key, code.name, exc.details(), call.attempt, self._retries_unlogged,
            )  # fmt: skip
            self._retry_logged_at, self._retries_unlogged = now, 0
        self.waiting_retry.append(call)

    def resend_due(self, stopping: Callable[[], bool], own_failures_before: float = -1.0) -> None:
        """Send again the frames whose backoff is over (none once `stopping()` says so), and
        those that failed for a reason of their own before `own_failures_before` (monotonic)
        whatever their backoff (consumer._finish_in_flight says why); outages keep theirs."""
        now = time.monotonic()
        for _ in range(len(self.waiting_retry)):
            call = self.waiting_retry.popleft()
            if self._handed_over(call):  # no longer counted busy while its backoff runs
                continue
            due = call.retry_at <= now or (not call.outage and call.failed_at < own_failures_before)
            if due and not stopping():
                if not self._skipped_as_stale(call):
                    self._send(call)
            else:
                self.waiting_retry.append(call)

    def _handed_over(self, call: Call) -> bool:
        """Whether the frame's partition was revoked: its next owner redoes it, counted so."""
        if self._assignment.owns(call.message, call.epoch):
            return False
        self.summary.handed_over += 1
        return True

    def close(self) -> None:
        """Close the channel; calls still in flight are cancelled and stay uncommitted."""
        self._channel.close()


def _channel_ready(channel: grpc.Channel, timeout_s: float, stop: threading.Event) -> bool:
    """Whether `channel` connects within `timeout_s`; a `stop` set meanwhile ends the wait (a
    Ctrl-C while the service was not up waited out the whole timeout)."""
    ready = grpc.channel_ready_future(channel)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ready.result(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            return True
        except grpc.FutureTimeoutError:
            if stop.is_set() or time.monotonic() >= deadline:
                return False


def _dead_letter_empty_answer(publisher: Publisher, message: Message) -> None:
    publisher.dead_letter(
        message,
        "the service answered OK with no predictions (is --target a vidflow service?)",
        ((HEADER_DLQ_STATUS, EMPTY_ANSWER),),
    )


def _dead_letter_failed(
    publisher: Publisher, call: Call, code: grpc.StatusCode, details: str
) -> None:
    publisher.dead_letter(
        call.message,
        f"{code.name}: {details} (attempts: {call.attempt})",
        (
            (HEADER_DLQ_STATUS, code.name.encode()),
            (HEADER_DLQ_ATTEMPTS, str(call.attempt).encode()),
        ),
    )


def budget_limit(concurrency: int, parallelism: int | None, members: int) -> int:
    """Under a latency budget, `concurrency` or one member's share of what the service works
    on at once plus one, whichever is less (`parallelism` None: the service does not say). N
    members each at the whole kept N times that in flight, in the service's queue where the
    budget cannot skip them."""
    share = None if parallelism is None else -(-(parallelism + 1) // members)  # rounded up
    if share is None or share >= concurrency:
        return concurrency
    log.info(
        "latency budget: %d calls in flight (the service works on %d at once, shared by %d "
        "consumer(s))", share, parallelism, members,
    )  # fmt: skip
    return share
