"""The `depth-extraction` flow: sources -> shards -> download -> transcode -> depth -> Lance table.

The videos still to do are cut into shards; each shard runs its four stages as Prefect tasks on
Ray (tasks/depth/shard_tasks.py; the runner in flows/ray_runner.py), shards overlapping, and the
driver commits each shard's rows to `OUTPUT/videos.lance` as it finishes, so a killed run keeps
every finished shard. A running cluster when there is one, else a private local Ray
(flows/ray_runner.py).
"""

from __future__ import annotations

import functools
import time
from typing import Any
from urllib.parse import urlsplit

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Completed

from common.files import remove_stale_partials
from common.net import is_loopback_host
from flows import artifact_keys
from flows.depth_report import RunReport
from flows.ray_runner import (
    cluster_cpus,
    cluster_gpus,
    largest_node,
    nodes_elsewhere,
    ray_task_runner,
)
from flows.run_artifacts import record_each
from flows.run_failure import RunFailedError, failed_state
from tasks.depth.dataset_settings import check_dataset_settings, record_dataset_settings
from tasks.depth.output_layout import OutputLayout
from tasks.depth.output_lock import OutputBusyError, output_lock
from tasks.depth.preflight import check_run_settings
from tasks.depth.settings import DepthSettings, with_absolute_paths
from tasks.depth.shard_tasks import (
    Shard,
    WrittenShard,
    actor_count,
    actor_device,
    make_shards,
    run_logger,
    run_shards,
    shard_count,
)
from tasks.depth.video_record import Stage, VideoRecord
from tasks.depth.video_sources import load_sources
from tasks.depth.video_table import VideoTable, WorkPlan

PROGRESS_EVERY_S = 2.0


@flow(name="depth-extraction", log_prints=True, task_runner=ray_task_runner())
def depth_extraction(
    urls: str | None = None,
    kinetics_csv: str | None = None,
    url_template: str | None = None,
    split: str | None = "val",
    limit: int | None = None,
    settings: DepthSettings | None = None,
    show_progress: bool = False,
) -> State[dict[str, Any]]:
    """Download, transcode to 360p and depth-map a list of videos into one Lance table.

    The input is `urls` or `kinetics_csv` (with `url_template`, `split`, `limit`); everything
    else is `settings`, whose fields left out come from VIDFLOW_DEPTH_* variables, then the
    defaults. Calling the flow returns the run's summary (a dict); the flow run ends Completed
    with its counts as the state's message, so the runs list says which runs lost videos, or
    Failed when not one video of the input is done or the Parquet export failed (calling the
    flow then raises DepthRunFailedError, which holds the summary; its `parquet` is None for an
    export): a run that produced nothing (a model the workers cannot load, the source down)
    reads as failed to whatever watches Prefect's states, as it does to the command line's
    exit code."""
    try:
        settings = run_settings(settings)
        untrained = check_settings(settings)
        sources = load_sources(urls, kinetics_csv, url_template, split, limit)
    except ValueError as exc:  # input the run cannot take: a model, a list it cannot read
        return failed_state(exc)
    if limit is not None and len(sources) == limit:  # a deployment's limit stays in force
        get_run_logger().info("limit %d: the first %d videos of the input at most", limit, limit)
    if urls is not None and url_template:  # a deployment's, kept beside a run's own list
        get_run_logger().warning("url_template %r ignored: urls holds whole URLs", url_template)
    try:
        with output_lock(settings.output):  # one run at a time per output folder
            try:
                table = prepare_output(settings)
            except ValueError as exc:  # a cluster too small, a dataset of other settings
                return failed_state(exc)  # (was an engine traceback, the CLI's line after it)
            summary = _extract(table, sources, settings, untrained, show_progress)
    except (OutputBusyError, DepthRunFailedError) as exc:
        return failed_state(exc)
    message = outcome_message(summary)
    if summary["failed"] and not (summary["ok"] or summary["skipped"]):
        # The counts are the state's message and the summary table's: no log line of its own.
        return failed_state(DepthRunFailedError(message, summary), log=False)
    return Completed(message=message, data=summary)


class DepthRunFailedError(RunFailedError):
    """Not one video of the run's input was done, or its Parquet export failed (`parquet` is
    None then): `summary` holds its counts and rows' story (the failures artifact names each
    video's error)."""

    @property
    def summary(self) -> dict[str, Any]:
        return self.report


def outcome_message(summary: dict[str, Any]) -> str:
    """The run's counts in a line, failures first: "2 of 5 videos failed (see the
    depth-extraction-failures artifact); 3 ok, 0 skipped"."""
    counts = f"{summary['ok']} ok, {summary['skipped']} skipped"
    if not summary["failed"]:
        total = summary["total"]
        return f"{'the one video' if total == 1 else f'all {total} videos'} done: {counts}"
    return (
        f"{summary['failed']} of {summary['total']} videos failed (see the "
        f"{artifact_keys.DEPTH_FAILURES} artifact); {counts}"
    )


def _extract(
    table: VideoTable,
    sources: list[VideoRecord],
    settings: DepthSettings,
    untrained: bool,
    show_progress: bool,
) -> dict[str, Any]:
    """The run, once its input is read and its output folder is its own and ready."""
    logger = get_run_logger()
    plan = table.plan(sources)
    layout = OutputLayout(settings.output)
    if dropped := layout.drop_downloads(plan.rerun_ids):
        logger.info("%d files of videos that failed before removed: they are redone whole", dropped)
    if changed := layout.drop_other_sources({r.video_id: r.source_url for r in plan.todo}):
        logger.info("%d files of videos fetched before from another URL (or an older vidflow) "
                    "removed: they are fetched again from their own", changed)  # fmt: skip
    cpus = cluster_cpus()
    if settings.ray_num_cpus is not None and settings.ray_num_cpus != cpus:
        logger.warning(
            "ray_num_cpus=%d does not apply: this run's Ray has %d CPUs (a running cluster, or "
            "a Ray started before the flow read its parameters: set VIDFLOW_DEPTH_RAY_NUM_CPUS "
            "in the worker's environment, or use `vidflow depth --ray-num-cpus`)",
            settings.ray_num_cpus, cpus,
        )  # fmt: skip
    shards = make_shards(plan.todo, shard_count(len(plan.todo), settings, cpus))
    shard_size = max((len(shard.records) for shard in shards), default=0)
    logger.info(
        "%d videos: %d already done, %d to process in %d shard(s) of up to %d on %d CPUs into %s",
        len(sources), plan.already_ok, len(plan.todo), len(shards), shard_size, cpus,
        settings.output,
    )  # fmt: skip
    report = RunReport(
        total=len(sources),
        skipped=plan.already_ok,
        depth_model=settings.depth_model,
        depth_untrained=untrained,
    )
    process_shards(table, plan, shards, settings, cpus, report, show_progress)
    summary = {
        **report.summary(),
        "shards": len(shards),
        "shard_size": shard_size,
        "flow_run_id": str(flow_run.id),
    }
    publish_artifacts(report)
    for line in report.failure_lines():
        logger.warning("%s", line)
    logger.info(
        "depth extraction: %d ok, %d failed, %d skipped in %.1f s (%.2f videos/s)",
        summary["ok"], summary["failed"], summary["skipped"], summary["wall_s"],
        summary["videos_per_s"],
    )  # fmt: skip
    # Last: an export that fails (a full disk) fails the run, its report recorded (the export
    # came first, and a run of hours whose rows were all in left no summary or failures).
    return _exported(table, {**summary, "lance": str(table.lance_path)})


def _exported(table: VideoTable, summary: dict[str, Any]) -> dict[str, Any]:
    """`summary` once the table's Parquet copy is written; DepthRunFailedError, carrying it,
    where the export fails (raised, it ended the command with exit 2, a traceback and no
    summary)."""
    try:
        table.export_parquet()
    except Exception as exc:  # an OSError, or Lance's or Arrow's own
        raise DepthRunFailedError(
            f"the Parquet export to {table.parquet_path} failed ({type(exc).__name__}: {exc}); "
            f"the rows are in {table.lance_path}: run again to export them",
            {**summary, "parquet": None},
        ) from exc
    return {**summary, "parquet": str(table.parquet_path)}


def prepare_output(settings: DepthSettings) -> VideoTable:
    """The table to write, once the cluster can run the stages and the output folder holds
    no dataset of other settings; partial files of runs killed with SIGKILL (an hour old),
    which nothing else removes, are cleared."""
    check_fits_cluster(settings)
    check_dataset_settings(settings.output, settings)
    table = VideoTable(settings.output)
    table.check_layout()  # before the settings are recorded: a refused run made nothing
    record_dataset_settings(settings.output, settings)
    table.create()
    # The output's root too: a run killed as it wrote its Parquet left a copy of the table.
    folders = [settings.output, *OutputLayout(settings.output).file_folders]
    orphans = sum(map(remove_stale_partials, folders))
    if orphans:
        get_run_logger().info("removed %d partial files left by earlier runs", orphans)
    return table


def check_fits_cluster(settings: DepthSettings) -> None:
    """Refuse a stage that asks for more CPUs than any node of the cluster has, or more GPU
    depth workers than there are GPUs: Ray would hold it pending, and the run would sit at 0 %
    with no word of why."""
    if not largest_node("CPU"):  # the run sizes its shards and actors by the CPUs it finds
        raise ValueError(
            "this Ray cluster has no CPU now (an autoscaling cluster whose workers are not up "
            "yet?): keep one worker node up, or give the head CPUs (`ray start --num-cpus`)"
        )
    if lacks := stages_misfit(settings):
        raise ValueError(
            f"{next(iter(lacks.values()))}; a stage that asks for more would never start"
        )
    check_api_reachable()
    gpus = cluster_gpus()
    if settings.device == "cuda" and not gpus and settings.depth_backend != "onnx":
        raise ValueError(
            "--device cuda: this Ray cluster has no GPU (CUDA_VISIBLE_DEVICES empty, its GPU "
            "nodes down, a container without one?); give --device auto or cpu to run depth on "
            "the CPU"
        )  # it ran on the CPU with an info line, hours for Depth Pro
    if actor_device(settings, gpus) == "cuda" and settings.depth_workers > gpus:
        raise ValueError(
            f"--depth-workers {settings.depth_workers}: the cluster has {gpus} GPU(s), one per "
            "GPU depth worker; the others would never start"
        )


def stages_misfit(settings: DepthSettings, actor_gpus: int = 0) -> dict[Stage, str]:
    """What the cluster's live nodes now lack for the run's stages, by stage (a stage's CPUs
    on one node, `actor_gpus` GPUs for its depth actors); empty where nothing is lacking.
    Asked as the run starts, and while it waits on its shards (a node lost mid-run)."""
    cpus, lacks = largest_node("CPU"), {}
    for stage, flag, asked in (("transcode", "--transcode-cpus", settings.transcode_cpus),
                               ("depth", "--depth-cpus", settings.depth_cpus)):  # fmt: skip
        if asked > cpus:
            lacks[stage] = (
                f"{flag} {asked:g}: no node of this Ray cluster has that many CPUs (the largest "
                f"has {cpus:g})"
            )
    if actor_gpus and (gpus := cluster_gpus()) < actor_gpus and "depth" not in lacks:
        lacks["depth"] = f"the depth actors run on {actor_gpus} GPU(s); the cluster has {gpus}"
    return lacks


def check_api_reachable() -> None:
    """Refuse a cluster with nodes on other machines when the Prefect API is on this one's
    loopback (`vidflow depth`'s temporary server): their tasks failed to report to it, each
    with "All connection attempts failed", saying nothing of the API."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or ""
    host = urlsplit(url).hostname or ""
    # 0.0.0.0 (what Prefect's server prints once bound to every interface) dials this machine.
    here = is_loopback_host(host) or host in ("0.0.0.0", "::")
    if not here or not (elsewhere := nodes_elsewhere()):
        return
    raise ValueError(
        f"the Prefect API at {url} is on this machine's loopback, which the cluster's nodes "
        f"on other machines ({', '.join(elsewhere[:3])}) cannot reach: set PREFECT_API_URL to "
        "a Prefect server every node reaches (`prefect server start --host 0.0.0.0` behind "
        "its auth string, or Prefect Cloud)"
    )


def run_settings(settings: DepthSettings | None) -> DepthSettings:
    """The run's settings (the environment's when none are given), with absolute paths."""
    return with_absolute_paths(settings or DepthSettings())


def check_settings(settings: DepthSettings) -> bool:
    """Refuse a bad frames spec, depth model or output folder; True (and a warning) for
    untrained weights."""
    untrained = check_run_settings(settings)
    if untrained:
        get_run_logger().warning(
            "depth model %s has UNTRAINED (random) weights: every depth output of this run is "
            "labelled untrained and means nothing",
            settings.depth_model,
        )
    return untrained


def process_shards(
    table: VideoTable,
    plan: WorkPlan,
    shards: list[Shard],
    settings: DepthSettings,
    cpus: int,
    report: RunReport,
    show_progress: bool,
) -> None:
    """Run the shards, committing each one's rows as it finishes; then compact the table (its
    Parquet export comes after the run's report)."""
    progress = Progress(len(plan.todo), show_bar=show_progress)
    gpus = cluster_gpus()  # one per GPU depth actor
    actor_gpus = actor_count(settings, gpus) if actor_device(settings, gpus) == "cuda" else 0
    lacks = functools.partial(stages_misfit, settings, actor_gpus)
    for written in run_shards(shards, settings.output, table.lance_path, settings, cpus, lacks):
        committed = commit_shard(table, written)
        for record in committed:
            report.add(record)
        progress.advance(report, len(committed))
    progress.close()
    if plan.todo:
        try:  # fewer, larger files: worth having, not worth failing a run whose rows are in
            table.compact()
        except Exception as exc:  # Lance's errors share no base class
            run_logger().warning("compacting %s failed (its rows are all committed): %s",
                                 table.lance_path, exc)  # fmt: skip


def publish_artifacts(report: RunReport) -> None:
    """The run's summary, the failures and every video, as artifacts of the flow run, each
    recorded whether or not the others could be (the largest, the video table, last: a proxy's
    body limit that refused it once cost the failures artifact the run's state points to)."""
    artifacts = [
        functools.partial(
            create_table_artifact, key=artifact_keys.DEPTH_SUMMARY, table=report.table(),
            description=report.headline(),
        ),
        functools.partial(
            create_markdown_artifact, key=artifact_keys.DEPTH_FAILURES,
            markdown=report.failures_markdown(),
            description="Videos that failed in this run, with stage and reason",
        ),
        functools.partial(
            create_table_artifact, key=artifact_keys.DEPTH_VIDEOS, table=report.video_rows(),
            description=report.video_rows_description(),
        ),
    ]  # fmt: skip
    record_each(artifacts)  # the rows are in: an artifact is worth a warning, not the run


def commit_shard(table: VideoTable, written: WrittenShard) -> tuple[VideoRecord, ...]:
    """Make a finished shard's rows visible and return them: its fragments, or its rows
    written from the driver where it re-did videos that have a row (one commit replaces them:
    its write task made no fragments) or where its tasks crashed past their retries.

    A commit that fails (a full disk, the storage gone) fails the shard's videos at `store`
    and the run goes on: an exception here ended it, without rows for the shards still going
    and without its artifacts. Those videos have no row, so the next run does them again."""
    records = written.shard.records
    try:
        if written.fragments:
            table.commit_fragments(written.fragments)
        else:
            table.upsert(records)
    except Exception as exc:  # Lance's errors share no base class
        run_logger().error("%s: its rows could not be committed: %s", written.shard.label, exc)
        return written.shard.fail_remaining(
            "store", f"commit failed: {type(exc).__name__}: {exc}"
        ).records
    return records


class Progress:
    """Progress as a Prefect progress artifact (shown in the UI) and, from the CLI, a bar."""

    def __init__(self, total: int, *, show_bar: bool) -> None:
        self.total, self.done = total, 0
        self.artifact_id = None
        try:  # as its updates: a blip of the API is worth a warning, not the run
            self.artifact_id = create_progress_artifact(
                progress=0.0 if total else 100.0,
                key=artifact_keys.DEPTH_PROGRESS,
                description="Share of this run's videos finished",
            )
        except Exception as exc:
            run_logger().warning("progress not recorded: %s", exc)
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
        due = time.monotonic() - self.last_update > PROGRESS_EVERY_S or self.done == self.total
        if due and self.artifact_id is not None:
            self.last_update = time.monotonic()
            try:  # a blip of the API ended the run mid-way, its shards in flight uncommitted
                update_progress_artifact(self.artifact_id, progress=100.0 * self.done / self.total)
            except Exception as exc:
                run_logger().warning("progress not recorded: %s", exc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
