"""Which frames of a video get a depth map (`--frames`), and reading them one at a time."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from common.frames import opened_video
from tasks.depth.settings import check_frames_spec

_UNIFORM = re.compile(r"uniform:(\d+)")


def frame_indices(spec: str, frame_count: int) -> list[int]:
    """Which frames represent a video: the first, the middle, N spread evenly (centres of N
    equal segments, so uniform:1 is the middle frame), or all of them."""
    check_frames_spec(spec)
    if frame_count <= 0:
        return []
    if spec == "first":
        return [0]
    if spec == "middle":
        return [frame_count // 2]
    if spec == "all":
        return list(range(frame_count))
    wanted = min(int(spec.split(":")[1]), frame_count)
    return sorted({int((i + 0.5) * frame_count / wanted) for i in range(wanted)})


def iter_frames(path: Path, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """The given frames as RGB arrays, one at a time and in order, so a whole video is never
    in memory (read in order: seeking is not frame-exact in every codec, and 360p decodes
    fast; frames past the last wanted one are not decoded)."""
    wanted = set(indices)
    last = max(indices, default=-1)
    with opened_video(path) as capture:
        index = 0
        while index <= last and capture.grab():  # a capture that did not open grabs nothing
            if index in wanted:
                ok, bgr = capture.retrieve()
                if ok:
                    yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1


def read_frames(path: Path, indices: list[int]) -> dict[int, np.ndarray]:
    """The given frames as RGB arrays (for a handful of frames; see `iter_frames`)."""
    return dict(iter_frames(path, indices))
