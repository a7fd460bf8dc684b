"""The `depth-extraction` flow: sources -> shards -> download -> transcode -> depth -> Lance table.

The videos still to do are cut into shards; each shard runs its four stages as Prefect tasks on
Ray (prefect-ray's RayTaskRunner; see flows/depth_pipeline.py), shards overlapping, and the
driver commits each shard's rows to `OUTPUT/videos.lance` as it finishes, so a killed run keeps
every finished shard. Local Ray by default, an existing cluster with RAY_ADDRESS.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run
from prefect_ray import RayTaskRunner

from flows.depth_report import RunReport
from tasks.depth.depth_maps import check_depth_model, check_frames_spec
from tasks.depth.settings import DepthSettings
from tasks.depth.shard_tasks import WrittenShard, auto_shard_size, make_shards, run_shards
from tasks.depth.video_record import VideoRecord
from tasks.depth.video_sources import read_kinetics_csv, read_url_list
from tasks.depth.video_table import VideoTable

# Lance warns on any fork once loaded; Ray forks only to exec its own processes at once.
warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)

PROGRESS_EVERY_S = 2.0


# Tasks that reserve no CPU (downloads, writes) let a run keep more Ray workers busy than there
# are CPUs. Above this many, Ray kills a worker after a second idle and starts a new one (a
# second or two of CPU for Python, Ray and Prefect imports) for the next shard; keep them.
RAY_WORKERS_KEPT = 32


def local_ray_init_kwargs(num_cpus: int | None = None) -> dict[str, Any]:
    """`ray.init` arguments for a private local Ray instance sized for this flow."""
    # Ray 2.60 turns on token auth (writing ~/.ray/auth_token); a private local instance needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_kwargs: dict[str, Any] = {
        "include_dashboard": False,
        # Task logs go to the Prefect API (and the UI); echoing every worker's lines here too
        # would bury the progress bar, and costs a log-monitor process.
        "log_to_driver": False,
        # Ray addresses its nodes by this; its servers also bind only to it inside
        # `loopback_only_ray` (LocalRayTaskRunner), which keeps Ray from swapping in the
        # machine's address.
        "_node_ip_address": "127.0.0.1",
        "_system_config": {"num_workers_soft_limit": RAY_WORKERS_KEPT},
    }
    if num_cpus is not None:
        init_kwargs["num_cpus"] = num_cpus
    return init_kwargs


RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only_ray() -> Iterator[None]:
    """While a private local Ray starts and runs: every one of its servers on 127.0.0.1 only.

    Ray 2.60 replaces a 127.0.0.1 node address with the machine's own address
    (`services.resolve_ip_for_localhost`), and gcs_server, raylet, its agents and workers then
    listen on every interface, with no authentication. Only its single-machine mode (meant for
    Windows and macOS, off on Linux) keeps the loopback address. That mode is read from the
    environment once, when `ray._private.ray_constants` is imported; ray is already imported
    here (prefect_ray imports it), so the driver's copy is set as a module attribute, which is
    how Ray 2.60 reads it (`services.get_node_ip_address`, `scripts.py`), and the variable is
    set for the processes Ray starts. Both are restored afterwards: in this process a later
    `ray start` of a worker node (multi-node, refused in that mode) must still work.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(RAY_CLUSTER_ENV)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(RAY_CLUSTER_ENV, None)
        else:
            os.environ[RAY_CLUSTER_ENV] = saved_env


class LocalRayTaskRunner(RayTaskRunner):
    """prefect-ray's runner for a private local Ray that listens on 127.0.0.1 only."""

    def __enter__(self) -> Self:
        self._loopback = contextlib.ExitStack()
        import ray

        # A cluster (RAY_ADDRESS) or an already running Ray is not this runner's to restrict.
        if not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
            self._loopback.enter_context(loopback_only_ray())
        try:
            super().__enter__()
        except BaseException:
            self._loopback.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            self._loopback.close()


def ray_task_runner(num_cpus: int | None = None) -> RayTaskRunner:
    """An existing cluster when RAY_ADDRESS is set, else a local Ray instance on 127.0.0.1."""
    if address := os.environ.get("RAY_ADDRESS"):
        return RayTaskRunner(address=address)  # num_cpus is refused when joining a cluster
    return LocalRayTaskRunner(init_kwargs=local_ray_init_kwargs(num_cpus))


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this flow runs on (Ray is up once the flow body runs)."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1


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
    settings = _with_overrides(settings, output=output, depth_model=depth_model, frames=frames)
    output_dir = settings.output
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
    table.create()
    plan = table.plan(sources)
    cpus = cluster_cpus()
    shard_size = settings.shard_size or auto_shard_size(len(plan.todo), cpus)
    shards = make_shards(plan.todo, shard_size)
    logger.info(
        "%d videos: %d already done, %d to process in %d shards of up to %d on %d CPUs into %s",
        len(sources), plan.already_ok, len(plan.todo), len(shards), shard_size, cpus, output_dir,
    )  # fmt: skip
    report = RunReport(
        total=len(sources),
        skipped=plan.already_ok,
        depth_model=settings.depth_model,
        depth_untrained=untrained,
    )

    progress = Progress(len(plan.todo), show_bar=show_progress)
    for written in run_shards(shards, output_dir, table.lance_path, settings, cpus):
        commit_shard(table, written, plan.rerun_ids)
        for record in written.shard.records:
            report.add(record)
        progress.advance(report, len(written.shard.records))
    progress.close()
    if plan.todo:
        table.compact()
    table.export_parquet()

    summary = {
        **report.summary(),
        "shards": len(shards),
        "shard_size": shard_size,
        "flow_run_id": str(flow_run.id),
    }
    publish_artifacts(report)
    logger.info(
        "depth extraction: %d ok, %d failed, %d skipped in %.1f s (%.2f videos/s)",
        summary["ok"], summary["failed"], summary["skipped"], summary["wall_s"],
        summary["videos_per_s"],
    )  # fmt: skip
    return {**summary, "lance": str(table.lance_path), "parquet": str(table.parquet_path)}


def _with_overrides(
    settings: DepthSettings | None,
    *,
    output: str | None,
    depth_model: str | None,
    frames: str | None,
) -> DepthSettings:
    """The settings with the flow's loose parameters applied, output as an absolute path (Ray
    workers do not share the driver's working directory)."""
    # model_copy does not validate: give each override its field type here.
    overrides = {
        "output": Path(output) if output is not None else None,
        "depth_model": depth_model,
        "frames": frames,
    }
    settings = (settings or DepthSettings()).model_copy(
        update={name: value for name, value in overrides.items() if value is not None}
    )
    return settings.model_copy(update={"output": settings.output.resolve()})


def publish_artifacts(report: RunReport) -> None:
    """The run's summary, every video, and the failures, as artifacts of the flow run."""
    create_table_artifact(
        key="depth-extraction-summary",
        table=report.table(),
        description=report.headline(),
    )
    create_table_artifact(
        key="depth-extraction-videos",
        table=report.video_rows(),
        description="Every video of this run: shard, status, stage times, failure reason",
    )
    create_markdown_artifact(
        key="depth-extraction-failures",
        markdown=report.failures_markdown(),
        description="Videos that failed in this run, with stage and reason",
    )


def commit_shard(table: VideoTable, written: WrittenShard, rerun_ids: frozenset[str]) -> None:
    """Make a finished shard's rows visible: its fragments, or (when its tasks crashed past
    their retries and wrote nothing) its failed rows, written from the driver."""
    records = written.shard.records
    if written.fragments:
        redone = [record.video_id for record in records if record.video_id in rerun_ids]
        table.commit_fragments(written.fragments, redone)
    else:
        table.upsert(records)


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

    def advance(self, report: RunReport, videos: int) -> None:
        self.done += videos
        if self.bar is not None:
            self.bar.set_postfix(ok=report.ok, failed=report.failed, refresh=False)
            self.bar.update(videos)
        if time.monotonic() - self.last_update > PROGRESS_EVERY_S or self.done == self.total:
            update_progress_artifact(self.artifact_id, progress=100.0 * self.done / self.total)
            self.last_update = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
