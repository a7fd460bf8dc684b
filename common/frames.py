"""Reading frames from videos and images and encoding them as JPEG, with OpenCV."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def encode_jpeg(bgr: np.ndarray, quality: int = 90) -> bytes:
    """JPEG-encode a BGR frame as OpenCV reads it."""
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("OpenCV could not JPEG-encode the frame")
    return buffer.tobytes()


@contextlib.contextmanager
def opened_video(source: str | Path | int) -> Iterator[cv2.VideoCapture]:
    """An OpenCV capture of a file, URL or camera index, released when the block ends (a
    capture holds a decoder, threads and a file handle until `release`). Whether it opened is
    the caller's to check (`isOpened()`): some callers report it, others raise."""
    capture = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    try:
        yield capture
    finally:
        capture.release()


def iter_video_frames(path: Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield BGR frames of a video file in order."""
    with opened_video(path) as capture:
        if not capture.isOpened():
            raise ValueError(f"cannot open video {path}")
        count = 0
        while max_frames is None or count < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            count += 1
            yield frame


def load_encoded_images(path: Path, max_frames: int = 64) -> list[bytes]:
    """Encoded images from an image file, a folder of images, or frames of a video file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no .jpg/.jpeg/.png files in {path}")
        return [p.read_bytes() for p in files]
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [path.read_bytes()]
    frames = [encode_jpeg(frame) for frame in iter_video_frames(path, max_frames)]
    if not frames:
        raise ValueError(f"no frames could be read from {path}")
    return frames
