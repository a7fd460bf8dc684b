"""What a Ray worker keeps between the Prefect task runs it executes: their settings, built once,
and one API client.

prefect-ray runs each task run in a Ray worker through `hydrated_context`, which for every run
rebuilds Prefect's settings from their serialized form (~40-75 ms of CPU: pydantic-settings
validation and the environment and TOML sources) and, with no client in context, it and the
task engine each build a new `SyncPrefectClient`: two TLS contexts loaded from the CA bundle
(~35 ms each, even for an http:// API), a new connection and a version check. On 2 cores that
was ~1.5 CPU-s per worker over 8 task runs (a worker's CPU at its last run of a 16-run flow:
~7.0 s, ~5.45 s with both kept; docs/benchmarks.md). Prefect takes
settings that are already built as they are, and reuses the client of a `SyncClientContext` in
context, so the worker keeps both per distinct settings. prefect-ray has no hook for this; the
runner's remote function is wrapped instead (flows/ray_runner.py).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Kept:
    """Built from one serialized settings context: the settings context's fields, as objects,
    and an entered client context for its API."""

    settings_fields: dict[str, Any]
    client_context: Any


# The serialized settings context -> what was built from it, in this process.
_kept: dict[str, _Kept] = {}
_kept_lock = threading.Lock()


@contextlib.contextmanager
def worker_context(serialized_context: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """While one task run executes in this worker: yields its serialized context with the
    settings replaced by this worker's built copy, and puts the worker's client for them in
    context. The first run with given settings builds both; the next ones reuse them."""
    from prefect.context import SyncClientContext

    settings_context = serialized_context.get("settings_context")
    if not settings_context:  # nothing to build from: Prefect does as it always does
        yield serialized_context
        return
    kept = _kept_for(settings_context)
    token = SyncClientContext.__var__.set(kept.client_context)
    try:
        yield {**serialized_context, "settings_context": kept.settings_fields}
    finally:
        SyncClientContext.__var__.reset(token)


def _kept_for(settings_context: dict[str, Any]) -> _Kept:
    from prefect.context import SettingsContext, SyncClientContext

    key = json.dumps(settings_context, sort_keys=True, default=str)
    with _kept_lock:
        if (kept := _kept.get(key)) is None:
            built = SettingsContext(**settings_context)
            with built:  # the client is made for these settings' API
                client_context = SyncClientContext()
                # Entered once for the process: opens the client and checks the API version.
                # The context variable it sets is reset at once, and set for each run instead.
                client_context.__enter__()
                SyncClientContext.__var__.reset(client_context._token)
                client_context._token = None
            kept = _Kept({"profile": built.profile, "settings": built.settings}, client_context)
            _kept[key] = kept
    return kept
