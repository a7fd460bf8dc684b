"""Prometheus metrics of the inference service, in a registry of its own per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.stats import LATENCY_BUCKETS_S

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vidflow_inference_requests",
            "Classification requests by gRPC method and final status code. A request over "
            "--max-message-bytes is refused by gRPC before the service reads it (the client "
            "reads RESOURCE_EXHAUSTED) and counts here as CANCELLED: the server is not told why.",
            ["method", "code"],
            registry=self.registry,
        )
        self.idle_calls_ended = Counter(
            "vidflow_inference_idle_calls_ended",
            "Calls the server ended after --idle-call-timeout-s with nothing to do (Classify's "
            "and ClassifyStream's also in vidflow_inference_requests_total as DEADLINE_EXCEEDED, "
            "beside client deadlines; health and GetModelInfo calls only here).",
            ["method"],
            registry=self.registry,
        )
        self.unauthenticated = Counter(
            "vidflow_inference_unauthenticated_calls",
            "Calls refused for want of the token (VIDFLOW_INFERENCE_AUTH_TOKEN), by method: "
            "Classify's and ClassifyStream's also in vidflow_inference_requests_total as "
            "UNAUTHENTICATED; GetModelInfo's only here.",
            ["method"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "vidflow_inference_stage_seconds",
            "Server-side time per request and stage (decode, preprocess, queue, inference, total).",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "vidflow_inference_batch_size",
            "Number of requests per batch (an image refused at decoding counts in its batch).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "vidflow_inference_in_flight",
            "Requests being processed right now.",
            registry=self.registry,
        )
        self.open_calls = Gauge(
            "vidflow_inference_open_calls",
            "Classify and ClassifyStream calls holding a place now; past "
            "vidflow_inference_max_open_calls the next is refused (RESOURCE_EXHAUSTED).",
            registry=self.registry,
        )
        self.max_open_calls = Gauge(
            "vidflow_inference_max_open_calls",
            "Classify and ClassifyStream calls held at most at once (--max-concurrent-rpcs).",
            registry=self.registry,
        )
        self.ready = Gauge(
            "vidflow_inference_ready",
            "1 when the model is loaded and warmed up and the server takes requests.",
            registry=self.registry,
        )
