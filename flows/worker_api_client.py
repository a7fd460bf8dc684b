"""One Prefect API client per Ray worker process, shared by the task runs it executes.

prefect-ray runs each task run in a Ray worker through `hydrated_context`, and with no client in
context both it and the task engine build a new `SyncPrefectClient`: two TLS contexts loaded
from the CA bundle (~35 ms of CPU each, even for an http:// API), a new connection and a version
check, for every task run (~1.5 CPU-s of a 48-clip run on 2 cores; docs/benchmarks.md). Prefect
reuses the client of a `SyncClientContext` in context, so the worker keeps one per API it talks
to and puts it in context for each run. prefect-ray has no hook for this; the runner's remote
function is wrapped instead (flows/ray_runner.py).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

# The API settings a client was made for -> its entered client context, for this process.
_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


@contextlib.contextmanager
def worker_api_client(serialized_context: dict[str, Any]) -> Iterator[None]:
    """While one task run executes in this worker: a client for the API in the run's settings,
    made by the first run that needs it and kept for the next ones."""
    from prefect.context import SettingsContext, SyncClientContext

    settings_context = serialized_context.get("settings_context") or {}
    api_settings = (settings_context.get("settings") or {}).get("api")
    if not api_settings:  # no settings to build a client from: Prefect makes its own
        yield
        return
    key = json.dumps(api_settings, sort_keys=True, default=str)
    with _clients_lock:
        client_context = _clients.get(key)
        if client_context is None:
            with SettingsContext(**settings_context):
                client_context = SyncClientContext()
                # Entered once for the process: opens the client and checks the API version;
                # the context variable it sets is reset at once, and set per run below.
                client_context.__enter__()
                SyncClientContext.__var__.reset(client_context._token)
                client_context._token = None
            _clients[key] = client_context
    token = SyncClientContext.__var__.set(client_context)
    try:
        yield
    finally:
        SyncClientContext.__var__.reset(token)
