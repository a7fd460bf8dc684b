"""Benchmark: how many live streams one box keeps in real time, and what it does past that.

    python -m bench.stream_capacity [--step-seconds 10] [--overload-seconds 20]

In one run, against one local broker (Tansu) and one `vidflow serve` (defaults, ONNX Runtime):
1. service_fps: the closed-loop load test at concurrency 8 on the clip's frames (saturation);
2. capacity: the stream-benchmark flow's capacity sweep (a temporary Prefect API), live streams
   of the sample clip at its native fps, latency budget `--budget-ms`; `capacity_ratio` is
   capacity / floor(service_fps / source fps) (target >= 0.7);
3. overload: ceil(1.5 x capacity) live streams for `--overload-seconds`, once with the consumer's
   `--max-frame-age-ms` at the budget (e2e p99 of classified frames, target <= 200 ms; every
   frame exactly one outcome, result or stale record; fraction skipped) and once without it
   (frames behind, second by second: growing).
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.cli_args import add_model_cache_flag, bench_parser
from bench.stream import fresh_kafka, local_stack, sample_clip_fps, stream_once
from common.cli_types import positive_float, positive_int
from common.frames import load_encoded_images
from common.settings import SAMPLE_VIDEO
from common.stats import summarize_ms
from devstack.prefect_api import prefect_api
from flows.capacity_rules import DEFAULT_BUDGET_MS, lag_series
from flows.stream_benchmark import stream_benchmark
from flows.stream_settings import StreamBenchmarkSettings
from services.inference.loadtest import run_loadtest
from services.inference.settings import ClientSettings
from tasks.stream.results import read_records
from tasks.stream.settings import KafkaSettings, ProducerSettings

CONCURRENCY = 8  # the consumer's default calls in flight, and the load test's level


def overload_run(
    bootstrap: str, target: str, streams: int, seconds: float, budget_ms: float | None
) -> dict[str, Any]:
    """`streams` live cameras for `seconds`, with or without the latency budget; what came out."""
    kafka = fresh_kafka(bootstrap, partitions=streams)
    producer = ProducerSettings(
        source=str(SAMPLE_VIDEO), fps="native", loop=True, streams=streams, stream_id="camera",
        max_frames=math.ceil(sample_clip_fps() * seconds),  # `seconds` at its own rate
    )  # fmt: skip
    summary, produced = stream_once(bootstrap, target, producer, CONCURRENCY, budget_ms, kafka)
    records = read_records(kafka, kafka.results_topic)
    outcomes = Counter(r.key for r in records)
    classified = [r.e2e_ms for r in records if not r.skipped]
    stale = sum(1 for r in records if r.skipped)
    behind = lag_series(records, every_s=1.0)
    return {
        "max_frame_age_ms": budget_ms,
        "frames_produced": produced.frames_read,
        "producer_fps": round(produced.fps, 2),
        "outcome_records": len(records),
        "frames_with_an_outcome": len(outcomes),
        "exactly_one_outcome": len(outcomes) == produced.frames_read
        and set(outcomes.values()) == {1},
        "classified": len(classified),
        "skipped_stale": stale,
        "skipped_fraction": round(stale / len(records), 3) if records else 0.0,
        # None where none was classified (every frame stale): zeros read as a p99 within budget
        "e2e_classified_ms": summarize_ms(classified) if classified else None,
        "frames_behind_each_second": behind,
        "consumer": {
            k: v for k, v in summary.as_dict().items() if k not in ("inference_ms", "rpc_ms")
        },
    }


def capacity_sweep(bootstrap: str, target: str, args: argparse.Namespace) -> dict[str, Any]:
    """The stream-benchmark flow's capacity sweep, under a temporary Prefect API."""
    settings = StreamBenchmarkSettings(
        capacity=True, concurrency=CONCURRENCY, step_seconds=args.step_seconds,
        max_streams=args.max_streams, step_tries=args.step_tries, max_frame_age_ms=args.budget_ms,
        output_dir=args.output_dir, kafka=KafkaSettings(bootstrap_servers=bootstrap),
        client=ClientSettings(target=target),
    )  # fmt: skip
    with prefect_api():
        return stream_benchmark(settings=settings)


def _parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--service-seconds", type=positive_float, default=10.0, help="service-alone load test"
    )
    parser.add_argument(
        "--step-seconds", type=positive_float, default=10.0, help="seconds per sweep step"
    )
    parser.add_argument(
        "--max-streams", type=positive_int, default=16, help="the sweep's last count"
    )
    parser.add_argument(
        "--step-tries",
        type=positive_int,
        default=StreamBenchmarkSettings.model_fields["step_tries"].default,
        help="tries before a count fails",
    )
    parser.add_argument(
        "--budget-ms", type=positive_float, default=DEFAULT_BUDGET_MS, help="e2e p99 budget, ms"
    )
    parser.add_argument(
        "--overload-seconds", type=positive_float, default=20.0, help="the 1.5x overload run"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("runs/bench-capacity"),
        help="the sweep's chart and summary (relative to the working folder)",
    )
    add_model_cache_flag(parser)
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    if not SAMPLE_VIDEO.is_file():
        sys.exit(f"sample clip not found: {SAMPLE_VIDEO}")

    with local_stack(args.cache_dir) as (broker, server):
        bootstrap = broker.bootstrap_servers
        frames = load_encoded_images(SAMPLE_VIDEO, max_frames=10_000)
        (level,) = asyncio.run(
            run_loadtest(server.target, frames, [CONCURRENCY], args.service_seconds, 2.0)
        )
        print(f"service: {level.throughput_rps} img/s", file=sys.stderr)
        sweep = capacity_sweep(bootstrap, server.target, args)
        print(f"capacity: {sweep['verdict']}", file=sys.stderr)
        overload = max(1, math.ceil(1.5 * sweep["capacity"]))
        runs = {
            name: overload_run(bootstrap, server.target, overload, args.overload_seconds, budget)
            for name, budget in (("with_budget", args.budget_ms), ("without_budget", None))
        }
    source_fps = sweep["source"]["fps"]
    ideal = math.floor(level.throughput_rps / source_fps)
    steps = [
        {k: s[k] for k in ("streams", "fps_min", "fps_mean", "e2e_p50_ms", "e2e_p99_ms",
                           "skipped_stale", "lag_at_end", "attempt", "holds")}
        for s in sweep["steps"]
    ]  # fmt: skip
    print(
        json.dumps(
            {
                "benchmark": "stream_capacity",
                "service_fps": level.throughput_rps,
                "service_p99_ms": level.latency_ms["p99"] if level.requests else None,
                "capacity": sweep["capacity"],
                "ideal_streams": ideal,
                "capacity_ratio": round(sweep["capacity"] / ideal, 3) if ideal else None,
                "verdict": sweep["verdict"],
                "budget_ms": args.budget_ms,
                "sweep": steps,
                "chart": sweep["chart"],
                "overload_streams": overload,
                **runs,
                "step_seconds": args.step_seconds,
                "step_tries": args.step_tries,
                "overload_seconds": args.overload_seconds,
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
