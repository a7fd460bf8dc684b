"""The depth flow's task runner: prefect-ray's, on an existing cluster (RAY_ADDRESS, or one
`ray start` runs on this machine), else on a private local instance that listens on 127.0.0.1
only (flows/ray_start.py), or on the Ray the CLI started before the flow.

Which one is decided when the task runner starts, not when it is built, so building it (as the
flow's decorator does at import) reads and writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Self

from prefect_ray import RayTaskRunner

from common.processes import ignore_lance_fork_warning
from flows.ray_start import join_failure, run_ray
from flows.ray_submit_context import SerializedSettings
from flows.ray_worker_context import worker_context

log = logging.getLogger(__name__)


class ClusterOrLocalRayTaskRunner(RayTaskRunner):
    """prefect-ray's runner that picks its Ray when it starts: a running cluster
    (`cluster_address`), else a private local Ray (`num_cpus` CPUs, default all) that listens on
    127.0.0.1 only."""

    def __init__(self, num_cpus: int | None = None) -> None:
        super().__init__()
        self.num_cpus = num_cpus
        self._ray_start = contextlib.ExitStack()
        self._serialized_settings = SerializedSettings()

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        """prefect-ray's `submit`, with the settings serialized once for all the flow's task
        runs instead of once for each (flows/ray_submit_context.py)."""
        with self._serialized_settings.in_context():
            return super().submit(*args, **kwargs)

    @staticmethod
    def _run_prefect_task(
        *upstream_ray_obj_refs: Any, context: dict[str, Any], **kwargs: Any
    ) -> Any:
        """prefect-ray's remote function (run in a Ray worker for each task run), with the
        settings and API client the worker keeps between runs (flows/ray_worker_context.py)."""
        with worker_context(context) as kept_context:
            return RayTaskRunner._run_prefect_task(
                *upstream_ray_obj_refs, context=kept_context, **kwargs
            )

    def cpus_to_start(self) -> int | None:
        """CPUs of a private Ray: this runner's, else VIDFLOW_DEPTH_RAY_NUM_CPUS. A deployment
        run's flow parameters come too late for this (Ray starts before the flow reads them),
        so there the worker's environment says it."""
        if self.num_cpus is not None:
            return self.num_cpus
        from tasks.depth.settings import DepthSettings

        return DepthSettings().ray_num_cpus

    def duplicate(self) -> Self:
        """A runner of the same settings (Prefect starts a copy for each flow run)."""
        return type(self)(num_cpus=self.num_cpus)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClusterOrLocalRayTaskRunner) and self.num_cpus == other.num_cpus

    def __enter__(self) -> Self:
        try:
            return self._start()
        except Exception as exc:  # a bad address, a refused token, a private Ray that failed
            fail_deployment_run(exc)
            raise

    def _start(self) -> Self:
        import ray

        ignore_lance_fork_warning()
        self.address, self.init_kwargs, hold = run_ray(self.cpus_to_start())
        if self.address and not os.environ.get("RAY_ADDRESS"):
            self.logger.info(
                "Joining the Ray cluster that `ray start` runs on this machine (%s); "
                "RAY_ADDRESS=local runs a private Ray instead",
                self.address,
            )
        if self.address or not ray.is_initialized():  # a running private Ray is used as it is
            self._ray_start.enter_context(hold)
        # `ray.init` puts its own SIGTERM handler (sys.exit) in place of Prefect's, which a
        # cancelled deployment run's SIGTERM must reach: it ended Crashed, not Cancelled.
        prefect_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            super().__enter__()
        except BaseException as exc:
            self._ray_start.close()
            if isinstance(exc, ConnectionError) and self.address:
                raise join_failure(exc, self.address) from exc
            raise
        finally:
            main = threading.current_thread() is threading.main_thread()  # where handlers live
            if main and prefect_sigterm is not None:
                signal.signal(signal.SIGTERM, prefect_sigterm)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            self._ray_start.close()


def fail_deployment_run(reason: BaseException) -> None:
    """Set a deployment's flow run Failed with why its Ray did not start.

    Prefect sets no state for a flow run whose task runner does not start (its engine logs
    "Finished in state Running()"), and the worker then marked the run Crashed with "Process
    exited with status code: 1", the reason only in the log. A worker gives its run's id in
    PREFECT__FLOW_RUN_ID; a flow called in a process of its own has none (`vidflow depth` joins
    a cluster before its flow run exists)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Failed

    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not flow_run_id or FlowRunContext.get() is not None:  # a subflow: the id is its parent's
        return
    message = f"Ray did not start for this run: {reason}"
    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Failed(message=message))  # as the rules allow
    except Exception as exc:  # the reason still reaches the log, with the error raised
        log.warning("could not set the flow run Failed: %s", exc)


def ray_task_runner(num_cpus: int | None = None) -> RayTaskRunner:
    """The depth flow's task runner: a running cluster when it starts (`cluster_address`), else
    a local Ray instance on 127.0.0.1 with `num_cpus` CPUs."""
    return ClusterOrLocalRayTaskRunner(num_cpus)


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this flow runs on (Ray is up once the flow body runs)."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1


def cluster_gpus() -> int:
    """GPUs of the whole Ray cluster (0 without Ray)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


def largest_node(resource: str) -> float:
    """The most of `resource` ("CPU", "GPU") one live node of the cluster has: a task or actor
    that asks for more waits for ever (no limit known without Ray)."""
    import ray

    if not ray.is_initialized():
        return float("inf")
    alive = [node["Resources"].get(resource, 0.0) for node in ray.nodes() if node["Alive"]]
    return max(alive, default=0.0)


def nodes_elsewhere() -> list[str]:
    """Addresses of the cluster's live nodes that are not this machine (none without Ray)."""
    import psutil
    import ray

    if not ray.is_initialized():
        return []
    here = {
        address.address for addresses in psutil.net_if_addrs().values() for address in addresses
    }
    return sorted(
        node["NodeManagerAddress"]
        for node in ray.nodes()
        if node["Alive"] and node["NodeManagerAddress"] not in here
    )
