"""Prometheus metrics of a stream consumer, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.stats import LATENCY_BUCKETS_S


class ConsumerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.frames_consumed = Counter(
            "vidflow_consumer_frames_consumed", "Frame messages read.", registry=self.registry
        )
        self.results_published = Counter(
            "vidflow_consumer_results_published",
            "Results delivered to the results topic.",
            registry=self.registry,
        )
        self.skipped_stale = Counter(
            "vidflow_consumer_skipped_stale",
            "Frames older than the latency budget when due, recorded as skipped, not classified.",
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "vidflow_consumer_dead_lettered",
            "Messages sent to the dead-letter topic.",
            registry=self.registry,
        )
        self.errors = Counter(
            "vidflow_consumer_errors",
            "Failed attempts by kind (retried unless dead-lettered).",
            ["kind"],
            registry=self.registry,
        )
        self.latency_seconds = Histogram(
            "vidflow_consumer_latency_seconds",
            "Per-frame latency: inference (server), rpc (round trip), e2e (capture to result).",
            ["stage"],
            buckets=(*LATENCY_BUCKETS_S, 30.0, 60.0),  # the service's, and a backlog's ages
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "vidflow_consumer_in_flight", "Inference calls in flight.", registry=self.registry
        )
        self.lag = Gauge(
            "vidflow_consumer_lag", "Messages behind the end of the assigned partitions.",
            registry=self.registry,
        )  # fmt: skip
