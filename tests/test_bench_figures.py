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


def test_the_depth_flow_ratio_is_the_median_of_each_rounds_own() -> None:
    """`bench.depth` times the serial loop and the flow in alternating rounds and takes each
    round's ratio: one run of each, timed alone, gave 1.38x and 1.46x for the same commit."""
    from bench.depth import summarise_warm

    warm = {
        "serial_half": [15.0, 20.0, 16.0],
        "flow_half": [10.0, 12.0, 11.0],
        "serial": [30.0, 40.0, 32.0],  # the machine slowed in round 2, for both
        "flow": [20.0, 26.0, 22.0],
    }
    figures = summarise_warm(warm, cold_s=25.0, videos=24)
    assert figures["rounds"]["speedup_warm"] == [1.5, round(40 / 26, 3), round(32 / 22, 3)]
    assert figures["speedup_warm"] == 1.5  # not median(serial) / median(flow) = 1.455
    assert figures["ray_warm_s"] == 22.0 and figures["serial_s"] == 32.0
    # each round's steady rate: (whole - half) / 12 videos, against the serial loop's
    assert figures["rounds"]["steady_speedup"] == [1.5, round(20 / 14, 3), round(16 / 11, 3)]
    assert figures["steady_speedup"] == 1.455
