"""Benchmark: vidflow's consumer against the naive loop a first version of such a system has.

    python -m bench.naive_stream [--frames 300] [--rounds 3]

The naive loop polls ONE message, calls Classify synchronously (a plain gRPC channel to the same
service), produces the same FrameResult record and flushes, commits synchronously, and repeats.
vidflow's FrameConsumer (default settings: 8 calls in flight, background commits) drains the
same backlog: each round, the producer at `--fps max` publishes `--frames` frames of the sample
clip to fresh topics first, then one of the two consumes them with a fresh group; the two
alternate round by round against one broker (Tansu) and one `vidflow serve`. frames/s runs from
the first message polled to the last result delivered. The last stdout line is JSON with
`vidflow_fps`, `naive_fps` and `ratio` (median of the per-round ratios; target >= 2).
Before the rounds, each consumer drains one short untimed backlog (`--warmup-frames`), so that
neither meets the service, the broker or its own imports cold in its first timed round.

Each drain runs under a per-process CPU account (service, broker, consumer), and before the
stack starts the bare model is timed alone in-process: together they give the highest ratio the
machine allows in this run (`ratio_bound_bare_model`, `ratio_bound_service_alone`), as a
consumer can go no faster than the service it calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer

from bench.cli_args import add_model_cache_flag, bench_parser
from bench.cpu_account import CpuAccount
from bench.service import BareModel, real_frames
from bench.stream import fresh_kafka, local_stack
from common.cli_types import non_negative_int, positive_float, positive_int
from common.cpus import usable_cpus
from common.settings import SAMPLE_VIDEO
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import open_channel
from tasks.stream.consumer import FrameConsumer
from tasks.stream.frame_codec import classified_result, decode_frame
from tasks.stream.kafka_io import consumer_config, make_producer
from tasks.stream.producer import produce_frames
from tasks.stream.settings import ConsumerSettings, KafkaSettings, ProducerSettings


@dataclass
class NaiveSummary:
    results: int = 0
    duration_s: float = 0.0

    @property
    def fps(self) -> float:
        return self.results / self.duration_s if self.duration_s > 0 else 0.0


def naive_consume(
    kafka: KafkaSettings, group: str, target: str, frames: int, idle_s: float = 15.0
) -> NaiveSummary:
    """The one-message-at-a-time loop: poll, classify, produce + flush, commit, repeat."""
    consumer = Consumer(consumer_config(kafka, group))
    producer = make_producer(kafka)
    channel = open_channel(target)
    stub = inference_pb2_grpc.ClassifierStub(channel)
    consumer.subscribe([kafka.frames_topic])
    summary = NaiveSummary()
    first_at: float | None = None
    last_at = time.monotonic()
    try:
        while summary.results < frames and time.monotonic() - last_at < idle_s:
            message = consumer.poll(0.1)
            if message is None or message.error():
                continue
            first_at = first_at or time.monotonic()
            frame = decode_frame(message.value(), message.headers())
            sent = time.perf_counter()
            response = stub.Classify(
                inference_pb2.ClassifyRequest(image=frame.jpeg, request_id=frame.key), timeout=10
            )
            rpc_s = time.perf_counter() - sent
            result = classified_result(
                frame, response, rpc_s, message.partition(), message.offset()
            )
            producer.produce(kafka.results_topic, key=result.key.encode(), value=result.to_json())
            producer.flush(10)
            consumer.commit(message=message, asynchronous=False)
            summary.results += 1
            last_at = time.monotonic()
    finally:
        consumer.close()
        channel.close()
    summary.duration_s = last_at - first_at if first_at is not None else 0.0
    return summary


def backlog(bootstrap: str, frames: int) -> KafkaSettings:
    """Fresh topics holding `frames` frames of the sample clip, published at --fps max."""
    kafka = fresh_kafka(bootstrap)
    settings = ProducerSettings(
        source=str(SAMPLE_VIDEO), fps="max", loop=True, max_frames=frames, stream_id="naive"
    )
    stats = produce_frames(settings, kafka)
    if stats.delivered != frames:
        raise RuntimeError(f"backlog: {stats.delivered} of {frames} frames delivered")
    return kafka


def process_kind(cmdline: str) -> str:
    """Who used the CPU while a backlog drained: the service, the broker, or this process (the
    consumer under test, vidflow's or the naive loop)."""
    for needle, kind in (("vidflow.cli serve", "service"), ("tansu", "broker")):
        if needle in cmdline:
            return kind
    return "consumer" if "bench.naive_stream" in cmdline else "other"


@dataclass
class Round:
    """One drain of a backlog: its rate and the CPU each kind of process spent on it."""

    fps: float
    cpu_ms_per_frame: dict[str, float]


def drained(frames: int, consume: Callable[[], float]) -> Round:
    """Run `consume` (it drains the backlog and returns its frames/s) under a CPU account."""
    with CpuAccount(process_kind) as account:
        fps = consume()
    cpu_by_kind = account.by_kind()
    if "consumer" in cpu_by_kind:  # this process: less the CPU account's own sampling
        cpu_by_kind["consumer"] = max(0.0, cpu_by_kind["consumer"] - account.own_cpu_s)
    per_frame = {kind: round(cpu_s * 1e3 / frames, 2) for kind, cpu_s in cpu_by_kind.items()}
    return Round(round(fps, 2), per_frame)


def vidflow_round(bootstrap: str, target: str, frames: int) -> Round:
    kafka = backlog(bootstrap, frames)
    settings = ConsumerSettings(
        group=f"vidflow-{kafka.frames_topic}", max_frames=frames, idle_timeout=15.0, duration=600
    )

    def consume() -> float:
        summary = FrameConsumer(kafka, settings, target).run()
        if summary.results_published != frames:
            raise RuntimeError(f"vidflow: {summary.results_published} of {frames} results")
        return summary.fps

    return drained(frames, consume)


def naive_round(bootstrap: str, target: str, frames: int) -> Round:
    kafka = backlog(bootstrap, frames)

    def consume() -> float:
        summary = naive_consume(kafka, f"naive-{kafka.frames_topic}", target, frames)
        if summary.results != frames:
            raise RuntimeError(f"naive: {summary.results} of {frames} results")
        return summary.fps

    return drained(frames, consume)


def bounds(bare_fps: float, vidflow_rounds: list[Round], naive_fps: float) -> dict[str, float]:
    """The highest ratio to the naive loop this machine allows, from figures of this run.

    `bare_model`: the model alone, in-process, on preprocessed frames, every core busy.
    `service_alone`: the cores divided by the service's own CPU per frame (decode, model, gRPC)
    in vidflow's rounds, as if the broker and the consumer cost nothing.
    """
    cores = usable_cpus()  # the host's count overstates a container's share (common/cpus.py)
    service_ms = statistics.median(r.cpu_ms_per_frame.get("service", 0.0) for r in vidflow_rounds)
    service_fps = cores * 1e3 / service_ms if service_ms > 0 else 0.0
    return {
        "bare_model_fps": round(bare_fps, 1),
        "service_cpu_ms_per_frame": service_ms,
        "service_alone_fps": round(service_fps, 1),
        "ratio_bound_bare_model": round(bare_fps / naive_fps, 3),
        "ratio_bound_service_alone": round(service_fps / naive_fps, 3),
    }


def _parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--frames", type=positive_int, default=300, help="backlog frames per round")
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="rounds of each, alternating"
    )
    add_model_cache_flag(parser)
    parser.add_argument(
        "--bare-seconds",
        type=positive_float,
        default=5.0,
        help="seconds of the bare-model measurement",
    )
    parser.add_argument(
        "--warmup-frames",
        type=non_negative_int,
        default=60,
        help="untimed backlog each consumer drains first",
    )
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    if not SAMPLE_VIDEO.is_file():
        sys.exit(f"sample clip not found: {SAMPLE_VIDEO}")
    bare_fps = BareModel(args.cache_dir, real_frames(8)).fps(args.bare_seconds)  # before the stack
    print(f"bare model: {bare_fps:.1f} img/s", file=sys.stderr)
    rounds: dict[str, list[Round]] = {"naive": [], "vidflow": []}
    with local_stack(args.cache_dir) as (broker, server):
        bootstrap = broker.bootstrap_servers
        if args.warmup_frames > 0:
            for warm_up in (naive_round, vidflow_round):
                warm_up(bootstrap, server.target, args.warmup_frames)
        for index in range(args.rounds):
            order = ("naive", "vidflow") if index % 2 == 0 else ("vidflow", "naive")
            for name in order:
                run = naive_round if name == "naive" else vidflow_round
                rounds[name].append(run(bootstrap, server.target, args.frames))
                last = rounds[name][-1]
                print(
                    f"round {index + 1} {name}: {last.fps} frames/s, CPU ms per frame "
                    f"{last.cpu_ms_per_frame}",
                    file=sys.stderr,
                )
    fps = {name: [r.fps for r in name_rounds] for name, name_rounds in rounds.items()}
    ratios = [v / n for v, n in zip(fps["vidflow"], fps["naive"], strict=True)]
    naive_fps = statistics.median(fps["naive"])
    print(
        json.dumps(
            {
                "benchmark": "naive_stream",
                "vidflow_fps": statistics.median(fps["vidflow"]),
                "naive_fps": naive_fps,
                "ratio": round(statistics.median(ratios), 3),
                "rounds_fps": fps,
                "rounds_ratio": [round(r, 3) for r in ratios],
                "rounds_cpu_ms_per_frame": {
                    name: [r.cpu_ms_per_frame for r in name_rounds]
                    for name, name_rounds in rounds.items()
                },
                **bounds(bare_fps, rounds["vidflow"], naive_fps),
                "frames": args.frames,
                "warmup_frames": args.warmup_frames,
                "cpu_count": os.cpu_count(),  # the host's
                "usable_cpus": usable_cpus(),  # the container's share, which the bounds use
            }
        )
    )


if __name__ == "__main__":
    main()
