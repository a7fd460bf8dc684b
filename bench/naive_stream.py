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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer

from bench.stream import fresh_kafka, local_stack
from common.settings import DEFAULT_CACHE_DIR, SAMPLE_VIDEO
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import open_channel
from tasks.stream.consumer import FrameConsumer
from tasks.stream.frame_codec import FrameResult, decode_frame
from tasks.stream.producer import make_producer, produce_frames
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
    consumer = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": kafka.session_timeout_ms,
            "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
            "fetch.wait.max.ms": kafka.fetch_wait_max_ms,
            "max.partition.fetch.bytes": kafka.max_message_bytes,
        }
    )
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
            rpc_ms = (time.perf_counter() - sent) * 1e3
            best, now_ns = response.predictions[0], time.time_ns()
            result = FrameResult(
                stream_id=frame.stream_id, frame_index=frame.frame_index, label=best.label,
                class_index=best.class_index, score=round(best.score, 6),
                model_name=response.model_name, capture_ts_ns=frame.capture_ts_ns,
                result_ts_ns=now_ns, inference_ms=round(response.timings.inference_ms, 3),
                rpc_ms=round(rpc_ms, 3), e2e_ms=round((now_ns - frame.capture_ts_ns) / 1e6, 3),
                partition=message.partition(), offset=message.offset(),
            )  # fmt: skip
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


def vidflow_round(bootstrap: str, target: str, frames: int) -> float:
    kafka = backlog(bootstrap, frames)
    settings = ConsumerSettings(
        group=f"vidflow-{kafka.frames_topic}", max_frames=frames, idle_timeout=15.0, duration=600
    )
    summary = FrameConsumer(kafka, settings, target).run()
    if summary.results_published != frames:
        raise RuntimeError(f"vidflow: {summary.results_published} of {frames} results")
    return summary.fps


def naive_round(bootstrap: str, target: str, frames: int) -> float:
    kafka = backlog(bootstrap, frames)
    summary = naive_consume(kafka, f"naive-{kafka.frames_topic}", target, frames)
    if summary.results != frames:
        raise RuntimeError(f"naive: {summary.results} of {frames} results")
    return summary.fps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=300, help="backlog frames per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each, alternating")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR / "models")
    args = parser.parse_args()
    if not SAMPLE_VIDEO.is_file():
        sys.exit(f"sample clip not found: {SAMPLE_VIDEO}")
    rounds: dict[str, list[float]] = {"naive": [], "vidflow": []}
    with local_stack(args.cache_dir) as (broker, server):
        bootstrap = broker.bootstrap_servers
        for index in range(args.rounds):
            order = ("naive", "vidflow") if index % 2 == 0 else ("vidflow", "naive")
            for name in order:
                run = naive_round if name == "naive" else vidflow_round
                rounds[name].append(round(run(bootstrap, server.target, args.frames), 2))
                print(f"round {index + 1} {name}: {rounds[name][-1]} frames/s", file=sys.stderr)
    ratios = [v / n for v, n in zip(rounds["vidflow"], rounds["naive"], strict=True)]
    print(
        json.dumps(
            {
                "benchmark": "naive_stream",
                "vidflow_fps": statistics.median(rounds["vidflow"]),
                "naive_fps": statistics.median(rounds["naive"]),
                "ratio": round(statistics.median(ratios), 3),
                "rounds_fps": rounds,
                "rounds_ratio": [round(r, 3) for r in ratios],
                "frames": args.frames,
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
