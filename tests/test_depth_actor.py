"""Depth actors on a Ray that outlives the run: the next run finds the model loaded, and an
actor left idle past its keep-alive ends itself (no model holds memory or a GPU for ever)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flows.ray_start import local_ray_init_kwargs, private_ray_start
from tasks.depth.settings import DepthSettings
from tasks.depth.shard_tasks import start_depth_actors


@pytest.mark.slow
def test_a_kept_actor_serves_the_next_run_then_ends_when_idle(
    tiny_depth_model: Path, tmp_path: Path
) -> None:
    import ray
    from ray.exceptions import RayActorError

    settings = DepthSettings(
        depth_model=str(tiny_depth_model), device="cpu", depth_keep_alive_s=2.0
    )
    with private_ray_start():
        ray.init(**local_ray_init_kwargs(num_cpus=2))
    try:
        [first] = start_depth_actors(settings)
        assert ray.get(first.depth_maps.remote([], tmp_path, settings)) == []
        [again] = start_depth_actors(settings)  # the next run, same model and device
        assert again._actor_id == first._actor_id

        time.sleep(8)  # no call for 4x the keep-alive (the actor looks every 2 s)
        with pytest.raises(RayActorError):
            ray.get(first.depth_maps.remote([], tmp_path, settings), timeout=30)
        [fresh] = start_depth_actors(settings)
        assert fresh._actor_id != first._actor_id
        assert ray.get(fresh.depth_maps.remote([], tmp_path, settings)) == []
    finally:
        ray.shutdown()
