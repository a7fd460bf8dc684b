"""Benchmark: the whole Kafka stream against the service's own saturated throughput.

    python -m bench.stream [--frames 1200] [--concurrency 8] [--realtime-seconds 20]

In one run, against one local broker (Tansu) and one `vidflow serve` (ONNX Runtime):
1. service_fps: the closed-loop load test at `--concurrency` with the clip's frames;
2. stream_fps: the producer at `--fps max` publishes `--frames` frames of the clip (looped) while
   a consumer with the same concurrency classifies them and publishes the results;
3. real time: the producer at the clip's native fps with a live consumer, for the end-to-end
   latency from capture to published result.
The last stdout line is JSON with `stream_fps`, `service_fps`, `ratio` and `e2e_p99_ms`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.cli_args import add_model_cache_flag, bench_parser
from common.cli_types import positive_float, positive_int
from common.frames import load_encoded_images, opened_video
from common.net import free_port
from common.processes import stop_on_signals
from common.settings import SAMPLE_VIDEO
from devstack.broker import LocalBroker, start_broker
from devstack.launcher import ServerProcess, start_server
from services.inference.loadtest import run_loadtest
from tasks.stream.consumer import ConsumerSummary, FrameConsumer
from tasks.stream.producer import ProduceStats, produce_frames, target_fps
from tasks.stream.settings import ConsumerSettings, KafkaSettings, ProducerSettings
from tasks.stream.topics import ensure_topics


@contextmanager
def local_stack(cache_dir: Path) -> Iterator[tuple[LocalBroker, ServerProcess]]:
    """A local broker (Tansu) and a serving `vidflow serve` with its defaults, for one bench run."""
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_broker(free_port(), log_path=Path(tmp) / "tansu.log")
        server = start_server(Path(tmp), cache_dir)
        try:
            server.wait_serving()
            yield broker, server
        finally:
            server.terminate()
            broker.stop()


def fresh_kafka(bootstrap: str, partitions: int = 1) -> KafkaSettings:
    """Settings naming new topics (created now), so no round sees another round's messages."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap).with_fresh_topics(
        f"bench-{uuid.uuid4().hex[:8]}", partitions
    )
    ensure_topics(kafka)
    return kafka


def stream_once(
    bootstrap: str,
    target: str,
    producer: ProducerSettings,
    concurrency: int,
    max_frame_age_ms: float | None = None,
    kafka: KafkaSettings | None = None,
    stop: threading.Event | None = None,
) -> tuple[ConsumerSummary, ProduceStats]:
    """A producer and a consumer side by side on fresh topics (or `kafka`'s); both reports.
    `stop` (Ctrl-C) ends both at their next step."""
    kafka = kafka or fresh_kafka(bootstrap)
    stop = stop or threading.Event()
    consumer = FrameConsumer(
        kafka,
        ConsumerSettings(group=f"bench-{kafka.frames_topic}", concurrency=concurrency,
                         idle_timeout=3.0, duration=600, max_frame_age_ms=max_frame_age_ms),
        target,
        stop,
    )  # fmt: skip
    produced: list[ProduceStats] = []
    failed: list[BaseException] = []

    def produce() -> None:
        consumer.membership.joined.wait(60)  # start the clock once the consumer is in the group
        try:
            produced.append(produce_frames(producer, kafka, stop))
        except BaseException as exc:  # raised below, in place of an empty result
            failed.append(exc)
            stop.set()

    # A daemon: a producer stuck on a broker that died with a Ctrl-C must not hold the exit.
    producer_thread = threading.Thread(target=produce, daemon=True)
    producer_thread.start()
    summary = consumer.run()
    while producer_thread.is_alive() and not stop.is_set():
        producer_thread.join(0.5)
    if failed:
        raise RuntimeError(f"the producer failed: {failed[0]}") from failed[0]
    exit_if_stopped(stop)  # the producer may be stuck on a broker the Ctrl-C also stopped
    return summary, produced[0]


def exit_if_stopped(stop: threading.Event) -> None:
    """After a step: a Ctrl-C or SIGTERM during it ends the run (cleaned up) without figures."""
    if stop.is_set():
        sys.exit("interrupted: no figures")


def _parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--frames", type=positive_int, default=1200, help="frames for the --fps max run"
    )
    parser.add_argument(
        "--concurrency", type=positive_int, default=8, help="the service-alone load test's"
    )
    parser.add_argument(
        "--service-seconds", type=positive_float, default=10.0, help="service-alone load test"
    )
    parser.add_argument(
        "--realtime-seconds", type=positive_float, default=20.0, help="the real-time run"
    )
    add_model_cache_flag(parser)
    return parser.parse_args()


def _ratio(stream_fps: float, service_fps: float) -> float | None:
    """The stream's rate over the service's; None where the service answered nothing in its own
    test, so the other figures still reach the JSON."""
    return round(stream_fps / service_fps, 3) if service_fps else None


def sample_clip_fps() -> float:
    """The sample clip's own frame rate (28 if it says none): a run of N seconds at its native
    pace is N times that many frames."""
    with opened_video(SAMPLE_VIDEO) as capture:
        return target_fps("native", capture) or 28.0


def _latency(report: dict[str, Any], figure: str) -> float | None:
    """None where no frame was classified: 0.0 ms would read as a measurement."""
    e2e = report["e2e_ms"]
    return e2e[figure] if e2e["count"] else None


def main() -> None:
    args = _parse_args()
    if not SAMPLE_VIDEO.is_file():
        sys.exit(f"sample clip not found: {SAMPLE_VIDEO}")
    stop = stop_on_signals()  # Ctrl-C: end the step at hand, clean up, no figures
    clip_fps = sample_clip_fps()  # the real-time run's frames: its seconds' worth

    with local_stack(args.cache_dir) as (broker, server):
        frames = load_encoded_images(SAMPLE_VIDEO, max_frames=10_000)
        (level,) = asyncio.run(
            run_loadtest(server.target, frames, [args.concurrency], args.service_seconds, 2.0)
        )
        exit_if_stopped(stop)
        fast, _ = stream_once(
            broker.bootstrap_servers,
            server.target,
            ProducerSettings(source=str(SAMPLE_VIDEO), fps="max", loop=True,
                             max_frames=args.frames, stream_id="bench-max"),
            args.concurrency,
            stop=stop,
        )  # fmt: skip
        exit_if_stopped(stop)
        realtime, realtime_produced = stream_once(
            broker.bootstrap_servers,
            server.target,
            ProducerSettings(source=str(SAMPLE_VIDEO), fps="native", loop=True,
                             max_frames=int(clip_fps * args.realtime_seconds),
                             stream_id="bench-rt"),
            args.concurrency,
            stop=stop,
        )  # fmt: skip
        exit_if_stopped(stop)

    fast_report, realtime_report = fast.as_dict(), realtime.as_dict()
    print(
        f"service: {level.throughput_rps} img/s at concurrency {args.concurrency}", file=sys.stderr
    )
    print(f"stream at fps max: {json.dumps(fast_report)}", file=sys.stderr)
    print(f"stream at native fps: {json.dumps(realtime_report)}", file=sys.stderr)
    result = {
        "benchmark": "stream",
        "stream_fps": fast_report["fps"],
        "service_fps": level.throughput_rps,
        "ratio": _ratio(fast_report["fps"], level.throughput_rps),
        "e2e_p99_ms": _latency(realtime_report, "p99"),
        "e2e_p50_ms": _latency(realtime_report, "p50"),
        "realtime_source_fps": round(realtime_produced.target_fps or 0, 2),
        "realtime_produced": realtime_produced.frames_read,
        "realtime_results": realtime_report["results_published"],
        "realtime_fps": realtime_report["fps"],
        "realtime_lag_at_end": realtime_report["lag"],
        "stream_frames": fast_report["results_published"],
        "stream_e2e_p99_ms": _latency(fast_report, "p99"),
        "dlq": fast_report["dlq"] + realtime_report["dlq"],
        "errors": fast_report["errors"] + realtime_report["errors"],
        "concurrency": args.concurrency,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
