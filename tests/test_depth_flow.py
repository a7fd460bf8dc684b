"""The depth-extraction flow end to end: real Kinetics rows, real clips over loopback HTTP, real
FFmpeg, a Depth Pro saved and loaded through transformers, local Ray, a real Prefect API and a
real Lance dataset."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import cv2
import lance
import numpy as np
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogWorker

from devstack.video_server import Body, Serve, Stall, Status, VideoServer
from flows.depth_extraction import DepthRunFailedError, depth_extraction, outcome_message
from flows.ray_runner import ray_task_runner
from tasks.depth.dataset_settings import DatasetSettingsError
from tasks.depth.output_lock import OutputBusyError
from tasks.depth.settings import DepthSettings
from tasks.depth.video_sources import KINETICS_ID_FORMAT
from tests.conftest import VIDEOS, output_held_by_another_run

KINETICS_CSV = VIDEOS.parent / "kinetics" / "kinetics-400_val.csv"
URL_TEMPLATE = "{base}/val/{{youtube_id}}_{{time_start:06d}}_{{time_end:06d}}.mp4"
ARM_WRESTLING = VIDEOS / "k400_arm_wrestling.mp4"
POOL_CLEANING = VIDEOS / "pool_cleaning.mp4"

# What the server does for each of the first CSV rows, and what the table must say of it.
CASES = [
    ("ok", lambda: Serve(ARM_WRESTLING), "ok", None, None),
    ("ok", lambda: Serve(POOL_CLEANING), "ok", None, None),
    ("404", lambda: Status(404), "failed", "download", "HTTP 404"),
    ("500 twice", lambda: Serve(ARM_WRESTLING, fail_first=2), "ok", None, None),
    ("not a video", lambda: Body(b"<html>sorry</html>"), "failed", "download", "not a video"),
    ("stall", lambda: Stall(POOL_CLEANING, stall_s=20), "failed", "download", "timed out"),
    (
        "broken video",
        lambda: Body(ARM_WRESTLING.read_bytes()[:4096], "video/mp4"),
        "failed",
        "transcode",
        "ffmpeg exit",
    ),
]


def _kinetics_rows(count: int) -> list[dict[str, str]]:
    with KINETICS_CSV.open() as handle:
        return [row for _, row in zip(range(count), csv.DictReader(handle), strict=False)]


def _video_id(row: dict[str, str]) -> str:
    return KINETICS_ID_FORMAT.format(
        youtube_id=row["youtube_id"],
        time_start=int(row["time_start"]),
        time_end=int(row["time_end"]),
    )


@pytest.mark.slow
def test_kinetics_rows_become_one_row_each_and_a_rerun_adds_nothing(
    prefect_api, tiny_depth_model: Path, tmp_path: Path
) -> None:
    rows = _kinetics_rows(len(CASES))
    routes = {f"val/{_video_id(row)}.mp4": case[1]() for row, case in zip(rows, CASES, strict=True)}
    settings = DepthSettings(
        output=tmp_path / "out",
        depth_model=str(tiny_depth_model),
        frames="uniform:2",
        read_timeout_s=1.0,
        download_retries=2,
        retry_backoff_s=0.05,
        ray_num_cpus=2,
    )
    flow = depth_extraction.with_options(task_runner=ray_task_runner(num_cpus=2))

    with VideoServer(routes) as server:
        template = URL_TEMPLATE.format(base=f"http://127.0.0.1:{server.port}")
        first = flow(
            kinetics_csv=str(KINETICS_CSV),
            url_template=template,
            limit=len(CASES),
            settings=settings,
        )
        requests_after_first = dict(server.requests)
        table = lance.dataset(settings.output / "videos.lance").to_table().to_pylist()
        second = flow(
            kinetics_csv=str(KINETICS_CSV),
            url_template=template,
            limit=len(CASES),
            settings=settings,
        )
        requests_after_second = dict(server.requests)

    # One row per input, with its CSV facts, the right status, stage and reason.
    assert first["ok"] == 3 and first["failed"] == 4 and first["skipped"] == 0
    by_id = {row["video_id"]: row for row in table}
    assert sorted(by_id) == sorted(_video_id(row) for row in rows)
    for csv_row, (case, _, status, stage, error) in zip(rows, CASES, strict=True):
        row = by_id[_video_id(csv_row)]
        assert (row["status"], row["failed_stage"]) == (status, stage), (case, row["error"])
        if error is not None:
            assert error in row["error"], (case, row["error"])
            assert " @ 0x" not in row["error"], row["error"]  # ffmpeg's context addresses
        assert row["label"] == csv_row["label"]
        assert row["youtube_id"] == csv_row["youtube_id"]
        assert row["time_start"] == int(csv_row["time_start"])
        assert row["split"] == "val" and row["attempts"] == 1
    assert by_id[_video_id(rows[3])]["download_attempts"] == 3  # two 500s, then the file
    assert by_id[_video_id(rows[5])]["download_attempts"] == 3  # timed out every time
    assert requests_after_first[f"val/{_video_id(rows[2])}.mp4"] == 1  # a 404 is not retried

    for row in table:
        if row["status"] != "ok":
            continue
        capture = cv2.VideoCapture(row["transcoded_path"])
        decoded, frame = capture.read()
        capture.release()
        assert decoded and frame.shape[0] == 360 and frame.shape[1] % 2 == 0
        assert (row["width"], row["height"]) == (frame.shape[1], 360)
        assert row["source_height"] == 256 and row["frame_count"] > 0
        assert len(row["depth_frame_indices"]) == 2
        depth = np.load(row["depth_path"])
        assert depth.dtype == np.float16 and depth.shape == (2, *frame.shape[:2])
        assert cv2.imread(row["depth_preview_path"]).shape == frame.shape
        assert row["shard"] is not None and row["node_id"]
        # the row's figures are the stored maps' (both frames), not one frame's
        stored = depth.astype(np.float32)
        figures = (row["depth_min_m"], row["depth_mean_m"], row["depth_max_m"])
        assert figures == pytest.approx((stored.min(), stored.mean(), stored.max()), rel=2e-3)
        assert row["depth_model"] == str(tiny_depth_model)
        assert row["depth_untrained"] is True  # random weights: labelled in the data
        assert row["focal_length_px"] is not None

    parquet = pq.read_table(settings.output / "videos.parquet")
    assert parquet.num_rows == len(CASES)
    # A run into a folder another run writes to is refused (a deployment has no CLI check),
    # and so is one whose settings differ from those the folder's dataset was made with.
    elsewhere = {"url_template": "http://127.0.0.1:1/{youtube_id}", "limit": 1}
    with output_held_by_another_run(settings.output), pytest.raises(OutputBusyError):
        flow(kinetics_csv=str(KINETICS_CSV), settings=settings, **elsewhere)
    recorded = json.loads((settings.output / "vidflow-dataset.json").read_text())
    assert (recorded["frames"], recorded["height"]) == ("uniform:2", 360)
    with pytest.raises(DatasetSettingsError, match="made with frames=uniform:2"):
        flow(kinetics_csv=str(KINETICS_CSV), settings=settings.model_copy(update={"frames": "all"}),
             **elsewhere)  # fmt: skip

    # The re-run skips what is done, retries the failures, and adds no row.
    assert second["skipped"] == 3 and second["ok"] == 0 and second["failed"] == 4
    rerun = lance.dataset(settings.output / "videos.lance").to_table().to_pylist()
    assert len(rerun) == len(CASES)
    for row in rerun:
        before = by_id[row["video_id"]]
        if before["status"] == "ok":
            assert row["processed_at"] == before["processed_at"]
            assert (
                requests_after_second[f"val/{row['video_id']}.mp4"]
                == (requests_after_first[f"val/{row['video_id']}.mp4"])
            )
        else:  # tried again: its URL asked again, not only its attempt counted
            assert row["attempts"] == 2 and row["status"] == "failed"
            asked = f"val/{row['video_id']}.mp4"
            assert requests_after_second[asked] > requests_after_first[asked], row["video_id"]

    with get_client(sync_client=True) as client:
        artifacts, videos_artifacts = (
            client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[first["flow_run_id"]]),
                )
            )
            for key in ("depth-extraction-summary", "depth-extraction-videos")
        )
        # The UI's progress bar (found in review, stop 57: its errors are warnings, and no
        # test read it): the run's own, at 100 % once it ended.
        [progress] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["depth-extraction-progress"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[first["flow_run_id"]]),
            )
        )
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first["flow_run_id"]]))
        )
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[first["flow_run_id"]]))
        )
    # Each failed video is a warning in its stage's task-run log, in the UI once the run ends
    # (the Ray workers' last lines were lost with their processes).
    task_logs = " | ".join(log.message for log in logs if log.task_run_id is not None)
    for csv_row, (case, _, status, stage, _) in zip(rows, CASES, strict=True):
        if status == "failed":
            assert f"{_video_id(csv_row)} failed at {stage}" in task_logs, (case, task_logs)
    assert (progress.type, float(progress.data)) == ("progress", 100.0)
    [summary_artifact] = artifacts  # this run's, one
    assert summary_artifact.description.startswith("UNTRAINED depth model")
    counts = f"{first['ok']} ok, {first['failed']} failed, {first['skipped']} skipped"
    assert summary_artifact.description.endswith(counts)
    assert len(videos_artifacts) == 1
    # One task run per shard and stage, named after the shard and its videos.
    assert len(task_runs) == 4 * first["shards"]
    assert {run.name.split(" shard ")[0] for run in task_runs} == {
        "download", "transcode", "depth", "write"
    }  # fmt: skip
    named = " ".join(run.name for run in task_runs)
    assert all(_video_id(row) in named for row in rows[:3])
    video_rows = {
        row["video_id"]: row
        for artifact in videos_artifacts
        for row in (json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data)
    }
    stall = video_rows[_video_id(rows[5])]
    assert (stall["status"], stall["failed_stage"]) == ("failed", "download")
    assert "timed out" in stall["error"] and stall["shard"] is not None
    # A row's shard is the one its task runs are named after (the table counted from 0).
    for video_id, row in video_rows.items():
        named_after = [run.name for run in task_runs if video_id in run.name]
        assert all(f"shard {row['shard']}/" in name for name in named_after), (row, named_after)


def test_a_short_run_leaves_every_failure_in_its_task_log_and_counts_in_its_state(
    prefect_api, tiny_depth_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose videos fail at once ends within the 2 s that Prefect batches a process's
    log lines for; its private Ray's workers ended with the run, and every task run's log in
    the UI was empty, the warnings naming the failed videos included."""
    # Batches every 10 minutes in the run's Ray workers (they take this process's
    # environment): only the stage's own sending can bring the lines in, however slow the run.
    monkeypatch.setenv("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "600")
    settings = DepthSettings(output=tmp_path / "out", depth_model=str(tiny_depth_model))
    flow = depth_extraction.with_options(task_runner=ray_task_runner(num_cpus=2))
    routes = {"gone.mp4": Status(404), "page.mp4": Body(b"<html>sorry</html>")}
    with VideoServer(routes) as server:
        listing = tmp_path / "urls.txt"
        listing.write_text("".join(f"{server.url(name)}\n" for name in routes))
        state = flow(urls=str(listing), settings=settings, return_state=True)
    # Not one video done: Failed, for whatever watches Prefect's states, with the counts; a
    # caller of the flow itself gets an error that holds the summary (Prefect's own path).
    assert state.is_failed() and state.message.startswith("2 of 2 videos failed")
    with pytest.raises(DepthRunFailedError, match=r"^2 of 2 videos failed") as failure:
        state.result()
    summary = failure.value.summary
    assert summary["failed"] == 2
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[summary["flow_run_id"]]))
        )
    task_logs = " | ".join(log.message for log in logs if log.task_run_id is not None)
    assert "gone_" in task_logs and "failed at download: HTTP 404" in task_logs, task_logs
    assert "page_" in task_logs and "failed at download: not a video" in task_logs, task_logs


def test_a_parquet_export_that_fails_fails_the_run_with_its_report_recorded(
    prefect_api, tiny_depth_model: Path, tmp_path: Path
) -> None:
    """Found in review: the export came before the run's artifacts and its summary: a full
    disk at the end of a run of hours, its rows all committed, left no summary, no failures
    and no table of videos in the UI. (A folder where the export goes stands in for the full
    disk: its rename fails the same way.)"""
    settings = DepthSettings(output=tmp_path / "out", depth_model=str(tiny_depth_model))
    (tmp_path / "out" / "videos.parquet" / "in-the-way").mkdir(parents=True)
    flow = depth_extraction.with_options(task_runner=ray_task_runner(num_cpus=2))
    with VideoServer({"gone.mp4": Status(404)}) as server:
        listing = tmp_path / "urls.txt"
        listing.write_text(f"{server.url('gone.mp4')}\n")
        state = flow(urls=str(listing), settings=settings, return_state=True)
    assert state.is_failed() and "videos.parquet" in state.message, state.message
    failure = state.result(raise_on_failure=False)  # the summary too, for the CLI to print
    assert isinstance(failure, DepthRunFailedError) and failure.summary["parquet"] is None
    assert failure.summary["failed"] == 1 and failure.summary["lance"].endswith("videos.lance")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    keys = {artifact.key for artifact in artifacts}
    assert {
        "depth-extraction-summary",
        "depth-extraction-failures",
        "depth-extraction-videos",
    } <= keys
    rows = lance.dataset(str(tmp_path / "out" / "videos.lance")).to_table().to_pylist()
    assert [row["status"] for row in rows] == ["failed"]  # the rows are in


def test_the_run_says_how_its_depth_model_runs_and_why_not_as_placed(
    prefect_api, tiny_depth_anything: Path, tmp_path: Path
) -> None:
    """Found in review: an actor that could not run its model as placed (a model ONNX Runtime
    cannot take, a GPU its torch cannot use) said why in its own process only, which a private
    Ray keeps from the console and the UI; the run's log said where it was placed."""
    settings = DepthSettings(output=tmp_path / "out", depth_model=str(tiny_depth_anything),
                             device="cpu", frames="first")  # fmt: skip
    flow = depth_extraction.with_options(task_runner=ray_task_runner(num_cpus=2))
    with VideoServer({"clip.mp4": Serve(ARM_WRESTLING)}) as server:
        listing = tmp_path / "urls.txt"
        listing.write_text(f"{server.url('clip.mp4')}\n")
        state = flow(urls=str(listing), settings=settings, return_state=True)
    assert state.is_completed(), state.message
    APILogWorker.instance().drain()  # this process's log lines, sent in batches every 2 s
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    [said] = [log for log in logs if "the depth model runs with" in log.message]
    assert "torch on cpu: it cannot run on ONNX Runtime" in said.message, said.message
    assert said.level == logging.WARNING


def test_the_state_message_counts_in_words() -> None:
    done = {"ok": 1, "skipped": 0, "failed": 0, "total": 1}
    assert outcome_message(done) == "the one video done: 1 ok, 0 skipped"  # "all 1 videos"
    assert outcome_message({**done, "ok": 2, "total": 3, "skipped": 1}).startswith("all 3 videos")
    failed = outcome_message({**done, "ok": 0, "failed": 1})
    assert failed.startswith("1 of 1 videos failed (see the depth-extraction-failures artifact)")


@pytest.mark.parametrize("refused", ["model folder missing", "list without a video"])
def test_input_the_run_cannot_take_fails_it_with_the_reason_and_no_traceback(
    prefect_api, tiny_depth_model: Path, tmp_path: Path, refused: str
) -> None:
    """A model folder that is not there: the UI's state read "Flow run encountered an
    exception: ValueError: ..." and the run's log held a traceback. A deployment run of a list
    with no video ended Completed, "all 0 videos done", where `vidflow depth` refuses it:
    alerts on failed runs never fired for a wrong list."""
    listing = tmp_path / "urls.txt"
    if refused == "model folder missing":
        model = tmp_path / "no-model"
        listing.write_text("http://127.0.0.1:9/clip.mp4\n")
        reason = f"depth model folder {model} does not exist"
    else:
        model = tiny_depth_model
        listing.write_text("# the cameras of site B, one per line\n")
        reason = f"no videos to process in {listing}"
    settings = DepthSettings(output=tmp_path / "out", depth_model=str(model))
    flow = depth_extraction.with_options(task_runner=ray_task_runner(num_cpus=1))
    state = flow(urls=str(listing), settings=settings, return_state=True)
    assert state.is_failed()
    assert state.message == reason
    with pytest.raises(ValueError, match=re.escape(reason)):  # a caller gets the error itself
        state.result()
    APILogWorker.instance().drain()  # this process's log lines, sent in batches every 2 s
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    said = "\n".join(log.message for log in logs)
    assert reason in said
    assert "Traceback" not in said and "Encountered exception" not in said, said


def test_a_deployment_run_with_frames_it_cannot_take_is_refused_when_created(prefect_api) -> None:
    """`uniform:0` passed the parameter schema and failed on the worker once the run had
    started, naming a command-line flag; Prefect refuses it now when the run is created."""
    from prefect.exceptions import PrefectHTTPStatusError

    deployment_id = depth_extraction.to_deployment(name="frames-schema-check").apply()
    with get_client(sync_client=True) as client:
        try:
            with pytest.raises(PrefectHTTPStatusError) as refused:
                client.create_flow_run_from_deployment(
                    deployment_id, parameters={"settings": {"frames": "uniform:0"}}
                )
            assert refused.value.response.status_code == 409
            assert "settings.frames" in refused.value.response.text
            taken = client.create_flow_run_from_deployment(
                deployment_id, parameters={"settings": {"frames": "uniform:2"}}
            )
            client.delete_flow_run(taken.id)  # no worker here: it would wait for ever
        finally:
            client.delete_deployment(deployment_id)


def test_a_limit_that_cuts_the_input_is_said_in_the_run_s_log(
    prefect_api, tiny_depth_model: Path, tmp_path: Path
) -> None:
    """A deployment's `limit` stays in force on a run given a list of its own: a 500-line list
    ended "all 8 videos done", and no line said why."""
    from prefect.task_runners import ThreadPoolTaskRunner

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"http://127.0.0.1:1/{n}.mp4\n" for n in range(5)))
    settings = DepthSettings(output=tmp_path / "out", depth_model=str(tiny_depth_model))
    said: list[str] = []
    heard = logging.Handler(logging.INFO)  # not caplog: Prefect resets the root's handlers
    heard.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(heard)
    flow = depth_extraction.with_options(task_runner=ThreadPoolTaskRunner())
    try:  # a busy output: the run ends right after reading its input
        with output_held_by_another_run(settings.output), pytest.raises(OutputBusyError):
            # the deployment's template, kept beside the run's own list (Prefect merges
            # parameters by name): ignored, and said so, not refused
            flow(urls=str(listing), url_template="http://h/{youtube_id}.mp4", limit=2,
                 settings=settings)  # fmt: skip
    finally:
        logger.removeHandler(heard)
    assert "limit 2: the first 2 videos of the input at most" in said
    assert "url_template 'http://h/{youtube_id}.mp4' ignored: urls holds whole URLs" in said
