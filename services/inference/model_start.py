"""Getting the model ready to serve: load it, warm it up and decide whether batching pays.

All of it runs off the event loop, so health checks and readiness probes answer meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from services.inference.batcher import BatchingChoice, choose_batch_size
from services.inference.batching_memo import choice_key, recalled_choice, remember_choice
from services.inference.loader import ServedModel, load_served_model
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)

ResultT = TypeVar("ResultT")


async def off_the_loop(work: Callable[[], ResultT]) -> ResultT:
    """`work()` on a daemon thread of its own, awaited.

    Not on asyncio's default executor: `asyncio.run` waits for that executor's threads before
    it returns, so a SIGTERM during a first start's ONNX export or a weights download (minutes)
    would wait for it; nothing is served yet, so a stop need not.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[ResultT] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not done.done():  # else cancelled: the server stopped meanwhile
            setter(value)

    def run() -> None:
        try:
            outcome = (done.set_result, work())
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome = (done.set_exception, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="model-load", daemon=True).start()
    return await done


async def load_warm_model(settings: InferenceSettings) -> tuple[ServedModel, int]:
    """The loaded, warmed-up model and the largest batch worth making with it.

    The batch size is 1 when --batching finds that batches do not pay on this device.
    """
    model = await off_the_loop(functools.partial(load_served_model, settings))
    shape = model.preprocess.input_shape
    # First calls allocate; keep them out of requests' time.
    sizes = sorted({1, settings.max_batch_size})
    zeros = {size: np.zeros((size, *shape), np.float32) for size in sizes}
    await off_the_loop(functools.partial(model.backend.warm_up, list(zeros.values())))
    await off_the_loop(functools.partial(check_class_count, model, zeros[1]))
    measure = functools.partial(
        choose_batch_size,
        settings.batching,
        settings.max_batch_size,
        lambda size: model.backend.run(zeros[size]),
        callers=model.workers,
        min_speedup=settings.batching_min_speedup,
    )
    choice = await off_the_loop(functools.partial(_recalled_or_measured, model, settings, measure))
    log.info("%s", choice.reason)
    return model, choice.max_batch_size


def check_class_count(model: ServedModel, batch: np.ndarray) -> None:
    """Raise ValueError unless the model gives one score per class name: a file whose metadata
    names fewer classes than it scores (a 1001-class model with the 1000 ImageNet names)
    served, and every call whose top-k held an unnamed index failed with INTERNAL."""
    scores = model.backend.run(batch)
    if scores.ndim != 2 or scores.shape[1] != len(model.class_names):
        raise ValueError(
            f"{model.name} gives scores of shape {tuple(scores.shape)} for a batch of "
            f"{len(batch)}, and names {len(model.class_names)} classes: a label for each "
            "score is needed"
        )


def _recalled_or_measured(
    model: ServedModel, settings: InferenceSettings, measure: Callable[[], BatchingChoice]
) -> BatchingChoice:
    """`--batching auto`'s verdict as kept for this model and machine, or measured and kept
    (batching_memo); `on` and `off` measure nothing."""
    if settings.batching != "auto" or settings.max_batch_size == 1:
        return measure()
    key = choice_key(
        model=model.name, weights=model.weights_sha256, backend=model.backend.name,
        device=model.backend.device, workers=model.workers, threads=settings.inference_threads,
        max_batch_size=settings.max_batch_size, min_speedup=settings.batching_min_speedup,
        onnx_file=_file_identity(settings.onnx_model),
    )  # fmt: skip
    choice = recalled_choice(settings.cache_dir, key, settings.batching_min_speedup)
    if choice is None or choice.max_batch_size not in (1, settings.max_batch_size):
        choice = measure()
        remember_choice(settings.cache_dir, key, choice)
    return choice


def _file_identity(path: Path | None) -> list[object] | None:
    """A served ONNX file's path, size and modification time: another export of the same
    weights (another opset, fp16) under the same name is another model to measure."""
    if path is None:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return [str(path)]
    return [str(path), stat.st_size, stat.st_mtime_ns]
