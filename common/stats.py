"""Latency statistics: the one helper the load test, the stream consumer and benchmarks share."""

from __future__ import annotations

import math
import random
from collections import deque
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


class LatencySeries:
    """Latencies (ms) of a run that may last for days: count, mean and max exact, and the
    percentiles from every value up to `keep` of them, then from a uniform sample of `keep`
    (reservoir sampling, algorithm R), so memory stays bounded (a week-long consumer kept three
    floats a frame: ~1 GB a day at 4 cameras of 30 fps). `recent` holds the last values for
    progress lines."""

    def __init__(self, keep: int = 100_000, recent: int = 500) -> None:
        self.keep = keep
        self.sample: list[float] = []
        self.recent: deque[float] = deque(maxlen=recent)
        self.count, self.total, self.max = 0, 0.0, -math.inf  # e2e may be < 0 (clock skew)
        self._random = random.Random(0)

    def __len__(self) -> int:
        return self.count

    def append(self, value_ms: float) -> None:
        self.count += 1
        self.total += value_ms
        self.max = max(self.max, value_ms)
        self.recent.append(value_ms)
        if len(self.sample) < self.keep:
            self.sample.append(value_ms)
        elif (slot := self._random.randrange(self.count)) < self.keep:
            self.sample[slot] = value_ms

    def merge(self, other: LatencySeries) -> None:
        """Pool `other` in: exact while both samples are whole, else each series' share of
        the sample in proportion to its count."""
        counts = self.count, other.count
        pooled = self.sample + other.sample
        if len(pooled) > self.keep:
            shares = [round(self.keep * n / (counts[0] + counts[1])) for n in counts]
            pooled = [
                *self._random.sample(self.sample, min(shares[0], len(self.sample))),
                *self._random.sample(other.sample, min(shares[1], len(other.sample))),
            ]
        self.sample = pooled
        self.recent.extend(other.recent)
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def summary(self) -> dict[str, float]:
        """As `summarize_ms` gives it; count, max and mean over every value."""
        figures = summarize_ms(self.sample)
        if self.count:
            figures.update(
                count=self.count,
                max=round(self.max, 3),
                mean=round(self.total / self.count, 3),
            )
        return figures
