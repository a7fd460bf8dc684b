"""Task runs on Ray share their worker's built Prefect settings and API client
(flows/ray_worker_context.py), the driver serializes the settings once for all its task runs
(flows/ray_submit_context.py), and the runs still report to the flow's API with the flow's
settings: a real private Ray, a real Prefect API."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from prefect import flow, get_client, task
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.context import SettingsContext
from prefect.runtime import flow_run
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_CLIENT_MAX_RETRIES,
    get_current_settings,
    temporary_settings,
)

from flows.ray_runner import ray_task_runner

RUNS = 4
# What each task run got, kept alive in its worker: a client or settings object freed after one
# run could hand its id to the next run's new one, and a broken cache would look like one object.
SEEN_IN_THIS_WORKER: list[object] = []


@task
def client_in_use() -> tuple[int, int, str, int]:
    """This worker's pid; which client a task run gets from Prefect, for which API; and which
    settings object it runs with."""
    client, settings = get_client(sync_client=True), get_current_settings()
    SEEN_IN_THIS_WORKER.extend((client, settings))
    return os.getpid(), id(client), str(client.api_url), id(settings)


@flow(task_runner=ray_task_runner(num_cpus=1))
def runs_on_one_cpu() -> tuple[str, list[tuple[int, int, str, int]]]:
    futures = [client_in_use.submit() for _ in range(RUNS)]
    return str(flow_run.id), [future.result() for future in futures]


@pytest.mark.usefixtures("prefect_api")
def test_task_runs_in_a_worker_share_one_client_of_the_flows_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "local")
    flow_run_id, seen = runs_on_one_cpu()
    pids = {pid for pid, *_ in seen}
    clients = {(pid, client) for pid, client, _, _ in seen}
    settings = {(pid, settings) for pid, _, _, settings in seen}
    # One CPU: the runs follow each other in fewer workers than runs, one client and one
    # settings object per worker.
    assert len(pids) < RUNS, seen
    assert len(clients) == len(pids), seen
    assert len(settings) == len(pids), seen
    assert {api_url for _, _, api_url, _ in seen} == {PREFECT_API_URL.value().rstrip("/") + "/"}
    # Task runs reach the API as events, which its recorder writes a moment later: a read
    # at once after the flow ended found none on a loaded machine.
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        done = [run for run in task_runs if run.state is not None and run.state.is_completed()]
        if len(done) >= RUNS or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert len(task_runs) == RUNS and len(done) == RUNS, task_runs


@task
def client_retries() -> int:
    """A setting as the task run sees it."""
    return get_current_settings().client.max_retries


@flow(task_runner=ray_task_runner(num_cpus=1))
def runs_under_two_settings() -> tuple[list[int], list[int]]:
    before = [client_retries.submit() for _ in range(3)]
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 7}):
        during = [client_retries.submit() for _ in range(3)]
    return [future.result() for future in before], [future.result() for future in during]


@pytest.mark.usefixtures("prefect_api")
def test_the_driver_serializes_each_settings_context_once_and_task_runs_get_its_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "local")
    dumps: list[int] = []
    serialize = SettingsContext.serialize

    def counted(self: SettingsContext, include_secrets: bool = True) -> dict[str, Any]:
        dumps.append(id(self))
        return serialize(self, include_secrets=include_secrets)

    monkeypatch.setattr(SettingsContext, "serialize", counted)
    default_retries = PREFECT_CLIENT_MAX_RETRIES.value()
    assert default_retries != 7
    before, during = runs_under_two_settings()
    assert before == [default_retries] * 3
    assert during == [7] * 3  # a settings context entered mid-flow reaches its task runs
    # Six task runs, two settings contexts: one dump each (prefect-ray alone makes six).
    assert len(dumps) == 2, dumps
