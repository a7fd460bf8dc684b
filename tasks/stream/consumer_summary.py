"""What a consumer run did: its counts and latencies, merged over a group, and printed.

Kept apart from the loop that fills it, so flows and benchmarks can merge and print summaries
without the Kafka and gRPC clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.stats import LatencySeries


@dataclass
class ConsumerSummary:
    """One member's counts and latencies; every consumed frame ends in exactly one outcome."""

    frames_consumed: int = 0
    results_published: int = 0  # classified frames; the latencies below are theirs only
    skipped_stale: int = 0  # frames past the latency budget, recorded as skipped
    dlq: int = 0
    errors: int = 0
    retries: int = 0
    # Consumed, then revoked before an outcome: the partition's next owner gives it one.
    handed_over: int = 0
    # Another run's frames (--produced-since-ms, --producer-session): committed past, uncounted
    # above. Counted here: a session mistyped passed every frame over, and said nothing.
    passed_over: int = 0
    duration_s: float = 0.0
    lag: int | None = 0  # None: unknown (the broker was gone at the end)
    broker_error: str | None = None
    delivery_error: str | None = None  # an outcome that could not be published, the broker up
    # Stopped as the group gave no outcome for a while after the benchmark's producer ended,
    # frames still unanswered (InputEnd.stalled): a service gone or hung.
    stalled: bool = False
    inference_ms: LatencySeries = field(default_factory=LatencySeries)
    rpc_ms: LatencySeries = field(default_factory=LatencySeries)
    e2e_ms: LatencySeries = field(default_factory=LatencySeries)

    @property
    def fps(self) -> float:
        return self.results_published / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def outcomes(self) -> int:
        """Frames given an outcome: a result, a stale record or a dead letter."""
        return self.results_published + self.skipped_stale + self.dlq

    @property
    def unanswered(self) -> int:
        """Frames consumed whose result (or dead-letter copy) was never delivered, and not left
        to the partition's next owner by a rebalance."""
        return max(0, self.frames_consumed - self.outcomes - self.handed_over)

    @property
    def skipped_fraction(self) -> float:
        """Of the frames with an outcome, the part skipped as stale."""
        return self.skipped_stale / self.outcomes if self.outcomes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames_consumed": self.frames_consumed,
            "results_published": self.results_published,
            "skipped_stale": self.skipped_stale,
            "skipped_fraction": round(self.skipped_fraction, 4),
            "dlq": self.dlq,
            "outcomes": self.outcomes,
            "errors": self.errors,
            "retries": self.retries,
            "handed_over": self.handed_over,
            "passed_over": self.passed_over,
            "fps": round(self.fps, 2),
            "duration_s": round(self.duration_s, 3),
            "lag": self.lag,
            "unanswered": self.unanswered,
            "broker_error": self.broker_error,
            "delivery_error": self.delivery_error,
            "stalled": self.stalled,
            "inference_ms": self.inference_ms.summary(),
            "rpc_ms": self.rpc_ms.summary(),
            "e2e_ms": self.e2e_ms.summary(),
        }


def merge_summaries(summaries: list[ConsumerSummary]) -> ConsumerSummary:
    """One summary for several members of a group: counts add up, latencies pool together."""
    merged = ConsumerSummary()
    for summary in summaries:
        for name in (
            "frames_consumed", "results_published", "skipped_stale", "dlq", "errors", "retries",
            "handed_over", "passed_over",
        ):  # fmt: skip
            setattr(merged, name, getattr(merged, name) + getattr(summary, name))
        if merged.lag is not None:
            merged.lag = None if summary.lag is None else merged.lag + summary.lag
        merged.broker_error = merged.broker_error or summary.broker_error
        merged.delivery_error = merged.delivery_error or summary.delivery_error
        merged.stalled = merged.stalled or summary.stalled
        merged.inference_ms.merge(summary.inference_ms)
        merged.rpc_ms.merge(summary.rpc_ms)
        merged.e2e_ms.merge(summary.e2e_ms)
        merged.duration_s = max(merged.duration_s, summary.duration_s)
    return merged


def format_summary(summary: dict[str, Any]) -> str:
    """The summary (as `as_dict` gives it) as lines for a terminal: counts, then latencies."""
    lag = "unknown" if summary["lag"] is None else summary["lag"]
    lines = [
        f"frames consumed {summary['frames_consumed']}, results {summary['results_published']}, "
        f"skipped stale {summary['skipped_stale']} ({summary['skipped_fraction']:.1%}), "
        f"dlq {summary['dlq']}, handed over {summary.get('handed_over', 0)}, "
        f"unanswered {summary['unanswered']}, errors {summary['errors']}, "
        f"{summary['fps']:.1f} fps, lag {lag}",
        *([_passed_over(summary["passed_over"])] if summary.get("passed_over") else []),
        *([f"BROKER LOST: {summary['broker_error']}"] if summary.get("broker_error") else []),
        *([f"STOPPED: {summary['delivery_error']}"] if summary.get("delivery_error") else []),
        *(
            ["STALLED: no outcome for a while after the input ended"]
            if summary.get("stalled")
            else []
        ),
        f"{'ms':>10} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'mean':>8}",
    ]
    for name in ("inference_ms", "rpc_ms", "e2e_ms"):
        s = summary[name]
        keys = ("p50", "p90", "p99", "max", "mean")
        # No frame answered: "-", not 0.0 ms, which would read as a measurement.
        cells = [f"{s[k]:>8.1f}" if s["count"] else f"{'-':>8}" for k in keys]
        lines.append(f"{name[:-3]:>10} {' '.join(cells)}")
    return "\n".join(lines)


def _passed_over(count: int) -> str:
    return f"passed over {count} frames of other runs (another producer session, or older)"


def nothing_answered(summary: dict[str, Any]) -> bool:
    """Frames were consumed and not one of them got a result, a stale record or a dead
    letter: the service (or the results topic) never answered, whatever the run did."""
    return bool(summary["frames_consumed"]) and not summary["outcomes"]  # handed over: nothing
