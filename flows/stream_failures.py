"""How a stream run fails after it has measured what it could (one run or a capacity sweep):
the error carries the figures, recorded as artifacts all the same."""

from __future__ import annotations

from typing import Any

from flows.run_failure import RunFailedError


class StreamRunFailedError(RunFailedError):
    """The run failed after it had measured what it could: `outcome` holds its figures (the
    report is recorded as artifacts all the same)."""

    @property
    def outcome(self) -> dict[str, Any]:
        return self.report


class BrokerLostDuringRunError(StreamRunFailedError):
    """The producer or a consumer lost the broker for longer than its grace."""


class FramesUndeliveredError(StreamRunFailedError):
    """The broker refused the producer's frames (a size limit, an ACL), the broker up."""


class StepRunFailedError(StreamRunFailedError):
    """A capacity sweep's step failed for a reason of its own (the finished steps reported)."""


class SourceLostError(StreamRunFailedError):
    """A live source (a camera, a stream) stopped giving frames during the run."""


class NothingReadError(StreamRunFailedError):
    """The producer read no frame from its source: the run measured nothing."""


class NothingConsumedError(StreamRunFailedError):
    """The broker took the producer's frames, but the consumer group read none of them."""


class NothingAnsweredError(StreamRunFailedError):
    """Frames went through the broker, but the service answered none of them."""


class GroupStalledError(StreamRunFailedError):
    """The service stopped answering before the group had answered every frame the producer
    delivered: the figures cover the run until then, and would read as a healthy one."""


class ResultsUndeliveredError(StreamRunFailedError):
    """A consumer could not publish an outcome, the broker up (the results topic refused it)."""


def broker_lost(summary: dict[str, Any], produced: dict[str, Any]) -> str | None:
    """Why the producer or the consumers gave up on the broker, if either did."""
    return produced.get("broker_error") or summary.get("broker_error")
