"""The work of one batch: decode, preprocess and classify its images on a model worker's thread.

Decoding here, right before the model call, spares each request a hop through a thread pool on
arrival; with a worker per core, each decodes its own batch while the other runs the model
(docs/benchmarks.md). A bad image fails only its own entry of the batch.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from services.inference.loader import ServedModel
from services.inference.preprocess import InvalidImageError, decode_image, preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """One image after decoding: the model input, or why there is none."""

    tensor: np.ndarray | None
    # InvalidImageError for bad input; any other exception is the server's fault, of this item.
    error: Exception | None
    decode_s: float
    preprocess_s: float


@dataclass(frozen=True)
class Outcome:
    """One image's result from a batch: class probabilities, or why there are none."""

    probabilities: np.ndarray | None
    error: Exception | None
    decode_s: float
    preprocess_s: float
    inference_s: float


def prepare_image(image: bytes, model: ServedModel, max_image_pixels: int) -> Prepared:
    """Decode and preprocess one image; a failure is this image's alone, never its batch's."""
    started = decoded = time.perf_counter()
    try:
        rgb = decode_image(image, max_image_pixels)
        decoded = time.perf_counter()
        tensor = preprocess(rgb, model.preprocess)
    except InvalidImageError as exc:
        return Prepared(None, exc, time.perf_counter() - started, 0.0)
    except Exception as exc:  # e.g. cv2.error: a bug or an exhausted server, not bad input
        log.exception("decoding or preprocessing one image of a batch failed")
        return Prepared(None, exc, decoded - started, time.perf_counter() - decoded)
    return Prepared(tensor, None, decoded - started, time.perf_counter() - decoded)


def run_batch(
    model: ServedModel,
    images: list[bytes],
    max_image_pixels: int,
    pool: ThreadPoolExecutor | None = None,
) -> list[Outcome]:
    """Each image's outcome, in order; `pool` (--preprocess-threads) decodes images in parallel."""
    if pool is None or len(images) == 1:
        prepared = [prepare_image(image, model, max_image_pixels) for image in images]
    else:
        prepared = list(
            pool.map(lambda image: prepare_image(image, model, max_image_pixels), images)
        )
    valid = [p.tensor for p in prepared if p.tensor is not None]
    started = time.perf_counter()
    batch = valid[0][np.newaxis] if len(valid) == 1 else np.stack(valid) if valid else None
    rows = model.backend.run(batch) if batch is not None else []
    inference_s = time.perf_counter() - started
    if len(rows) != len(valid):  # a model of an unusual output shape: its callers hear why
        raise RuntimeError(f"the model returned {len(rows)} results for a batch of {len(valid)}")
    probabilities = iter(rows)
    return [
        Outcome(
            next(probabilities) if p.tensor is not None else None,
            p.error,
            p.decode_s,
            p.preprocess_s,
            inference_s if p.tensor is not None else 0.0,
        )
        for p in prepared
    ]
