"""The stages of `depth-extraction` as Prefect tasks on Ray, one task run per shard and stage.

A shard is a slice of the input list, the unit of scheduling (as in video2dataset and NeMo
Curator): orchestration costs four task runs per shard, not three per video, and vanishes as
shards grow. Each shard goes download -> transcode -> depth -> write, each task handed the
previous one's future, so Ray starts a shard's next stage as soon as its previous one is done
and shards overlap (one downloads while others transcode). Per stage:
- download: reserves no CPU (it waits on the network); the shard's videos in one aiohttp
  session, concurrently;
- transcode: `transcode_cpus` CPUs, that many ffmpeg at once;
- depth: a depth actor that loaded the model once takes the shard's frames in batches. The
  transcode task hands it the videos as they are transcoded (tasks/depth/depth_feed.py; not
  where the depth step reserves CPUs), so the depth task mostly collects maps already made.
  The actor holds no CPU (a GPU where there is one); the task reserves `depth_cpus` while it
  runs, so an idle model never keeps a CPU from the transcodes;
- write: the shard's rows as Lance fragments, written on the worker; the driver commits them.
Expected failures (404, broken video) are rows with the stage and reason; a crash is retried by
Prefect, and a retry redoes only the shard's videos with no complete output yet (downloads and
transcodes find the files of the earlier attempt).

Why not Ray Data (streaming execution, actor pools) and Lance's Ray sink, which do much of this:
a Ray Data pipeline runs as one opaque job, so its stages would be neither Prefect task runs
(no per-stage retries, states or logs in the Prefect UI) nor resumable per shard. Lance's sink
is a Ray Data datasink; its mechanism, fragments written by workers and one commit by the
driver (`lance.fragment.write_fragments` + `LanceDataset.commit`), is used here directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect_ray.context import remote_options

from common.files import exclusive_lock
from tasks.depth import run_log
from tasks.depth.depth_actor import DepthActor
from tasks.depth.depth_feed import DepthFeed, PendingDepth, discard_maps, feeds_early
from tasks.depth.download import download_many
from tasks.depth.hub_download_log import hub_download_logged
from tasks.depth.model_files import model_identity, model_origin
from tasks.depth.output_layout import OutputLayout
from tasks.depth.run_log import send_logs_now
from tasks.depth.settings import DepthSettings, shards_in_flight
from tasks.depth.transcode import transcode_many
from tasks.depth.video_record import Stage, VideoRecord, crash_prefix
from tasks.depth.video_table import write_rows

log = logging.getLogger(__name__)

LOST_CHECK_S = 10.0  # how often a run waiting on its shards asks what the cluster lacks

MAX_AUTO_SHARD_SIZE = 32
SHARDS_PER_CPU = 2  # auto shard size: enough shards to keep every CPU busy to the end
# Auto shards smaller than this wait for the depth model: their transcodes end before it has
# loaded (torch and transformers, ~6 CPU-s on a machine busy starting the run), and the next
# wave cannot start while they wait. 8 videos on 2 CPUs took 19.2-22.8 s in 4 shards of 2 and
# 16.5-18.6 s in 2 shards of 4 (three alternating pairs).
MIN_AUTO_SHARD_SIZE = 4
NAMED_VIDEOS = 3  # video ids spelled out in a task run's name
ACTOR_NAMESPACE = "vidflow"


@dataclass(frozen=True)
class Shard:
    """A slice of the run's videos, and how far they got."""

    index: int
    count: int  # shards in the run
    records: tuple[VideoRecord, ...]
    # The depth calls its transcode task made, from there to its depth task.
    pending_depth: PendingDepth | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """For task run names: the shard and its first videos, so a video is easy to find."""
        ids = [record.video_id for record in self.records[:NAMED_VIDEOS]]
        more = f" +{len(self.records) - NAMED_VIDEOS}" if len(self.records) > NAMED_VIDEOS else ""
        return f"shard {self.index + 1}/{self.count} [{', '.join(ids)}{more}]"

    def with_records(self, records: Sequence[VideoRecord]) -> Shard:
        return replace(self, records=tuple(records))

    @property
    def redoes_rows(self) -> bool:
        """Whether some of its videos have a row already (failed before: attempt 2 on)."""
        return any(record.attempts > 1 for record in self.records)

    def fail_remaining(self, stage: Stage, reason: str) -> Shard:
        """The shard with every video still going failed at `stage` for `reason`."""
        return self.with_records(
            [record if record.failed else record.fail(stage, reason) for record in self.records]
        )


@dataclass(frozen=True)
class WrittenShard:
    """A shard's final rows, and the Lance fragments that hold them (committed by the driver)."""

    shard: Shard
    fragments: list[Any]


def make_shards(records: Sequence[VideoRecord], count: int) -> list[Shard]:
    """`count` consecutive slices of nearly equal size (they differ by one video at most), each
    row tagged with its shard."""
    if not records:
        return []
    count = max(1, min(count, len(records)))
    base, extra = divmod(len(records), count)
    bounds = [index * base + min(index, extra) for index in range(count + 1)]
    return [
        Shard(index, count, tuple(record.update(shard=index) for record in records[start:end]))
        for index, (start, end) in enumerate(itertools.pairwise(bounds))
    ]


def shard_count(videos: int, settings: DepthSettings, cpus: int) -> int:
    """How many shards a run's videos are cut into: whole waves of `shards_in_flight`.

    A last wave with fewer shards than transcodes fit leaves CPUs idle to the end: 150 videos
    in 5 shards of up to 32 on 2 CPUs ran their fifth shard alone, one ffmpeg at a time for
    ~25 s (33 idle core-seconds against video2dataset's 13); 6 shards of 25 keep both busy.
    Shards hold at most `shard_size` videos (rounding up), or (auto) about `SHARDS_PER_CPU` per
    CPU of `MIN_AUTO_SHARD_SIZE` to `MAX_AUTO_SHARD_SIZE` videos (rounding down to fewer,
    larger shards where the largest size allows)."""
    if videos <= 0:
        return 0
    wave = shards_in_flight(settings, cpus)
    fewest = -(-videos // (settings.shard_size or MAX_AUTO_SHARD_SIZE))
    count = fewest
    if not settings.shard_size:
        wanted = min(SHARDS_PER_CPU * cpus, -(-videos // MIN_AUTO_SHARD_SIZE))
        count = max(fewest, wanted // wave * wave)
    return min(videos, -(-count // wave) * wave)


def _run_stage(
    stage: Stage, shard: Shard, work: Callable[[Sequence[VideoRecord]], list[VideoRecord]]
) -> Shard:
    """Run a stage on a shard's videos still going; a crash is retried by Prefect, and after
    the last retry becomes failed rows, so every input still gets its row."""
    before = shard.records
    going = [record for record in before if not record.failed]
    try:
        done = iter(work(going)) if going else iter(())
    except Exception as exc:
        if not _last_attempt():
            raise
        shard = shard.fail_remaining(stage, crash_reason(stage, exc))
        done = iter(())
    records = [record if record.failed else next(done) for record in shard.records]
    # Failed here, whatever stage it names (a transcode found to have no frame by the depth
    # step is failed at transcode, and was said in no task's log)
    failed = [after for was, after in zip(before, records, strict=True)
              if after.failed and not was.failed]  # fmt: skip
    if failed:
        # The run's log in the Prefect UI; a stage called outside a run (tests, a library
        # user) logs to this module's logger instead.
        logger = run_logger()
        for record in failed:
            reason = (record.error or "").partition("\n")[0]  # the table keeps the rest
            logger.warning("%s failed at %s: %s", record.video_id, record.failed_stage, reason)
        if run_log.in_run():
            send_logs_now()
    return shard.with_records(records)


# Terminal colours, which Ray puts in the remote tracebacks its errors carry.
_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def crash_reason(stage: Stage, exc: BaseException, prefix: str | None = None) -> str:
    """`<stage> crashed: <cause>` (or `prefix` and the cause), then the whole error, without
    terminal colours.

    A Ray error's text is the remote traceback, cause on its last line: a depth model that
    could not load read "ActorDiedError: The actor died because of an error raised in its
    creation task, ..." in the run's artifacts, which show a row's first few hundred
    characters, and its cause (`SafetensorError: ... header too large`) came 1,800 characters
    later."""
    text = _COLOURS.sub("", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    whole = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    prefix = crash_prefix(stage) if prefix is None else prefix
    if len(lines) < 2:
        return f"{prefix}{whole}"
    return f"{prefix}{lines[-1]}\n{whole}"


def _last_attempt() -> bool:
    """Whether this task run has no Prefect retry left (or runs outside Prefect)."""
    context = TaskRunContext.get()
    return context is None or context.task_run.run_count > context.task.retries


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@task(name="download", task_run_name="download {shard.label}", cache_policy=NO_CACHE)
def download_task(shard: Shard, raw_dir: Path, settings: DepthSettings) -> Shard:
    return _run_stage("download", shard, lambda going: download_many(going, raw_dir, settings))


@task(name="transcode", task_run_name="transcode {shard.label}", cache_policy=NO_CACHE)
def transcode_task(
    shard: Shard, out_dir: Path, maps_dir: Path, settings: DepthSettings, actors: list[Any]
) -> Shard:
    node_id = _node_id()
    feed = (
        DepthFeed(shard_actor(shard, actors), maps_dir, settings) if feeds_early(settings) else None
    )

    def finished(record: VideoRecord) -> VideoRecord:
        record = record.update(node_id=node_id)
        return feed.add(record) if feed else record

    def work(going: Sequence[VideoRecord]) -> list[VideoRecord]:
        return transcode_many(going, out_dir, settings, settings.transcode_cpus, then=finished)

    transcoded = _run_stage("transcode", shard, work)
    if feed is None:
        return transcoded
    going = {record.video_id for record in transcoded.records if not record.failed}
    return replace(transcoded, pending_depth=feed.close(going))


@task(name="depth", task_run_name="depth {shard.label}", cache_policy=NO_CACHE)
def depth_task(shard: Shard, maps_dir: Path, settings: DepthSettings, actors: list[Any]) -> Shard:

    early = shard.pending_depth.results() if shard.pending_depth else {}
    # Maps made early for videos failed since (their transcode task crashed on its last try
    # after sending them): a failed row leaves no map that looks made.
    for record in shard.records:
        if record.failed and (made := early.pop(record.video_id, None)) is not None:
            discard_maps(made)

    def work(going: Sequence[VideoRecord]) -> list[VideoRecord]:
        rest = [record for record in going if record.video_id not in early]
        if rest:
            try:
                early.update(
                    (record.video_id, record)
                    for record in _actor_depth(shard, actors, rest, maps_dir, settings)
                )
            except Exception as exc:
                if not _last_attempt():
                    raise  # Prefect retries the task: the early maps are found again
                # No retry left: the videos whose maps came early keep them. Not a crash of
                # this worker (it is here, its shard's transcodes with it): read as one, a
                # rerun fetched and transcoded the whole shard again.
                reason = crash_reason("depth", exc, prefix="depth failed: ")
                early.update((record.video_id, record.fail("depth", reason)) for record in rest)
        return [early[record.video_id] for record in going]

    return replace(_run_stage("depth", shard, work), pending_depth=None)


def _actor_depth(
    shard: Shard,
    actors: list[Any],
    records: Sequence[VideoRecord],
    maps_dir: Path,
    settings: DepthSettings,
) -> list[VideoRecord]:
    """The shard's depth maps from its actor, or, where that actor is gone for good (its
    restarts spent: killed by the memory monitor, a crash), from a model loaded in this task
    on the CPUs it holds, and let go after. Else every later shard asked the dead actor, and
    the rest of the run failed at depth."""
    import ray
    from ray.exceptions import ActorDiedError

    # Imported here: OpenCV and the model's code are no part of the driver's start.
    from tasks.depth.depth_loader import load_depth_estimator
    from tasks.depth.depth_maps import estimate_depth_many

    try:
        return ray.get(shard_actor(shard, actors).depth_maps.remote(records, maps_dir, settings))
    except ActorDiedError as exc:
        run_logger().warning(
            "%s: the depth actor is gone (%s): its depth runs in this task, on the CPU",
            shard.label, str(exc).splitlines()[0],
        )  # fmt: skip
        if run_log.in_run():  # in the UI even if the run's Ray ends next
            send_logs_now()
    on_cpu = settings.model_copy(update={"device": "cpu"})
    # One stand-in at a time on a node: every depth task of a run (one per CPU, holding none)
    # loaded its own model at once, and a large one ran the node out of memory.
    with exclusive_lock(fallback_lock(settings)):
        try:  # not the process's shared estimator: it would hold a model in this worker
            estimator = load_depth_estimator(on_cpu, "cpu", max(1, round(settings.depth_cpus)))
        except Exception as exc:  # the model cannot load here either: each video says why
            reason = f"{type(exc).__name__}: {exc}"
            return [r if r.failed else r.fail("depth", reason) for r in records]
        return estimate_depth_many(records, maps_dir, on_cpu, estimator)


def fallback_lock(settings: DepthSettings) -> Path:
    """The node's lock of depth run in a task for a lost actor (beside the model cache, named
    for the node: a cache folder shared by a cluster's nodes, a home on NFS, made one lock of
    the whole cluster's, and their stand-ins ran one at a time)."""
    with contextlib.suppress(OSError):  # a read-only cache: exclusive_lock goes on unlocked
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
    return settings.cache_dir / f".depth-fallback-{socket.gethostname()}.lock"


class HowDepthRuns:
    """Says in the run's log how the depth model runs, and why not as the run placed it (a GPU
    its torch cannot use, a model ONNX Runtime cannot take): the actor logs why in its own
    process only, which a private Ray keeps from the console and the UI, and the run said
    "on cuda" of actors that ran on the CPU. Asked once the actor has loaded, never waited for
    (a run whose videos all fail at download never needs the model)."""

    def __init__(self, actors: list[Any]) -> None:
        self._answer = actors[0].describe.remote() if actors else None  # after its loading

    def say_once_known(self) -> None:
        import ray

        if self._answer is None or not ray.wait([self._answer], timeout=0)[0]:
            return
        answer, self._answer = self._answer, None
        try:
            runtime, notes = ray.get(answer)
        except Exception:  # the actor is gone: its depth tasks say so
            return
        if notes:
            run_logger().warning("the depth model runs with %s: %s", runtime, "; ".join(notes))
        else:
            run_logger().info("the depth model runs with %s", runtime)


def shard_actor(shard: Shard, actors: list[Any]) -> Any:
    """The depth actor of a shard (its transcode task feeds the one its depth task asks)."""
    return actors[shard.index % len(actors)]


@task(name="write", task_run_name="write {shard.label}", cache_policy=NO_CACHE)
def write_task(shard: Shard, lance_path: Path) -> WrittenShard:
    """The shard's rows as Lance fragments, for the driver to commit; none for a shard that
    re-did videos with a row already (attempt 2 on): the driver replaces their rows in one
    upsert, which fragments cannot do (they would be left as files no version holds)."""
    if shard.redoes_rows:
        return WrittenShard(shard, [])
    try:
        return WrittenShard(shard, write_rows(shard.records, lance_path))
    except Exception as exc:  # Lance's errors share no base class
        if not _last_attempt():
            raise
        # No fragments: the driver writes the rows itself. Raised past its retries, the write
        # read as a crash of the shard's worker ("store crashed"), and every rerun fetched and
        # transcoded the whole shard again.
        run_logger().warning(
            "%s: its rows could not be written here (%s: %s): the driver writes them",
            shard.label, type(exc).__name__, exc,
        )  # fmt: skip
        return WrittenShard(shard, [])


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow or task run's logger (its lines in the UI), or this module's outside a run."""
    return run_log.run_logger(log)


def actor_device(settings: DepthSettings, cluster_gpus: int) -> str:
    """Where the depth actors run: on the cluster's GPUs unless told the CPU, or told the
    ONNX backend, which runs on the CPU only (with `--device auto` on a GPU box every video
    failed at depth, told to use auto)."""
    on_cpu = settings.device == "cpu" or settings.depth_backend == "onnx"
    return "cuda" if cluster_gpus > 0 and not on_cpu else "cpu"


def actor_count(settings: DepthSettings, cluster_gpus: int) -> int:
    """How many depth actors a run starts: `depth_workers`, else one per GPU (one on the CPU)."""
    on_gpu = actor_device(settings, cluster_gpus) == "cuda"
    return settings.depth_workers or (cluster_gpus if on_gpu else 1)


def start_depth_actors(settings: DepthSettings) -> list[Any]:
    """One actor per GPU of the cluster (or `depth_workers`); CPU actors where there is none.

    An actor holds no CPU: the depth task that calls it reserves `depth_cpus` while it waits.
    Actors are named after their model and device and outlive the run by `depth_keep_alive_s`,
    so the next run on the same cluster finds them loaded; on the private local Ray of a run
    they end with it.
    """
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = actor_device(settings, gpus)
    use_gpu = device == "cuda"
    count = actor_count(settings, gpus)
    threads = max(1, round(settings.depth_cpus))  # model threads of a CPU actor
    options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 2, "max_task_retries": 1}
    if use_gpu:
        options["num_gpus"] = 1
    keep_alive_s = settings.depth_keep_alive_s
    if keep_alive_s > 0:
        options.update(namespace=ACTOR_NAMESPACE, lifetime="detached", get_if_exists=True)
    key = actor_key(settings, device, threads)
    run_logger().info(
        "depth model %s: %d actor(s) on %s%s", settings.depth_model, count, device,
        model_origin(settings.depth_model),
    )  # fmt: skip
    actor_class = ray.remote(DepthActor)
    actors = []
    for index in range(count):
        named = {"name": f"depth-{key}-{index}"} if keep_alive_s > 0 else {}
        actor = actor_class.options(**options, **named)
        actors.append(actor.remote(settings, device, threads, keep_alive_s))
    return actors


def actor_key(settings: DepthSettings, device: str, threads: int) -> str:
    """What names a run's depth actors, for the next run to find them loaded: the model, the
    folder's files too (an actor kept alive with the weights saved before would serve them to
    the next run of the same path), the backend and the device; the threads of a CPU actor
    only (a GPU actor's model runs on its GPU: a rerun with another --depth-cpus made a second
    actor that waited for the GPU the first held idle, for its keep-alive)."""
    identity = model_identity(settings.depth_model)
    threads_part = "" if device == "cuda" else f"|{threads}"
    model = f"{settings.depth_model}|{identity}|{settings.depth_backend}|{device}{threads_part}"
    return hashlib.sha1(model.encode()).hexdigest()[:12]


# How often a run tells its depth actors that it still holds them, at most (and three times
# within their keep-alive, so one late call never lets them end).
HOLD_EVERY_S = 60.0


@contextlib.contextmanager
def actors_held(actors: list[Any], keep_alive_s: float) -> Iterator[None]:
    """Keep `actors` from ending themselves while the run that uses them goes on.

    An actor ends after `keep_alive_s` without a call, and a run may make none for longer than
    that (its first depth call waits for a shard's downloads and transcodes). So a thread calls
    each actor's `keep_alive` at once (restarting the clock of an actor an earlier run left
    idle) and then every `keep_alive_s / 3` until the run ends. A run that dies stops calling,
    and its actors end `keep_alive_s` later, as after a run that finished.
    """
    if keep_alive_s <= 0 or not actors:
        yield
        return
    interval = min(HOLD_EVERY_S, keep_alive_s / 3)
    done = threading.Event()

    def hold() -> None:
        while True:
            for actor in actors:
                actor.keep_alive.remote(keep_alive_s)
            if done.wait(interval):
                return

    holder = threading.Thread(target=hold, name="depth-actors-held", daemon=True)
    holder.start()
    try:
        yield
    finally:
        done.set()
        holder.join()


def _ended(future: PrefectFuture[Any]) -> bool:
    """Whether a stage's task has ended, asked of Ray where it runs there: a prefect-ray
    future's `state` is a call to the Prefect API each time, which a lost node may have taken
    down with it (and 4 calls per shard every 10 s)."""
    ref = getattr(future, "wrapped_future", None)
    if ref is None:
        return future.state.is_final()
    import ray

    return bool(ray.wait([ref], timeout=0)[0])


@dataclass
class _Chain:
    """The four futures of one shard, in stage order."""

    shard: Shard
    futures: list[tuple[Stage, PrefectFuture[Any]]]

    def first_unended(self) -> Stage | None:
        """The stage this shard waits on now (None once every stage has ended)."""
        return next((name for name, future in self.futures if not _ended(future)), None)

    def stages_done(self) -> int:
        return sum(_ended(future) for _, future in self.futures)

    def crashed_rows(self, exc: BaseException) -> Shard:
        """The shard's rows when a stage's worker died: as the last stage whose result is had
        left them (a video that got a 404 keeps its own reason and stage times: built from the
        planned shard, it read "depth crashed"), the rest failed at the first stage that did
        not complete, or whose result went with its node. A worker killed outright (the
        kernel's OOM killer, a node lost) leaves its task run Running and the stages after it
        Pending: looking for a Failed or Crashed one found none, and the rows said "store
        crashed", counted as through every stage.

        A write task's worker killed: the depth task's rows are whole, and the driver writes
        them (failed as "store crashed", finished videos were counted failed and their shard
        fetched and transcoded again by the next run)."""
        last = self.shard
        for stage, future in self.futures:
            if stage == "store" or not future.state.is_completed():
                break
            try:
                last = future.result()
            except Exception:  # its result gone with its node: not known from here on
                break
        ended = "was given up" if isinstance(exc, ClusterLostError) else "lost its worker"
        run_logger().warning(
            "%s: its %s task %s (%s)%s", self.shard.label, stage, ended,
            type(exc).__name__, ": the driver writes its rows" if stage == "store" else "",
        )  # fmt: skip
        return last if stage == "store" else last.fail_remaining(stage, crash_reason(stage, exc))

    def rows_after(self, exc: BaseException, stage: Stage = "download") -> Shard:
        """`crashed_rows`, or, where the Prefect API cannot say how far the stages got (down,
        or failing past its client's retries), every video still going failed at `stage`
        (from the download: the next run does it again whole). Raised, it ended the run with a
        traceback, its other shards in flight uncommitted and no artifacts recorded."""
        try:
            return self.crashed_rows(exc)
        except Exception as unknown:
            run_logger().warning(
                "%s: how far its stages got is not known (%s): its videos are failed at %s",
                self.shard.label, unknown, stage,
            )  # fmt: skip
            return self.shard.fail_remaining(stage, crash_reason(stage, exc))


def _stages(
    shard: Shard,
    downloaded: PrefectFuture[Shard],
    folders: tuple[Path, Path, Path],
    lance_path: Path,
    settings: DepthSettings,
    actors: list[Any],
) -> _Chain:
    """The shard's stages after its download, chained by their futures."""
    _, videos_dir, maps_dir = folders
    retried = {"retries": settings.task_retries}
    with remote_options(num_cpus=settings.transcode_cpus):
        transcoded = transcode_task.with_options(**retried).submit(
            downloaded, videos_dir, maps_dir, settings, actors
        )
    with remote_options(num_cpus=settings.depth_cpus):
        mapped = depth_task.with_options(**retried).submit(transcoded, maps_dir, settings, actors)
    with remote_options(num_cpus=0):
        written = write_task.with_options(**retried).submit(mapped, lance_path)
    stages: list[tuple[Stage, PrefectFuture[Any]]] = [
        ("download", downloaded), ("transcode", transcoded), ("depth", mapped), ("store", written)
    ]  # fmt: skip
    return _Chain(shard, stages)


class ClusterLostError(RuntimeError):
    """The cluster has lacked what a stage still to run needs for the run's wait (a node lost)."""

    def __init__(self, stage: Stage, why: str) -> None:
        super().__init__(why)
        self.stage = stage


Lacks = Callable[[], "dict[Stage, str]"]  # what the cluster lacks now, by stage


@dataclass
class _LackWatch:
    """Fails a run whose cluster has lacked what a stage still to run needs (`lacks`) for
    `wait_s` with no stage finishing meanwhile. A node lost mid-run (a spot instance
    reclaimed) left a transcode that fits no node left pending for ever, and a GPU actor
    restarting for a GPU gone never failed: the run sat Running with no word."""

    lacks: Lacks
    wait_s: float
    in_flight: dict[Any, _Chain]  # the run's, as it goes
    waiting: list[Shard]
    since: float | None = None  # monotonic: lacking, with no stage finished, since then
    seen: tuple[int, int] = (0, 0)  # shards left, stages done: what changes as the run moves
    said: bool = False
    lost: ClusterLostError | None = None  # set by _next_finished as it gives up
    failed_ask: str | None = None  # the last error asking the cluster, said once

    def __call__(self) -> None:
        """ClusterLostError once lacking for the wait with every shard in flight held up by
        it; else nothing (a shard whose stage still runs may finish, and the run goes on)."""
        chains, waiting, lacks = list(self.in_flight.values()), self.waiting, self.lacks()
        at = [chain.first_unended() for chain in chains]  # the stage each shard waits on
        needed = {stage: why for stage, why in lacks.items() if waiting or stage in at}
        if not needed:
            self.since, self.said = None, False
            return
        moved = (len(chains) + len(waiting), sum(chain.stages_done() for chain in chains))
        held_up = all(stage in lacks for stage in at)
        if self.since is None or moved != self.seen or not held_up:  # it moves: wait from now
            self.since, self.seen = time.monotonic(), moved
        stage, why = next(iter(needed.items()))
        if not self.said:
            self.said = True
            run_logger().warning(
                "%s: the run waits up to %.0f s for the cluster to have it again (a node "
                "replaced), then fails the videos still going", why, self.wait_s,
            )  # fmt: skip
        elif time.monotonic() - self.since >= self.wait_s:
            raise ClusterLostError(stage, f"{why}, for {self.wait_s:.0f} s")


def _next_finished(
    finished: queue.Queue[PrefectFuture[WrittenShard]], watch: _LackWatch | None
) -> PrefectFuture[WrittenShard] | None:
    """The next shard's written future, asking `watch` every LOST_CHECK_S while none comes;
    None once it gives up (its `lost` says why)."""
    while True:
        with contextlib.suppress(queue.Empty):
            return finished.get(timeout=LOST_CHECK_S if watch is not None else None)
        if watch is not None:
            try:
                watch()
            except ClusterLostError as lost:
                watch.lost = lost
                return None
            except Exception as exc:  # Ray asked in vain: the run waits on, as it did before
                if str(exc) != watch.failed_ask:  # said once, not every LOST_CHECK_S
                    watch.failed_ask = str(exc)
                    run_logger().warning("asking the cluster what it lacks failed (%s)", exc)


def _all_lost(
    in_flight: dict[Any, _Chain], waiting: list[Shard], lost: ClusterLostError
) -> Iterator[WrittenShard]:
    """Every shard still in flight or waiting, its videos still going failed for `lost`."""
    for chain in in_flight.values():
        yield WrittenShard(chain.rows_after(lost, lost.stage), [])
    for shard in reversed(waiting):  # never fetched: failed before their first stage
        yield WrittenShard(shard.fail_remaining("download", f"not started: {lost}"), [])


def run_shards(
    shards: Sequence[Shard],
    output_dir: Path,
    lance_path: Path,
    settings: DepthSettings,
    cpus: int,
    lacks: Lacks | None = None,
) -> Iterator[WrittenShard]:
    """Run every shard through its four stages, at most `shards_in_flight` at once; yield each
    written shard as it finishes (its fragments are not committed yet). `lacks` says what the
    cluster lacks for the stages now (see _LackWatch)."""
    import ray

    if not shards:
        return  # nothing to do: no model to load
    folders = OutputLayout(output_dir).file_folders
    window = shards_in_flight(settings, cpus)
    finished: queue.Queue[PrefectFuture[WrittenShard]] = queue.Queue()
    in_flight: dict[PrefectFuture[WrittenShard], _Chain] = {}
    waiting = list(reversed(shards[window:]))
    watch = _LackWatch(lacks, settings.lost_node_wait_s, in_flight, waiting) if lacks else None

    def download(shard: Shard) -> PrefectFuture[Shard]:
        with remote_options(num_cpus=0):
            retried = download_task.with_options(retries=settings.task_retries)
            return retried.submit(shard, folders[0], settings)

    def submit(shard: Shard, downloaded: PrefectFuture[Shard]) -> None:
        chain = _stages(shard, downloaded, folders, lance_path, settings, actors)
        written = chain.futures[-1][1]
        in_flight[written] = chain
        written.add_done_callback(finished.put)

    # The first downloads go before the actors start: Ray gives them the idle workers (which a
    # CLI run warms, flows/ray_start.py), and each actor a worker of its own.
    first = [(shard, download(shard)) for shard in shards[:window]]
    actors = start_depth_actors(settings)
    held, how = actors_held(actors, settings.depth_keep_alive_s), HowDepthRuns(actors)
    try:  # the first run of a hub model: its download by the actors, in the run's log
        with held, hub_download_logged(settings.depth_model, run_logger()):
            for shard, downloaded in first:
                submit(shard, downloaded)
            while in_flight:
                if (future := _next_finished(finished, watch)) is None:  # the cluster lacks
                    yield from _all_lost(in_flight, waiting, watch.lost)  # type: ignore[union-attr]
                    return
                chain = in_flight.pop(future)
                if waiting:
                    shard = waiting.pop()
                    submit(shard, download(shard))
                how.say_once_known()
                try:
                    yield future.result()
                except Exception as exc:  # a Ray worker died (out of memory, killed)
                    yield WrittenShard(chain.rows_after(exc), [])
    finally:
        if settings.depth_keep_alive_s <= 0:
            for actor in actors:
                ray.kill(actor)
