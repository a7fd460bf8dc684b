"""Flow runs started from the command line: no heartbeats unless the user set their interval."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.flow_heartbeats import HEARTBEAT_VARIABLES, foreground_heartbeats
from devstack.launcher import REPO_ROOT


def _heartbeat_interval() -> int | None:
    from prefect.settings import get_current_settings

    return get_current_settings().flows.heartbeat_frequency


def test_a_flow_run_started_here_sends_no_heartbeats(
    prefect_api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow run itself (a real one, on the test API) sees no heartbeat interval, so
    Prefect's engine starts no heartbeat thread to join when the flow returns."""
    from prefect import flow

    for name in HEARTBEAT_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    @flow
    def interval_seen_by_the_run() -> int | None:
        return _heartbeat_interval()

    assert interval_seen_by_the_run() is not None  # Prefect's default: heartbeats on
    with foreground_heartbeats():
        assert interval_seen_by_the_run() is None
    assert _heartbeat_interval() is not None  # only inside


@pytest.mark.parametrize("name", HEARTBEAT_VARIABLES)
def test_an_interval_the_user_set_is_kept(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import temporary_settings

    monkeypatch.setenv(name, "60")
    # temporary_settings() reads the settings again, with the variable set
    with temporary_settings(), foreground_heartbeats():
        assert _heartbeat_interval() == 60


def test_an_interval_set_in_the_prefect_profile_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.context import use_profile
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, Profile

    for name in HEARTBEAT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    profile = Profile(name="heartbeats-chosen", settings={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60})
    with use_profile(profile, include_current_context=True), foreground_heartbeats():
        assert _heartbeat_interval() == 60


def test_an_interval_set_in_a_prefect_toml_is_kept(tmp_path) -> None:
    """Prefect reads settings from `prefect.toml` (and `.env`, `pyproject.toml`) in the working
    folder too: an interval set there was turned off (found in review, stop 59)."""
    (tmp_path / "prefect.toml").write_text("[flows]\nheartbeat_frequency = 90\n")
    script = (
        "from common.flow_heartbeats import foreground_heartbeats\n"
        "from prefect.settings import get_current_settings\n"
        "with foreground_heartbeats():\n"
        "    print(get_current_settings().flows.heartbeat_frequency)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in HEARTBEAT_VARIABLES}
    env["PYTHONPATH"] = str(REPO_ROOT)
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "90", run.stdout
