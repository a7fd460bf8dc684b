"""How a run's videos are cut into shards: every video in exactly one shard, in order, shards of
nearly equal size, and whole waves so that the last one keeps every transcode slot busy."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tasks.depth.settings import DepthSettings, shards_in_flight
from tasks.depth.shard_tasks import actor_device, make_shards, shard_count
from tasks.depth.video_record import VideoRecord


def records(count: int) -> list[VideoRecord]:
    return [VideoRecord(video_id=f"v{i}", source_url=f"http://x/{i}") for i in range(count)]


@given(st.integers(0, 300), st.integers(1, 80))
def test_shards_hold_every_video_once_in_order_and_differ_by_one_at_most(
    videos: int, count: int
) -> None:
    shards = make_shards(records(videos), count)
    ids = [record.video_id for shard in shards for record in shard.records]
    assert ids == [f"v{index}" for index in range(videos)]
    assert len(shards) == min(count, videos)
    sizes = [len(shard.records) for shard in shards]
    assert not sizes or max(sizes) - min(sizes) <= 1
    for index, shard in enumerate(shards):
        assert shard.index == index and shard.count == len(shards)
        assert all(record.shard == index for record in shard.records)


@given(st.integers(1, 3000), st.integers(1, 16), st.integers(0, 40), st.integers(1, 4))
def test_the_shard_count_fills_whole_waves_and_keeps_the_size_limit(
    videos: int, cpus: int, shard_size: int, transcode_cpus: int
) -> None:
    settings = DepthSettings(shard_size=shard_size, transcode_cpus=transcode_cpus)
    count = shard_count(videos, settings, cpus)
    wave = shards_in_flight(settings, cpus)
    sizes = [len(shard.records) for shard in make_shards(records(videos), count)]
    assert max(sizes) <= (shard_size or 32)
    if not shard_size and videos >= 4 * wave:  # auto shards of about 4 or more, never 1 or 2
        assert min(sizes) >= 3
    # Whole waves, unless there are fewer videos than that: then one video per shard.
    assert count % wave == 0 or count == videos


def test_a_list_that_left_one_shard_alone_at_the_end_is_cut_into_whole_waves() -> None:
    """150 videos on 2 CPUs were 5 shards of up to 32: the fifth ran alone, one ffmpeg at a
    time, with a CPU idle for its whole transcode. Now 6 shards of 25: three full waves."""
    settings = DepthSettings()
    shards = make_shards(records(150), shard_count(150, settings, cpus=2))
    assert [len(shard.records) for shard in shards] == [25] * 6
    assert shard_count(48, settings, cpus=2) == 4  # two shards per CPU, as before
    assert shard_count(2000, settings, cpus=2) == 64  # 63 of up to 32 would end on a lone one
    assert shard_count(10, DepthSettings(shard_size=1), cpus=2) == 10
    assert shard_count(100, DepthSettings(shards_in_flight=3), cpus=2) == 6


def test_a_short_list_gets_fewer_larger_shards_that_outlast_the_model_load() -> None:
    """Shards of one or two videos finished transcoding before the depth model had loaded and
    held the next wave back: 8 videos on 2 CPUs took 15 % less time in 2 shards of 4 than in 4
    of 2. Still one shard per transcode slot where there are videos for it."""
    settings = DepthSettings()
    assert shard_count(8, settings, cpus=2) == 2
    assert shard_count(4, settings, cpus=2) == 2
    assert shard_count(3, settings, cpus=2) == 2
    assert shard_count(1, settings, cpus=2) == 1
    assert shard_count(9, settings, cpus=2) == 2  # 5 + 4, not 3 + 2 + 2 + 2
    assert shard_count(16, settings, cpus=2) == 4


def test_depth_actors_go_to_the_gpus_unless_the_cpu_or_onnx_is_asked_for() -> None:
    """`--depth-backend onnx` with the default `--device auto` put the actors on a GPU, where
    ONNX is refused: every video of the run failed at depth."""
    on = {
        (backend, device): actor_device(DepthSettings(depth_backend=backend, device=device), 2)
        for backend in ("auto", "torch", "onnx")
        for device in ("auto", "cuda", "cpu")
        if not (backend == "onnx" and device == "cuda")  # refused by the settings' check
    }
    assert {key for key, device in on.items() if device == "cuda"} == {
        ("auto", "auto"), ("auto", "cuda"), ("torch", "auto"), ("torch", "cuda"),
    }  # fmt: skip
    assert actor_device(DepthSettings(), 0) == "cpu"
