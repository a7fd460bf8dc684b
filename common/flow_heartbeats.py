"""Prefect flow-run heartbeats for the flow runs the command line holds in the foreground."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# The names Prefect 3.8 reads the heartbeat interval from (the second one is its legacy alias).
HEARTBEAT_VARIABLES = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


@contextlib.contextmanager
def foreground_heartbeats() -> Iterator[None]:
    """Flow runs started here send no heartbeats, unless the user set their interval.

    Prefect sends a sync flow run's heartbeats (every 180 s by default: events an automation
    can watch to mark a run whose process died as crashed) from a thread that sleeps in 1 s
    steps, and joins that thread when the flow function returns: a finished `vidflow depth`
    waited 0-1 s more with every CPU idle (0.63 s in a probe), ~2 % of a 30-s run. A run
    started from a terminal is watched from there, and its end shows there; flow runs of
    deployments (started by a Prefect worker, not here) keep Prefect's default. Whoever sets
    the interval (the environment, the Prefect profile, `prefect.toml`, `.env` or
    `pyproject.toml`'s `[tool.prefect]`) keeps their heartbeats here too."""
    from prefect.context import get_settings_context
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    profile = get_settings_context().profile
    chosen = (
        any(name in os.environ for name in HEARTBEAT_VARIABLES)
        or any(setting.name in HEARTBEAT_VARIABLES for setting in profile.settings)
        # the files Prefect reads it from too (a `prefect.toml` was passed over)
        or "heartbeat_frequency" in get_current_settings().flows.model_fields_set
    )
    if chosen:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
