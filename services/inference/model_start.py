"""Getting the model ready to serve: load it, warm it up and decide whether batching pays.

All of it runs off the event loop, so health checks and readiness probes answer meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import numpy as np

from services.inference.batcher import choose_batch_size
from services.inference.loader import ServedModel, load_served_model
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)


async def load_warm_model(settings: InferenceSettings) -> tuple[ServedModel, int]:
    """The loaded, warmed-up model and the largest batch worth making with it.

    The batch size is 1 when --batching finds that batches do not pay on this device.
    """
    loop = asyncio.get_running_loop()
    model = await loop.run_in_executor(None, load_served_model, settings)
    shape = model.preprocess.input_shape
    # First calls allocate; keep them out of requests' time.
    sizes = sorted({1, settings.max_batch_size})
    zeros = {size: np.zeros((size, *shape), np.float32) for size in sizes}
    await loop.run_in_executor(None, model.backend.warm_up, list(zeros.values()))
    choice = await loop.run_in_executor(
        None,
        functools.partial(
            choose_batch_size,
            settings.batching,
            settings.max_batch_size,
            lambda size: model.backend.run(zeros[size]),
            callers=model.workers,
            min_speedup=settings.batching_min_speedup,
        ),
    )
    log.info("%s", choice.reason)
    return model, choice.max_batch_size
