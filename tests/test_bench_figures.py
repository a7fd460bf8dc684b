"""The figures the benchmarks compute from what they measured: a round that answered nothing
is no 0-ms latency, and a ratio over an unknown figure is None, not 0."""

from __future__ import annotations

from services.inference.loadtest import LevelResult


def _level(requests: int, p99: float, concurrency: int = 8) -> LevelResult:
    return LevelResult(
        concurrency=concurrency, requests=requests, errors=0 if requests else 40,
        error_codes={} if requests else {"UNAVAILABLE": 40}, duration_s=5.0,
        throughput_rps=requests / 5.0, latency_ms={"p50": p99 / 2, "p99": p99},
        mean_batch_size=1.0,
    )  # fmt: skip


def test_a_sweep_round_that_answered_nothing_is_left_out_of_its_latencies() -> None:
    """A server that died mid-sweep answered nothing in one round: its p99 of 0 ms pulled the
    level's mean down by a third, and a level with no answer at all read as p99 ratio 0.0."""
    from bench.service_sweep import _ratio, _summary

    rounds = [[_level(500, 30.0)], [_level(0, 0.0)], [_level(520, 36.0)]]
    level = _summary(rounds)[8]
    assert level["p99_ms"] == 33.0 and level["p50_ms"] == 16.5  # the two that answered
    assert level["errors"] == 40 and level["img_s"] == round((100 + 0 + 104) / 3, 1)
    dead = _summary([[_level(0, 0.0)], [_level(0, 0.0)]])
    assert dead[8]["p99_ms"] is None
    plain = _summary([[_level(500, 30.0)]])
    assert _ratio(dead, plain, 8, "p99_ms") is None  # not 0.0: "far better than plain"
    assert _ratio(plain, dead, 8, "p99_ms") is None
    assert _ratio(_summary(rounds), plain, 8, "p99_ms") == 1.1
