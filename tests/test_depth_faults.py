"""Faults of the depth pipeline's surroundings, made for real: a local Ray reachable from the
network, a server that drips bytes, a reordered re-run."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.depth_extraction import RAY_CLUSTER_ENV

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter, so no Ray state of the test process is involved: the flow's own
# runner starts a local Ray, a task and an actor run, and every process of the Ray session
# reports its listening TCP sockets.
RAY_LISTENERS = textwrap.dedent(
    """
    import json, os
    from flows.depth_extraction import RAY_CLUSTER_ENV, ray_task_runner
    import ray
    import psutil  # Ray's own copy, on sys.path once ray is imported

    with ray_task_runner(1):
        @ray.remote
        def pid() -> int:
            return os.getpid()

        @ray.remote
        class Holder:
            def pid(self) -> int:
                return os.getpid()

        holder = Holder.remote()
        ran = [ray.get(pid.remote()), ray.get(holder.pid.remote())]
        session = ray._private.worker._global_node.get_session_dir_path()
        processes = {p.pid: p for p in psutil.Process().children(recursive=True)}
        for p in psutil.process_iter(["cmdline"]):
            command = " ".join(p.info["cmdline"] or [])
            if session in command or command.startswith("ray::"):
                processes.setdefault(p.pid, p)
        listening = []
        for p in processes.values():
            try:
                for c in p.net_connections(kind="tcp"):
                    if c.status == psutil.CONN_LISTEN:
                        listening.append([p.name(), c.laddr.ip, c.laddr.port])
            except psutil.Error:
                pass
    print(json.dumps({"ran": ran, "listening": listening,
                      "env_after": os.environ.get(RAY_CLUSTER_ENV)}))
    """
)


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.mark.faults
@pytest.mark.slow
def test_the_local_ray_of_a_run_listens_on_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", RAY_CLUSTER_ENV)}
    env["RAY_AUTH_MODE"] = "disabled"
    done = subprocess.run(
        [sys.executable, "-c", RAY_LISTENERS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["ran"]) == 2
    listening = report["listening"]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the check sees Ray's servers
    exposed = [entry for entry in listening if not _loopback(entry[1])]
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
    assert report["env_after"] is None  # the process is left as it was
