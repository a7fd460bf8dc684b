"""Latency statistics: the one helper the load test, the stream consumer and benchmarks share."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

PERCENTILES = (50, 90, 99)
# Histogram buckets (seconds) of every latency vidflow exports to Prometheus: the service's
# stages and the stream consumer's calls, so dashboards can put them side by side.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def summarize_ms(values_ms: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean (and count) of latencies in milliseconds; zeros when empty."""
    values = np.asarray(list(values_ms), dtype=np.float64)
    if values.size == 0:
        return {"count": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    p50, p90, p99 = np.percentile(values, PERCENTILES)
    return {
        "count": int(values.size),
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(values.max()), 3),
        "mean": round(float(values.mean()), 3),
    }
