"""Depth actors: on a Ray that outlives the run, the next run finds the model loaded, and an
actor left idle past its keep-alive ends itself (no model holds memory or a GPU for ever), but
never while a run holds it; a shard's videos reach the actor as they are transcoded, and its
depth task redoes what an early call lost."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from common.files import exclusive_lock
from devstack.video_server import Drip, VideoServer
from flows.depth_extraction import depth_extraction
from flows.ray_runner import ray_task_runner
from flows.ray_start import local_ray_init_kwargs, private_ray_start
from tasks.depth.depth_feed import DepthFeed, PendingDepth
from tasks.depth.settings import DepthSettings
from tasks.depth.shard_tasks import (
    Shard,
    actors_held,
    crash_reason,
    depth_task,
    fallback_lock,
    start_depth_actors,
    transcode_task,
)
from tasks.depth.video_record import ERROR_CHARS, VideoRecord, crash_prefix
from tests.conftest import VIDEOS

CLIP = VIDEOS / "pool_cleaning.mp4"


@pytest.fixture
def local_ray() -> Iterator[None]:
    import ray

    with private_ray_start():
        ray.init(**local_ray_init_kwargs(num_cpus=2))
    try:
        yield
    finally:
        ray.shutdown()


def _downloaded_shard(count: int) -> Shard:
    records = tuple(
        VideoRecord(video_id=f"v{index}", source_url=f"http://h/v{index}.mp4").update(
            raw_path=str(CLIP), shard=0
        )
        for index in range(count)
    )
    return Shard(0, 1, records)


def _loaded_actor(model: Path, tmp_path: Path, keep_alive_s: float) -> tuple[Any, DepthSettings]:
    """A named depth actor with `keep_alive_s`, its model loaded (one empty call answered)."""
    import ray

    settings = DepthSettings(depth_model=str(model), device="cpu", depth_keep_alive_s=keep_alive_s)
    [actor] = start_depth_actors(settings)
    assert ray.get(actor.depth_maps.remote([], tmp_path, settings)) == []
    return actor, settings


def _assert_ended(actor: Any, settings: DepthSettings, tmp_path: Path) -> None:
    import ray
    from ray.exceptions import RayActorError

    with pytest.raises(RayActorError):
        ray.get(actor.depth_maps.remote([], tmp_path, settings), timeout=30)


def _wait_until_ended(actor: Any, within_s: float) -> None:
    """Return once `actor` has ended, asking every 0.25 s with Ray's own readiness call (which,
    unlike a depth call, does not restart its idle clock); fail if it lives `within_s` on."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except RayActorError:
            return
        except GetTimeoutError:  # no answer before the deadline: not ended either
            break
        time.sleep(0.25)
    pytest.fail(f"the actor still lived {within_s:g} s on")


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_kept_actor_serves_the_next_run_then_ends_when_idle(
    tiny_depth_model: Path, tmp_path: Path
) -> None:
    import ray

    first, settings = _loaded_actor(tiny_depth_model, tmp_path, keep_alive_s=2.0)
    [again] = start_depth_actors(settings)  # the next run, same model and device
    assert again._actor_id == first._actor_id

    # Idle past the keep-alive, it ends: the actor looks every 2 s, so within 4 s of its last
    # call (8 s allowed, for a loaded machine).
    _wait_until_ended(first, within_s=8)
    _assert_ended(first, settings, tmp_path)
    [fresh] = start_depth_actors(settings)
    assert fresh._actor_id != first._actor_id
    assert ray.get(fresh.depth_maps.remote([], tmp_path, settings)) == []


@pytest.mark.usefixtures("local_ray")
def test_a_model_saved_again_gets_a_new_actor_not_the_kept_one(
    tiny_depth_model: Path, tmp_path: Path
) -> None:
    """Kept actors were named by the model's path alone: weights saved again to the same
    folder were never loaded while runs kept coming within the keep-alive."""
    import ray

    model = tmp_path / "model"
    shutil.copytree(tiny_depth_model, model)
    first, settings = _loaded_actor(model, tmp_path, keep_alive_s=60.0)
    started = [first]
    try:
        started += start_depth_actors(settings)
        assert started[-1]._actor_id == first._actor_id
        [weights] = model.glob("*.safetensors")
        weights.write_bytes(weights.read_bytes())  # saved again: a new time
        started += start_depth_actors(settings)
        assert started[-1]._actor_id != first._actor_id
        assert ray.get(started[-1].depth_maps.remote([], tmp_path, settings)) == []
    finally:
        for actor in started:  # detached: they would outlive the test by their keep-alive
            ray.kill(actor)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_held_actor_outlives_its_keep_alive_and_ends_once_released(
    tiny_depth_model: Path, tmp_path: Path
) -> None:
    import ray

    # Held, it is told every 1.7 s (a third of the keep-alive) that the run goes on: roomy
    # enough for a loaded machine's delays.
    actor, settings = _loaded_actor(tiny_depth_model, tmp_path, keep_alive_s=5.0)
    with actors_held([actor], settings.depth_keep_alive_s):
        time.sleep(12)  # no depth call for 2.4x the keep-alive, as behind slow downloads
        assert ray.get(actor.depth_maps.remote([], tmp_path, settings), timeout=30) == []
    _wait_until_ended(actor, within_s=20)  # released: ~2x its keep-alive (looks every 5 s)
    _assert_ended(actor, settings, tmp_path)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_kept_actor_lives_by_the_keep_alive_of_the_run_that_holds_it(
    tiny_depth_model: Path, tmp_path: Path
) -> None:
    """An actor a run of a 2-s keep-alive left was found by a run of 30 s, which calls it every
    10 s: it ended within 2-4 s of each call, and the run's depth calls met a dead actor. A
    run of a shorter keep-alive holding it meanwhile does not cut the longer one's short."""
    import ray

    actor, settings = _loaded_actor(tiny_depth_model, tmp_path, keep_alive_s=2.0)
    try:
        with actors_held([actor], keep_alive_s=30.0):
            ray.get(actor.keep_alive.remote(1.0))  # a run of a shorter one holds it too
            time.sleep(7)  # more than 3x the keep-alive it was made with
            assert ray.get(actor.depth_maps.remote([], tmp_path, settings), timeout=30) == []
    finally:
        ray.kill(actor)  # detached: it would outlive the test by its keep-alive


@pytest.mark.slow
def test_a_run_keeps_its_depth_actor_through_a_download_longer_than_the_keep_alive(
    prefect_api: None, tiny_depth_model: Path, tmp_path: Path
) -> None:
    """The depth actor starts with the run, and its first call waits for a download that
    takes several times its keep-alive: the run holds the actor meanwhile (without that, the
    actor ended itself first, and the video failed at depth; since its task stands in for a
    lost actor, it is made on the CPU in the task, with a warning in the run's log)."""
    settings = DepthSettings(
        output=tmp_path / "out",
        depth_model=str(tiny_depth_model),
        device="cpu",
        depth_keep_alive_s=4.0,
    )
    flow = depth_extraction.with_options(task_runner=ray_task_runner(num_cpus=2))
    # 90 kB a second for 15 s, then the rest: slow, but above the download's rate floor.
    slow = Drip(CLIP, chunk=90_000, every_s=1.0, drip_bytes=1_350_000)
    with VideoServer({"slow.mp4": slow}) as server:
        listing = tmp_path / "urls.txt"
        listing.write_text(server.url("slow.mp4") + "\n")
        state = flow(urls=str(listing), settings=settings, return_state=True)
    summary = state.result()
    assert (summary["ok"], summary["failed"]) == (1, 0), summary
    # ... made by the actor: a video whose actor had ended is still made, by its task on the
    # CPU, and only the run's log tells (it says so at once)
    with get_client(sync_client=True) as client:
        run_id = state.state_details.flow_run_id
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    assert any("1 actor(s) on cpu" in line.message for line in logs), [x.message for x in logs]
    assert not any("the depth actor is gone" in line.message for line in logs)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_shards_videos_reach_the_depth_actor_while_it_still_transcodes(
    tiny_depth_model: Path, tmp_path: Path
) -> None:
    import ray

    # Batches of 2 frames, one frame a video: a call after the second video, one at the end.
    settings = DepthSettings(depth_model=str(tiny_depth_model), device="cpu", depth_batch_size=2)
    videos, maps = tmp_path / "videos", tmp_path / "depth"
    actors = start_depth_actors(settings)
    assert ray.get(actors[0].depth_maps.remote([], maps, settings)) == []  # model loaded

    transcoded = transcode_task.fn(_downloaded_shard(3), videos, maps, settings, actors)
    assert transcoded.pending_depth is not None
    assert [len(batch) for batch in ray.get(transcoded.pending_depth.calls)] == [2, 1]
    mapped = depth_task.fn(transcoded, maps, settings, actors)

    assert [record.status for record in mapped.records] == ["ok"] * 3
    assert mapped.pending_depth is None  # no Ray references travel on to the write
    first_map = Path(mapped.records[0].depth_path).stat().st_mtime
    last_video = Path(mapped.records[-1].transcoded_path).stat().st_mtime
    # Handed over with the second video: done before the shard's last transcode was.
    assert first_map < last_video
    assert np.load(mapped.records[0].depth_path).shape == (1, 360, 478)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_the_depth_task_redoes_the_videos_of_an_early_call_that_failed(
    tiny_depth_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import ray

    settings = DepthSettings(depth_model=str(tiny_depth_model), device="cpu", depth_batch_size=1)
    videos, maps = tmp_path / "videos", tmp_path / "depth"
    actors = start_depth_actors(settings)
    transcoded = transcode_task.fn(_downloaded_shard(2), videos, maps, settings, actors)
    assert transcoded.pending_depth is not None
    ray.get(transcoded.pending_depth.calls)
    for path in maps.glob("*"):  # what the early calls made, gone with them
        path.unlink()

    @ray.remote
    def lost_call() -> list[VideoRecord]:
        raise RuntimeError("the actor died")

    lost = Shard(0, 1, transcoded.records, PendingDepth([lost_call.remote()]))
    with caplog.at_level(logging.WARNING, logger="tasks.depth.depth_feed"):
        mapped = depth_task.fn(lost, maps, settings, actors)
    assert [record.status for record in mapped.records] == ["ok"] * 2
    assert all(Path(record.depth_path).is_file() for record in mapped.records)
    assert "redoing its videos" in caplog.text


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_videos_a_last_try_crash_failed_get_no_depth_and_leave_no_maps(
    tiny_depth_model: Path, tmp_path: Path
) -> None:
    """A transcode task that crashed on its last try failed its shard's videos, yet still sent
    those it had queued to the depth model, and the maps of those sent before stayed in the
    output beside failed rows (found in review, stop 61)."""
    import ray

    settings = DepthSettings(depth_model=str(tiny_depth_model), device="cpu", depth_batch_size=1)
    videos, maps = tmp_path / "videos", tmp_path / "depth"
    actors = start_depth_actors(settings)
    transcoded = transcode_task.fn(_downloaded_shard(2), videos, maps, settings, actors)
    assert transcoded.pending_depth is not None
    made = [record for call in transcoded.pending_depth.calls for record in ray.get(call)]
    assert len(made) == 2 and all(Path(record.depth_path).is_file() for record in made)
    # What is still queued as the task ends goes only for the videos still going.
    queued = DepthFeed(
        actors[0], tmp_path / "other", settings.model_copy(update={"depth_batch_size": 8})
    )
    for record in transcoded.records:
        queued.add(record)
    sent = queued.close({"v1"})
    assert [record.video_id for call in sent.calls for record in ray.get(call)] == ["v1"]
    # Both failed by the crash after their maps came early: the depth task keeps none.
    crashed = transcoded.fail_remaining("transcode", "transcode crashed: RuntimeError: boom")
    mapped = depth_task.fn(replace(crashed, pending_depth=transcoded.pending_depth), maps,
                           settings, actors)  # fmt: skip
    assert [record.status for record in mapped.records] == ["failed", "failed"]
    assert [record.failed_stage for record in mapped.records] == ["transcode", "transcode"]
    assert sorted(maps.glob("*")) == []


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_depth_actor_lost_for_good_is_stood_in_for_by_its_depth_task(
    tiny_depth_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An actor gone for good (its restarts spent: the memory monitor, a crash) was asked by
    every later shard, and the rest of the run failed at depth. The maps that came early are
    kept; the rest are made in the depth task."""
    import ray

    settings = DepthSettings(depth_model=str(tiny_depth_model), device="cpu", depth_batch_size=1)
    videos, maps = tmp_path / "videos", tmp_path / "depth"
    actors = start_depth_actors(settings)
    transcoded = transcode_task.fn(_downloaded_shard(2), videos, maps, settings, actors)
    assert transcoded.pending_depth is not None
    first_call, _ = transcoded.pending_depth.calls  # one call a video at batch 1
    ray.get(first_call)
    ray.kill(actors[0], no_restart=True)  # the second video's map must now come from a dead actor
    shard = Shard(0, 1, transcoded.records, PendingDepth([first_call]))
    first_map = Path(ray.get(first_call)[0].depth_path).stat().st_mtime_ns
    # Another task stands in on this node: this one waits for it (every depth task of a run
    # loaded a model of its own at once, and a large model ran the node out of memory).
    done: list = []
    with exclusive_lock(fallback_lock(settings)):
        standing_in = threading.Thread(  # outside Prefect: no retry left
            target=lambda: done.append(depth_task.fn(shard, maps, settings, actors))
        )
        standing_in.start()
        time.sleep(3)
        assert done == [] and standing_in.is_alive()
    standing_in.join(120)
    [mapped] = done
    first, second = mapped.records
    assert first.status == "ok" and Path(first.depth_path).stat().st_mtime_ns == first_map
    assert second.status == "ok", second.error
    assert np.load(second.depth_path).shape[-2:] == (second.height, second.width)
    assert "the depth actor is gone" in caplog.text


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_model_that_cannot_load_fails_its_videos_with_the_cause_first(
    tiny_depth_model: Path, tmp_path: Path
) -> None:
    """The run's artifacts show a row's first few hundred characters: the cause must be in
    them, not 1,800 characters into Ray's colourful remote traceback."""
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_depth_model, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors file
    settings = DepthSettings(depth_model=str(broken), device="cpu", depth_backend="torch")
    videos, maps = tmp_path / "videos", tmp_path / "depth"
    actors = start_depth_actors(settings)
    transcoded = transcode_task.fn(_downloaded_shard(1), videos, maps, settings, actors)
    [record] = depth_task.fn(transcoded, maps, settings, actors).records  # no retry left
    assert record.failed and record.failed_stage == "depth"
    assert "\x1b" not in record.error
    # The actor died loading it; its task, standing in, failed to load it too, and says why.
    first_line = record.error.splitlines()[0]
    assert first_line.startswith("SafetensorError"), record.error[:400]


@pytest.mark.usefixtures("local_ray")
def test_a_ray_error_is_reported_cause_first() -> None:
    """A Ray error's text is the remote traceback, its cause on the last line, with terminal
    colours: the failures artifact, which shows a row's first few hundred characters, read
    "RayTaskError ... ray::load() (pid=...)" and never came to the cause."""
    import ray

    @ray.remote
    def load_weights() -> None:
        # A long text, as a chained error or Ray's out-of-memory table makes it.
        table = "\n".join(f"pid {i}: 1.2 GiB python -m worker --shard {i}" for i in range(60))
        raise ValueError("header too large") from OSError(table)

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(load_weights.remote())
    reason = crash_reason("depth", caught.value)
    first, _, rest = reason.partition("\n")
    assert first == f"{crash_prefix('depth')}ValueError: header too large", reason
    assert "\x1b" not in reason, reason
    assert 'raise ValueError("header too large")' in rest  # the whole error follows
    # The row keeps the head and the tail of a long one (its last 2,000 characters lost the
    # prefix, so a rerun no longer knew the row for a crash).
    assert len(reason) > ERROR_CHARS
    stored = VideoRecord(video_id="v", source_url="http://h/v.mp4").fail("depth", reason).error
    assert stored.startswith(f"{first}\n") and len(stored) <= ERROR_CHARS + 10
    assert stored.endswith("ValueError: header too large"), stored[-200:]


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_depth_step_that_reserves_cpus_runs_the_model_in_its_own_task(
    tiny_depth_model: Path, tmp_path: Path
) -> None:
    settings = DepthSettings(
        depth_model=str(tiny_depth_model), device="cpu", depth_batch_size=1, depth_cpus=1
    )
    videos, maps = tmp_path / "videos", tmp_path / "depth"
    actors = start_depth_actors(settings)
    transcoded = transcode_task.fn(_downloaded_shard(2), videos, maps, settings, actors)
    assert transcoded.pending_depth is None and not maps.exists()  # nothing ran outside it
    mapped = depth_task.fn(transcoded, maps, settings, actors)
    assert [record.status for record in mapped.records] == ["ok"] * 2


@pytest.mark.usefixtures("local_ray")
def test_a_depth_call_that_fails_without_its_actor_dying_keeps_the_shard_s_transcodes(
    tmp_path: Path,
) -> None:
    """Found in review: an error of the actor's call that is no death (an error raised in the
    model's code, an actor that cannot be reached for now) on the task's last try was written
    "depth crashed: ", which a rerun reads as the shard's worker dying: the whole shard was
    fetched and transcoded again. The actor here is a stand-in whose call raises: no real
    model fails that way on demand."""
    import ray

    from tasks.depth.video_table import _transcode_taken

    @ray.remote(num_cpus=0)
    class FailingDepth:
        def depth_maps(self, *_args: Any) -> None:
            raise MemoryError("the model's buffers")

    settings = DepthSettings(device="cpu", depth_cpus=1)  # no early feed: the depth task asks
    videos, maps = tmp_path / "videos", tmp_path / "depth"
    actors = [FailingDepth.remote()]
    transcoded = transcode_task.fn(_downloaded_shard(2), videos, maps, settings, actors)
    assert [r.status for r in transcoded.records] == ["pending"] * 2
    mapped = depth_task.fn(transcoded, maps, settings, actors)  # no retry left
    for record in mapped.records:
        assert record.failed_stage == "depth" and record.error.startswith("depth failed: ")
        assert "MemoryError: the model's buffers" in record.error.splitlines()[0], record.error
        assert _transcode_taken(record.failed_stage)  # a rerun keeps it
        assert Path(record.transcoded_path).is_file()


def test_a_gpu_actor_is_found_again_whatever_the_cpus_a_rerun_asks(tiny_depth_model: Path) -> None:
    """Found in review: the threads of a CPU actor named GPU actors too, so a rerun with
    another --depth-cpus made a second GPU actor, which waited for the GPU the first one held
    idle until its keep-alive ran out (no GPU here: the name is what decides)."""
    from tasks.depth.shard_tasks import actor_key

    settings = DepthSettings(depth_model=str(tiny_depth_model))
    assert actor_key(settings, "cuda", 1) == actor_key(settings, "cuda", 4)
    assert actor_key(settings, "cpu", 1) != actor_key(settings, "cpu", 4)  # threads it runs
    assert actor_key(settings, "cpu", 1) != actor_key(settings, "cuda", 1)
