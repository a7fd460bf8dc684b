"""The naive-loop baseline of bench/naive_stream.py does the same job as vidflow's consumer: one
result per frame on the results topic, every offset committed."""

from __future__ import annotations

from bench.naive_stream import naive_consume
from common.settings import SAMPLE_VIDEO
from tasks.stream.frame_codec import FrameResult
from tasks.stream.producer import produce_frames
from tasks.stream.settings import ProducerSettings
from tests.kafka_helpers import committed_total, read_topic


def test_the_naive_loop_answers_and_commits_every_frame(kafka, onnx_server) -> None:
    settings = ProducerSettings(source=str(SAMPLE_VIDEO), fps="max", max_frames=12, stream_id="n")
    assert produce_frames(settings, kafka).delivered == 12
    group = f"naive-{kafka.frames_topic}"
    summary = naive_consume(kafka, group, onnx_server.target, frames=12)
    assert summary.results == 12 and summary.fps > 0
    results = [FrameResult.from_json(m.value()) for m in read_topic(
        kafka.bootstrap_servers, kafka.results_topic, expected=12)]  # fmt: skip
    assert sorted(r.frame_index for r in results) == list(range(12))
    assert all(r.stream_id == "n" and r.label and r.skipped is None for r in results)
    assert committed_total(kafka.bootstrap_servers, group, kafka.frames_topic, 2) == 12
