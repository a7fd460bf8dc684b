"""The stages of `depth-extraction` as Prefect tasks on Ray, and the driver that moves each video
from one stage to the next.

- download: Prefect tasks that reserve no CPU (they wait on the network; a reserved fraction
  would make them queue behind transcodes and starve the pipeline), at most
  `download_concurrency` in flight;
- transcode: one Prefect task per video, one CPU each (ffmpeg runs with one thread);
- depth: Ray actors that each load the model once (a GPU each where the cluster has GPUs) and
  keep it; a light Prefect task per video hands the video to a free actor. Plain Ray tasks would
  load the model again in every worker process Ray happens to start, costing seconds of CPU
  and the model's memory each time.

A video's next stage is submitted as soon as its previous one finishes; a failed video stops.
"""

from __future__ import annotations

import collections
import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect_ray.context import remote_options

from tasks.depth import DepthEstimator, estimate_depth
from tasks.download import download
from tasks.transcode import transcode
from tasks.video_record import Stage, VideoRecord
from vidflow.config import DepthSettings

# A depth task only waits for its actor; the actor holds the CPU or GPU.
DEPTH_CALLER_CPUS = 0.01


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


class DepthActor:
    """Holds one loaded depth model for the life of a run (made a Ray actor by `start_actors`)."""

    def __init__(self, model_name: str, device: str) -> None:
        self.estimator = DepthEstimator(model_name, device)

    def estimate_depth(
        self, record: VideoRecord, maps_dir: Path, settings: DepthSettings
    ) -> VideoRecord:
        return estimate_depth(record, maps_dir, settings, self.estimator)


def _depth_on_actor(
    record: VideoRecord, maps_dir: Path, settings: DepthSettings, actor: Any
) -> VideoRecord:
    import ray

    return ray.get(actor.estimate_depth.remote(record, maps_dir, settings))


@task(name="download", task_run_name="download-{record.video_id}", cache_policy=NO_CACHE)
def download_task(record: VideoRecord, raw_dir: Path, settings: DepthSettings) -> VideoRecord:
    return _run_stage("download", download, record, raw_dir, settings)


@task(name="transcode", task_run_name="transcode-{record.video_id}", cache_policy=NO_CACHE)
def transcode_task(record: VideoRecord, out_dir: Path, settings: DepthSettings) -> VideoRecord:
    return _run_stage("transcode", transcode, record, out_dir, settings)


@task(name="depth", task_run_name="depth-{record.video_id}", cache_policy=NO_CACHE)
def depth_task(
    record: VideoRecord, maps_dir: Path, settings: DepthSettings, actor: Any
) -> VideoRecord:
    return _run_stage("depth", _depth_on_actor, record, maps_dir, settings, actor)


def start_depth_actors(settings: DepthSettings) -> list[Any]:
    """One actor per GPU of the cluster (or `depth_workers`); CPU actors where there is none."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and settings.device != "cpu"
    count = settings.depth_workers or (gpus if use_gpu else 1)
    options: dict[str, Any] = {"num_cpus": settings.depth_cpus, "max_restarts": 2}
    if use_gpu:
        options["num_gpus"] = 1
    actor_class = ray.remote(DepthActor).options(**options)
    device = "cuda" if use_gpu else "cpu"
    return [actor_class.remote(settings.depth_model, device) for _ in range(count)]


def run_stages(
    records: list[VideoRecord], output_dir: Path, settings: DepthSettings
) -> Iterator[VideoRecord]:
    """Run every record through download -> transcode -> depth; yield each as it finishes."""
    import ray

    folders = {"download": output_dir / "raw", "transcode": output_dir / "videos"}
    maps_dir = output_dir / "depth"
    transcode_cpus = max(1, settings.ffmpeg_threads)
    actors = start_depth_actors(settings)
    finished: queue.Queue[PrefectFuture[VideoRecord]] = queue.Queue()
    in_flight: dict[PrefectFuture[VideoRecord], tuple[Stage, VideoRecord, Any]] = {}
    to_download = collections.deque(records)
    to_depth: collections.deque[VideoRecord] = collections.deque()
    idle_actors = collections.deque(actors)
    downloading = 0

    def track(
        future: PrefectFuture[VideoRecord], stage: Stage, record: VideoRecord, actor: Any = None
    ) -> None:
        in_flight[future] = (stage, record, actor)
        future.add_done_callback(finished.put)

    def submit_ready() -> None:
        nonlocal downloading
        while to_download and downloading < settings.download_concurrency:
            record = to_download.popleft()
            with remote_options(num_cpus=0):
                future = download_task.with_options(retries=settings.task_retries).submit(
                    record, folders["download"], settings
                )
            track(future, "download", record)
            downloading += 1
        while to_depth and idle_actors:
            record, actor = to_depth.popleft(), idle_actors.popleft()
            with remote_options(num_cpus=DEPTH_CALLER_CPUS):
                future = depth_task.with_options(retries=settings.task_retries).submit(
                    record, maps_dir, settings, actor
                )
            track(future, "depth", record, actor)

    try:
        submit_ready()
        for _ in records:
            while True:
                future = finished.get()
                stage, given, actor = in_flight.pop(future)
                try:
                    record = future.result()
                except Exception as exc:  # the Ray worker died (out of memory, killed)
                    record = given.fail(stage, f"{stage} task crashed: {type(exc).__name__}: {exc}")
                if stage == "download":
                    downloading -= 1
                elif stage == "depth":
                    idle_actors.append(actor)
                if not record.failed and stage == "download":
                    with remote_options(num_cpus=transcode_cpus):
                        next_future = transcode_task.with_options(
                            retries=settings.task_retries
                        ).submit(record, folders["transcode"], settings)
                    track(next_future, "transcode", record)
                elif not record.failed and stage == "transcode":
                    to_depth.append(record)
                submit_ready()
                if record.failed or stage == "depth":
                    break
            yield record
    finally:
        for actor in actors:
            ray.kill(actor)
