"""The one retry backoff: exponential, capped, with jitter.

Used by the depth downloads and the stream's inference retries, so both spread their retries
the same way instead of hammering a recovering server in step.
"""

from __future__ import annotations

import random


def jittered_backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before retry `attempt` (0 first): `base_s` doubled per attempt, capped
    at `max_s`, then a random half to all of it (jitter, so failed callers do not retry
    together)."""
    step = min(max_s, base_s * 2 ** min(attempt, 30))  # the cap keeps 2**attempt finite
    return step * random.uniform(0.5, 1.0)
