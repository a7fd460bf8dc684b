"""A Prefect API for flows started from the command line.

Ray workers report task runs to the Prefect API. Without one configured, every worker would
start its own temporary server (slow and flaky), so the CLI starts one temporary server for the
whole run instead: the workers of a private Ray inherit its address through the environment,
a cluster's workers take it from the settings each task carries.

That server wants a login of its own, a random one made for the run: it binds loopback, where
any local account could otherwise read the run's records and create flow runs on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from unittest import mock

from common.net import reach_loopback_directly
from common.processes import die_with_parent
from common.urls import shown_url

log = logging.getLogger(__name__)


class PrefectApiError(RuntimeError):
    """The configured Prefect API refuses this client or cannot be reached."""


def check_configured_api() -> None:
    """PrefectApiError where PREFECT_API_URL is set but its API refuses this client (a login
    or key wrong or expired) or cannot be reached: found at the flow's first call, it ended the
    command in a traceback, exit 1, read as "videos failed". Nothing to check without one (the
    command starts its own server)."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if not (url := PREFECT_API_URL.value()):
        return
    try:
        with get_client(sync_client=True) as client:
            client.read_flows(limit=1)  # a call that wants the login, where one is wanted
    except httpx.HTTPStatusError as exc:
        status = exc.response.status_code
        hint = " (PREFECT_API_AUTH_STRING or PREFECT_API_KEY)" if status in (401, 403) else ""
        raise PrefectApiError(
            f"the Prefect API at {shown_url(url)} refused this client: {status} "
            f"{exc.response.reason_phrase}{hint}"
        ) from None
    except httpx.HTTPError as exc:
        raise PrefectApiError(
            f"the Prefect API at {shown_url(url)} cannot be reached: {type(exc).__name__}: {exc}"
        ) from None


@contextmanager
def prefect_api(startup_timeout_s: int = 120) -> Iterator[str]:
    """Use PREFECT_API_URL when set; otherwise run a temporary local server until exit, behind
    basic auth with a login made for this run (this process and its Ray workers send it)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    if configured := PREFECT_API_URL.value():
        yield configured
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    reach_loopback_directly()  # the server, for this process and the Ray workers it starts
    auth = f"vidflow:{secrets.token_urlsafe(24)}"
    server = _server_dying_with_us(auth)
    server.start(timeout=startup_timeout_s)
    log.info(
        "no PREFECT_API_URL set: started a temporary Prefect server at %s for this run, with "
        "a login of its own (runs are kept in the local Prefect database; `prefect server "
        "start` shows them)",
        server.api_url,
    )
    # Ray workers started from here take both from the environment.
    run_env = {"PREFECT_API_URL": server.api_url, "PREFECT_API_AUTH_STRING": auth}
    before = {name: os.environ.get(name) for name in run_env}
    os.environ.update(run_env)
    started = datetime.now(UTC)
    try:
        updates = {PREFECT_API_URL: server.api_url, PREFECT_API_AUTH_STRING: auth}
        with temporary_settings(updates=updates):
            try:
                yield server.api_url
            finally:  # a failed run too: its last lines would be retried at exit for ~70 s
                _drain_to_api()
                _say_where_the_runs_stay(started)
    finally:
        for name, value in before.items():  # as the caller had them
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def _server_dying_with_us(auth: str) -> Any:
    """Prefect's temporary server, wanting `auth` (basic auth, user:password), made to die
    with this process even when it is killed with SIGKILL (else the server would be left
    running, holding its port and database)."""
    from prefect.server.api import server as server_module

    class ChildServer(server_module.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect builds the server's command line; only the Popen call is ours to extend.
            popen = subprocess.Popen

            def dying_with_parent(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
                # The server alone gets the login to check; clients get it in their settings.
                env = {**kwargs.pop("env"), "PREFECT_SERVER_API_AUTH_STRING": auth}
                # A session of its own: a terminal's Ctrl-C (SIGINT to the whole group) ended
                # the server first, and the run then retried recording its end against it for
                # minutes. It still dies with this process, and is stopped by it.
                return popen(
                    *args, preexec_fn=die_with_parent, env=env, start_new_session=True, **kwargs
                )

            with mock.patch.object(server_module.subprocess, "Popen", dying_with_parent):
                return super()._run_uvicorn_command()

    return ChildServer()


def _say_where_the_runs_stay(since: datetime) -> None:
    """Where to find this command's flow runs once the temporary server is gone: its "View at"
    links die with it, and `prefect server start` serves the same database at another port."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
        FlowRunFilterStartTime,
    )
    from prefect.settings import get_current_settings

    top_level_since = FlowRunFilter(
        start_time=FlowRunFilterStartTime(after_=since),
        parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True),
    )
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=top_level_since, limit=10)
    except Exception as exc:  # only a pointer for the user: never fail the command for it
        log.debug("could not list this command's flow runs: %s", exc)
        return
    ui = get_current_settings().server.api
    for run in runs:
        log.info(
            "flow run '%s' stays in the local Prefect database: after `prefect server start`, "
            "http://%s:%d/runs/flow-run/%s",
            run.name, ui.host, ui.port, run.id,
        )  # fmt: skip


def _drain_to_api() -> None:
    """Send the logs and events still queued, while the server is up (else they are retried
    against a stopped server for minutes at exit); the same as prefect_test_harness does."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(RuntimeError):  # no log was sent, so the worker never started
        APILogWorker.instance().drain()
    EventsWorker.drain_all()
