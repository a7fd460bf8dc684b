"""The `depth-extraction` flow: sources -> download -> transcode -> depth -> Lance table.

Each video is its own chain of Prefect tasks on Ray (prefect-ray's RayTaskRunner), so a video
moves to its next stage as soon as its previous one is done; finished rows are committed to
`OUTPUT/videos.lance` as they arrive. Local Ray by default, an existing cluster with RAY_ADDRESS.
"""

from __future__ import annotations

import os
import queue
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from flows.depth_report import RunReport
from tasks.depth import check_frames_spec, estimate_depth
from tasks.download import download
from tasks.transcode import transcode
from tasks.video_record import Stage, VideoRecord
from tasks.video_sources import read_kinetics_csv, read_url_list
from tasks.video_table import VideoTable
from vidflow.config import DepthSettings

# Lance warns on any fork once loaded; Ray forks only to exec its own processes at once.
warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)

# Finished rows are committed in batches: a commit per video would make thousands of versions.
COMMIT_EVERY_ROWS = 32
COMMIT_EVERY_S = 10.0
PROGRESS_EVERY_S = 2.0


def ray_task_runner(num_cpus: int | None = None) -> RayTaskRunner:
    """An existing cluster when RAY_ADDRESS is set, else a local Ray instance."""
    if address := os.environ.get("RAY_ADDRESS"):
        return RayTaskRunner(address=address)  # num_cpus is refused when joining a cluster
    # Ray 2.60 turns on token auth (writing ~/.ray/auth_token); a private local instance needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_kwargs: dict[str, Any] = {"include_dashboard": False}
    if num_cpus is not None:
        init_kwargs["num_cpus"] = num_cpus
    return RayTaskRunner(init_kwargs=init_kwargs)


def _run_stage(
    stage: Stage, work: Callable[..., VideoRecord], record: VideoRecord, *args: Any
) -> VideoRecord:
    """Run a stage; a crash is retried by Prefect, and after the last retry becomes a failed row.

    Expected failures (404, broken video) come back from `work` as failed records; this catches
    the unexpected ones so that every input still gets its row.
    """
    try:
        return work(record, *args)
    except Exception as exc:
        context = TaskRunContext.get()
        if context is not None and context.task_run.run_count <= context.task.retries:
            raise
        return record.fail(stage, f"{stage} crashed: {type(exc).__name__}: {exc}")


@task(name="download", task_run_name="download-{record.video_id}", cache_policy=NO_CACHE)
def download_task(record: VideoRecord, raw_dir: Path, settings: DepthSettings) -> VideoRecord:
    return _run_stage("download", download, record, raw_dir, settings)


@task(name="transcode", task_run_name="transcode-{record.video_id}", cache_policy=NO_CACHE)
def transcode_task(record: VideoRecord, out_dir: Path, settings: DepthSettings) -> VideoRecord:
    return _run_stage("transcode", transcode, record, out_dir, settings)


@task(name="depth", task_run_name="depth-{record.video_id}", cache_policy=NO_CACHE)
def depth_task(record: VideoRecord, maps_dir: Path, settings: DepthSettings) -> VideoRecord:
    return _run_stage("depth", estimate_depth, record, maps_dir, settings)


STAGE_TASKS = {"download": download_task, "transcode": transcode_task, "depth": depth_task}
NEXT_STAGE: dict[str, str | None] = {"download": "transcode", "transcode": "depth", "depth": None}


def run_stages(
    records: list[VideoRecord], output_dir: Path, settings: DepthSettings
) -> Iterator[VideoRecord]:
    """Run every record through download -> transcode -> depth; yield each as it finishes.

    A video's next stage is submitted as soon as its previous one is done (not after the whole
    batch), and a failed video goes no further: it is yielded at once with its failure.
    """
    stage_dirs = {
        "download": output_dir / "raw",
        "transcode": output_dir / "videos",
        "depth": output_dir / "depth",
    }
    resources = _stage_resources(settings)
    finished: queue.Queue[PrefectFuture[VideoRecord]] = queue.Queue()
    inputs: dict[PrefectFuture[VideoRecord], tuple[str, VideoRecord]] = {}

    def submit(stage: str, record: VideoRecord) -> None:
        with remote_options(**resources[stage]):
            future = (
                STAGE_TASKS[stage]
                .with_options(retries=settings.task_retries)
                .submit(record, stage_dirs[stage], settings)
            )
        inputs[future] = (stage, record)
        future.add_done_callback(finished.put)

    for record in records:
        submit("download", record)
    for _ in records:
        while True:
            future = finished.get()
            stage, given = inputs.pop(future)
            try:
                record = future.result()
            except Exception as exc:  # the Ray worker died (out of memory, killed)
                record = given.fail(stage, f"{stage} task crashed: {type(exc).__name__}: {exc}")
            if record.failed or NEXT_STAGE[stage] is None:
                break
            submit(NEXT_STAGE[stage], record)
        yield record


def load_sources(
    urls: str | None,
    kinetics_csv: str | None,
    url_template: str | None,
    split: str | None,
    limit: int | None,
) -> list[VideoRecord]:
    """The input videos, from exactly one of `urls` and `kinetics_csv`."""
    if (urls is None) == (kinetics_csv is None):
        raise ValueError("give exactly one input: urls (a URL list) or kinetics_csv")
    if kinetics_csv is not None:
        if not url_template:
            raise ValueError("kinetics_csv needs url_template, e.g. https://HOST/{youtube_id}.mp4")
        return read_kinetics_csv(
            Path(kinetics_csv), url_template=url_template, split=split, limit=limit
        )
    sources = read_url_list(Path(urls or ""))
    return sources[:limit] if limit is not None else sources


def check_depth_model(model_name: str) -> None:
    """Fail before any download if the depth model cannot be found (reads its config only)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"depth model {model_name!r} cannot be loaded: give a Hugging Face hub id "
            f"(with network access or a filled HF cache) or a local folder. {exc}"
        ) from exc


def _stage_resources(settings: DepthSettings) -> dict[str, dict[str, float]]:
    """Ray resources per stage: many light downloads, a CPU per transcode, a GPU (or CPU) per
    depth worker."""
    import ray

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0 and settings.device != "cpu"
    return {
        "download": {"num_cpus": 1 / settings.download_concurrency},
        "transcode": {"num_cpus": max(1, settings.ffmpeg_threads)},
        "depth": {"num_cpus": 1, "num_gpus": 1} if has_gpu else {"num_cpus": 1},
    }


@flow(name="depth-extraction", log_prints=True, task_runner=ray_task_runner())
def depth_extraction(
    urls: str | None = None,
    kinetics_csv: str | None = None,
    url_template: str | None = None,
    split: str | None = "val",
    limit: int | None = None,
    output: str | None = None,
    depth_model: str | None = None,
    frames: str | None = None,
    settings: DepthSettings | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Download, transcode to 360p and depth-map a list of videos into one Lance table."""
    logger = get_run_logger()
    overrides = {"output": output, "depth_model": depth_model, "frames": frames}
    settings = (settings or DepthSettings()).model_copy(
        update={name: value for name, value in overrides.items() if value is not None}
    )
    output_dir = settings.output.resolve()  # Ray workers do not share the driver's cwd
    settings = settings.model_copy(update={"output": output_dir})
    check_frames_spec(settings.frames)
    check_depth_model(settings.depth_model)

    sources = load_sources(urls, kinetics_csv, url_template, split, limit)
    table = VideoTable(output_dir)
    plan = table.plan(sources)
    logger.info(
        "%d videos: %d already done, %d to process into %s",
        len(sources), plan.already_ok, len(plan.todo), output_dir,
    )  # fmt: skip
    report = RunReport(total=len(sources), skipped=plan.already_ok)

    progress = Progress(len(plan.todo), show_bar=show_progress)
    pending: list[VideoRecord] = []
    last_commit = time.monotonic()
    for record in run_stages(plan.todo, output_dir, settings):
        pending.append(record)
        report.add(record)
        progress.advance(report)
        if record.failed:
            logger.warning(
                "%s failed at %s: %s", record.video_id, record.failed_stage, record.error
            )
        if len(pending) >= COMMIT_EVERY_ROWS or time.monotonic() - last_commit > COMMIT_EVERY_S:
            table.upsert(pending)
            pending, last_commit = [], time.monotonic()
    table.upsert(pending)
    progress.close()
    if plan.todo:
        table.compact()
    if table.exists():
        table.export_parquet()

    summary = report.summary()
    create_table_artifact(
        key="depth-extraction-summary",
        table=report.table(),
        description=f"{summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped",
    )
    create_markdown_artifact(
        key="depth-extraction-failures",
        markdown=report.failures_markdown(),
        description="Videos that failed in this run, with stage and reason",
    )
    logger.info(
        "depth extraction: %d ok, %d failed, %d skipped in %.1f s (%.2f videos/s)",
        summary["ok"], summary["failed"], summary["skipped"], summary["wall_s"],
        summary["videos_per_s"],
    )  # fmt: skip
    return {**summary, "lance": str(table.lance_path), "parquet": str(table.parquet_path)}


class Progress:
    """Progress as a Prefect progress artifact (shown in the UI) and, from the CLI, a bar."""

    def __init__(self, total: int, *, show_bar: bool) -> None:
        self.total, self.done = total, 0
        self.artifact_id = create_progress_artifact(
            progress=0.0 if total else 100.0,
            key="depth-extraction-progress",
            description="Share of this run's videos finished",
        )
        self.last_update = time.monotonic()
        self.bar = None
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="video", desc="depth-extraction", dynamic_ncols=True)

    def advance(self, report: RunReport) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(ok=report.ok, failed=report.failed, refresh=False)
            self.bar.update(1)
        if time.monotonic() - self.last_update > PROGRESS_EVERY_S or self.done == self.total:
            update_progress_artifact(self.artifact_id, progress=100.0 * self.done / self.total)
            self.last_update = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
