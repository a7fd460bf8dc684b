"""The naive-loop baseline of bench/naive_stream.py does the same job as vidflow's consumer: one
result per frame on the results topic, every offset committed."""

from __future__ import annotations

import pytest

from bench.naive_stream import Round, bounds, naive_consume, process_kind
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


def test_the_ratio_bound_comes_from_the_service_cpu_of_vidflow_rounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert process_kind("/x/.venv/bin/python -m vidflow.cli serve --port 1") == "service"
    assert process_kind("/root/.calfkit/bin/tansu-v0.6.0 broker --listener-url x") == "broker"
    assert process_kind(".venv/bin/python -m bench.naive_stream --frames 9") == "consumer"
    assert process_kind("/usr/bin/sshd") == "other"
    rounds = [Round(100.0, {"service": 20.0, "broker": 2.0}), Round(90.0, {"service": 25.0})]
    # The CPUs this process may use (3 of a larger host, say), not the host's count: a
    # container's share is what bounds it (common/cpus.py).
    monkeypatch.setattr("bench.naive_stream.usable_cpus", lambda: 3)
    figures = bounds(200.0, rounds, naive_fps=50.0)
    cores = 3
    # the median service CPU per frame (22.5 ms) caps the consumer at cores / 22.5 ms
    assert figures["service_alone_fps"] == round(cores * 1e3 / 22.5, 1)
    assert figures["ratio_bound_service_alone"] == round(cores * 1e3 / 22.5 / 50.0, 3)
    assert figures["ratio_bound_bare_model"] == 4.0
