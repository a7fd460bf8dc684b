"""Task runs on Ray share their worker's built Prefect settings and API client
(flows/ray_worker_context.py) and still report to the flow's API: a real private Ray, a real
Prefect API."""

from __future__ import annotations

import os

import pytest
from prefect import flow, get_client, task
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, get_current_settings

from flows.ray_runner import ray_task_runner

RUNS = 4


@task
def client_in_use() -> tuple[int, int, str, int]:
    """This worker's pid; which client a task run gets from Prefect, for which API; and which
    settings object it runs with."""
    client = get_client(sync_client=True)
    return os.getpid(), id(client), str(client.api_url), id(get_current_settings())


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
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert len(task_runs) == RUNS
    assert all(run.state is not None and run.state.is_completed() for run in task_runs)
