"""Heavy imports with Python's cyclic garbage collector paused, and what they built frozen."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """Run the block (a process's imports of Prefect, Ray, Lance and the flow's tasks) with the
    cyclic collector paused, then move every object it left to the collector's permanent
    generation (`gc.freeze`), and restore the collector as it was.

    Why: importing Prefect and the depth tasks builds ~260,000 long-lived objects (pydantic
    models, settings, schemas), and the collector walks them again and again while they are
    being built: the same imports took 1.08-1.17 CPU-s with it paused against 1.21-1.41 with it
    running in a Ray task worker, 0.78-0.79 against 0.90-0.93 in the driver. Frozen, they are
    also skipped by every later full collection (~50 ms each over them). The cost: the few
    thousand objects the imports dropped in reference cycles (5,593 here) stay allocated, as
    they would in a process that forks after `gc.freeze` (the pattern the gc module documents;
    Ray Serve's replicas and proxies freeze what they built at start-up for the same reason).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
