"""Benchmark: Depth Pro at its real size on a GPU, half precision against full, in one run.

python -m bench.depth_gpu [--video CLIP] [--frames 8] [--rounds 3]

No Depth Pro weights can be had offline, so the model is a `DepthProConfig` with the architecture
and size of `apple/DepthPro-hf` (DINOv2-L/16 encoders, 1536 px input) and random weights, saved and
loaded back through `tasks.depth.depth_torch.DepthEstimator`, the path the flow uses; a network's
speed does not depend on its weights' values. Measures frames per second of
`DepthEstimator.estimate` on real frames at 360p in float16 (what the flow uses on CUDA) against
float32 on the same GPU, and checks that `estimate_depth` writes maps at the frame size on the GPU.
Without CUDA it says so and stops. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.cli_args import bench_parser
from bench.peer_v2d import exit_on_sigterm
from common.cli_types import existing_file, positive_int
from common.settings import SAMPLE_VIDEO
from devstack.tiny_depth_pro import save_full_size_depth_pro
from tasks.depth.depth_maps import estimate_depth
from tasks.depth.depth_torch import DepthEstimator
from tasks.depth.frame_choice import read_frames
from tasks.depth.settings import DepthSettings
from tasks.depth.video_record import VideoRecord


def frames_per_second(estimator: DepthEstimator, frames: list[np.ndarray], rounds: int) -> float:
    import torch

    estimator.estimate(frames[:1])  # warm-up: kernels, allocator
    rates = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for frame in frames:
            estimator.estimate([frame])
        torch.cuda.synchronize()
        rates.append(len(frames) / (time.perf_counter() - started))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--video", type=existing_file, default=SAMPLE_VIDEO, help="a video file")
    parser.add_argument("--frames", type=positive_int, default=8, help="frames per batch size")
    parser.add_argument("--rounds", type=positive_int, default=3, help="timed rounds")
    args = parser.parse_args(argv)
    exit_on_sigterm()  # so the random weights (~2.6 GB) go with the run on SIGTERM too

    import torch

    result: dict[str, Any] = {"benchmark": "depth_gpu", "cuda": torch.cuda.is_available()}
    if not result["cuda"]:
        print("no CUDA device here: nothing to measure", file=sys.stderr)
        print(json.dumps(result))
        return 0
    result["gpu"] = torch.cuda.get_device_name(0)
    # The full-size model's 2.6 GB of random weights go away with the run.
    with tempfile.TemporaryDirectory(prefix="vidflow-bench-depth-gpu-") as tmp:
        result.update(_measure(args, Path(tmp)))
    print(json.dumps(result))
    return 0


def _measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The figures, from a full-size random Depth Pro saved under `work`."""
    import torch

    result: dict[str, Any] = {}
    model = save_full_size_depth_pro(work / "depth-pro-random")

    # Real frames at the size the flow gives the model (360p after transcoding).
    capture = cv2.VideoCapture(str(args.video))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    indices = list(np.linspace(0, total - 1, args.frames).astype(int))
    frames = [
        cv2.resize(frame, (480, 360), interpolation=cv2.INTER_AREA)
        for frame in read_frames(args.video, indices).values()
    ]

    half = DepthEstimator(str(model), "cuda")
    result["half_dtype"] = str(half.dtype)
    result["fp16_fps"] = round(frames_per_second(half, frames, args.rounds), 2)
    result["untrained_label"] = half.untrained

    # The flow's own stage on the GPU: maps at the frame size, finite, labelled untrained.
    transcoded = work / "clip360.mp4"
    writer = cv2.VideoWriter(str(transcoded), cv2.VideoWriter_fourcc(*"mp4v"), 25, (480, 360))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    record = VideoRecord(video_id="gpu", source_url="x").update(
        transcoded_path=str(transcoded), frame_count=len(frames)
    )
    settings = DepthSettings(depth_model=str(model), frames="uniform:2", device="cuda")
    done = estimate_depth(record, work / "maps", settings, half)
    maps = list(np.load(done.depth_path)) if done.depth_path else []
    result["stage_status"] = done.status
    result["stage_map_shapes"] = [list(depth.shape) for depth in maps]
    result["stage_maps_finite"] = bool(all(np.isfinite(depth).all() for depth in maps))
    result["stage_untrained"] = done.depth_untrained
    del half
    torch.cuda.empty_cache()

    full = DepthEstimator(str(model), "cuda")
    full.model.float()
    full.dtype = torch.float32
    result["fp32_fps"] = round(frames_per_second(full, frames, args.rounds), 2)
    result["ratio_fp16_vs_fp32"] = round(result["fp16_fps"] / result["fp32_fps"], 3)
    result["params_millions"] = round(sum(p.numel() for p in full.model.parameters()) / 1e6, 1)
    return result


if __name__ == "__main__":
    sys.exit(main())
