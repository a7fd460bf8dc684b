"""The stream-benchmark flow under a real Prefect API, with the real broker and service."""

from __future__ import annotations

import json

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from flows.stream_benchmark import stream_benchmark
from flows.stream_settings import StreamBenchmarkSettings
from services.inference.settings import ClientSettings
from tests.kafka_helpers import read_topic, result_keys


@pytest.mark.slow
def test_the_flow_records_its_figures_as_artifacts(prefect_api, kafka, onnx_server) -> None:
    settings = StreamBenchmarkSettings(
        duration=5.0,
        fps="native",
        concurrency=4,
        consumers=2,
        client=ClientSettings(target=onnx_server.target),
        kafka=kafka,
    )
    state = stream_benchmark(settings=settings, return_state=True)
    outcome = state.result()
    summary, produced = outcome["summary"], outcome["producer"]
    assert 100 <= produced["frames_read"] <= 160  # 5 s at the clip's 28 fps
    assert summary["frames_consumed"] >= produced["frames_read"]
    assert summary["dlq"] == 0 and summary["errors"] == 0
    results = read_topic(kafka.bootstrap_servers, kafka.results_topic)
    assert len(set(result_keys(results))) == produced["frames_read"]

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["stream-benchmark-latency", "stream-benchmark-report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    by_key = {a.key: a for a in artifacts}
    table = by_key["stream-benchmark-latency"].data
    rows = {row["stage"]: row for row in (json.loads(table) if isinstance(table, str) else table)}
    assert set(rows) == {"inference", "rpc", "e2e"}
    assert rows["e2e"]["p99"] == summary["e2e_ms"]["p99"]
    assert rows["inference"]["p50"] == summary["inference_ms"]["p50"]
    report = by_key["stream-benchmark-report"].data
    assert f"{summary['fps']:.1f} frames/s" in report
    assert "| e2e |" in report and "| dead-lettered | 0 |" in report
    # Every outcome the figures count, and the budget they were counted under.
    assert f"| skipped as stale | {summary['skipped_stale']} |" in report
    assert "| max_frame_age_ms | `None` |" in report

    # A second run on the same topics counts its own frames only (it read the first run's
    # too: twice the frames, with ages of seconds in its latencies).
    again = settings.model_copy(update={"duration": 2.0, "consumers": 1})
    second = stream_benchmark(settings=again)
    assert second["summary"]["frames_consumed"] == second["producer"]["frames_read"] > 0
