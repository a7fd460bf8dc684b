"""The `depth-extraction` flow: sources -> download -> transcode -> depth -> Lance table.

Each video is its own chain of Prefect tasks on Ray (prefect-ray's RayTaskRunner; see
flows/depth_pipeline.py), so a video moves to its next stage as soon as its previous one is done;
finished rows are committed to `OUTPUT/videos.lance` as they arrive. Local Ray by default, an
existing cluster with RAY_ADDRESS.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect_ray import RayTaskRunner

from flows.depth_pipeline import run_stages
from flows.depth_report import RunReport
from tasks.depth import check_frames_spec, is_untrained
from tasks.video_record import VideoRecord
from tasks.video_sources import read_kinetics_csv, read_url_list
from tasks.video_table import VideoTable
from vidflow.config import DepthSettings

# Lance warns on any fork once loaded; Ray forks only to exec its own processes at once.
warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)

# Finished rows are committed in batches: a commit per video would make thousands of versions.
COMMIT_EVERY_ROWS = 32
COMMIT_EVERY_S = 10.0
PROGRESS_EVERY_S = 2.0


# Downloads reserve no CPU, so a run keeps more Ray workers busy than there are CPUs. Above this
# many, Ray kills a worker after a second idle and starts a new one (a second or two of CPU for
# Python, Ray and Prefect imports) for the next wave of downloads; keep them instead.
RAY_WORKERS_KEPT = 32


def local_ray_init_kwargs(num_cpus: int | None = None) -> dict[str, Any]:
    """`ray.init` arguments for a private local Ray instance sized for this flow."""
    # Ray 2.60 turns on token auth (writing ~/.ray/auth_token); a private local instance needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "_system_config": {"num_workers_soft_limit": RAY_WORKERS_KEPT},
    }
    if num_cpus is not None:
        init_kwargs["num_cpus"] = num_cpus
    return init_kwargs


def ray_task_runner(num_cpus: int | None = None) -> RayTaskRunner:
    """An existing cluster when RAY_ADDRESS is set, else a local Ray instance."""
    if address := os.environ.get("RAY_ADDRESS"):
        return RayTaskRunner(address=address)  # num_cpus is refused when joining a cluster
    return RayTaskRunner(init_kwargs=local_ray_init_kwargs(num_cpus))


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


def check_depth_model(model_name: str) -> bool:
    """Fail before any download if the depth model cannot be found (reads its config only).

    Returns whether the model is an untrained stand-in (random weights).
    """
    from transformers import AutoConfig

    try:
        return is_untrained(AutoConfig.from_pretrained(model_name))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"depth model {model_name!r} cannot be loaded: give a Hugging Face hub id "
            f"(with network access or a filled HF cache) or a local folder. {exc}"
        ) from exc


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
    # model_copy does not validate: give each override its field type here.
    overrides = {
        "output": Path(output) if output is not None else None,
        "depth_model": depth_model,
        "frames": frames,
    }
    settings = (settings or DepthSettings()).model_copy(
        update={name: value for name, value in overrides.items() if value is not None}
    )
    output_dir = settings.output.resolve()  # Ray workers do not share the driver's cwd
    settings = settings.model_copy(update={"output": output_dir})
    check_frames_spec(settings.frames)
    untrained = check_depth_model(settings.depth_model)
    if untrained:
        logger.warning(
            "depth model %s has UNTRAINED (random) weights: every depth output of this run is "
            "labelled untrained and means nothing",
            settings.depth_model,
        )

    sources = load_sources(urls, kinetics_csv, url_template, split, limit)
    table = VideoTable(output_dir)
    plan = table.plan(sources)
    logger.info(
        "%d videos: %d already done, %d to process into %s",
        len(sources), plan.already_ok, len(plan.todo), output_dir,
    )  # fmt: skip
    report = RunReport(
        total=len(sources),
        skipped=plan.already_ok,
        depth_model=settings.depth_model,
        depth_untrained=untrained,
    )

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
        description=report.headline(),
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
