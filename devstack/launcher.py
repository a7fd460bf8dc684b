"""Starts `vidflow serve` as a child process on free local ports (tests, benchmarks, demo)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.net import free_port
from common.processes import batch_child, stop_process
from devstack.processes import listens_on
from services.inference.client import ServerExitedError, wait_until_serving

REPO_ROOT = Path(__file__).resolve().parent.parent  # devstack/launcher.py: the checkout


@dataclass
class ServerProcess:
    """A `vidflow serve` subprocess and where to reach it."""

    process: subprocess.Popen[bytes]
    port: int
    http_port: int
    log_path: Path
    args: list[str] = field(default_factory=list)
    tls_ca: Path | None = None  # the CA to trust when the server was started with TLS

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_serving(self, timeout_s: float = 180.0) -> None:
        """Until the server is SERVING; at once, with its log, if it exits first. Its own
        listener first: the port was free when picked, and a server started elsewhere meanwhile
        that took it answered SERVING for this one."""
        deadline = time.monotonic() + timeout_s
        try:
            while not listens_on(self.process.pid, self.port):
                if self.process.poll() is not None:
                    raise ServerExitedError(
                        f"{self.target} will never serve: its process exited "
                        f"({self.process.returncode})"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server never listened on {self.target}")
                time.sleep(0.1)
            wait_until_serving(
                self.target,
                max(0.0, deadline - time.monotonic()),
                self.tls_ca,
                exited=lambda: self.process.poll() is not None,
            )
        except (TimeoutError, ServerExitedError) as exc:
            raise type(exc)(f"{exc}\n--- server log ---\n{self.log()}") from None

    def terminate(self, timeout_s: float = 60.0) -> int:
        return stop_process(self.process, timeout_s)


def start_server(
    tmp_dir: Path,
    cache_dir: Path,
    *extra_args: str,
    port: int = 0,
    http_port: int = 0,
    tls_ca: Path | None = None,
    repo_root: Path = REPO_ROOT,
) -> ServerProcess:
    """Start `vidflow serve` (on free ports unless given); wait for SERVING when you want to.

    `repo_root` runs the server from another checkout (benchmarks compare against older code).
    """
    port = port or free_port()
    while not http_port or http_port == port:  # two picks in a row may give one port
        http_port = free_port()
    log_path = tmp_dir / f"server-{port}-{time.monotonic_ns()}.log"
    args = [
        sys.executable, "-m", "vidflow.cli", "serve",
        "--port", str(port), "--http-port", str(http_port), "--cache-dir", str(cache_dir),
        *extra_args,
    ]  # fmt: skip
    # Its default host, loopback, as `target` says, whatever VIDFLOW_INFERENCE_HOST the shell
    # exports (its 0.0.0.0 opened a benchmark's server to the network: found in review, stop 62)
    process = launch_logged(args, log_path, repo_root, without=("VIDFLOW_INFERENCE_HOST",))
    return ServerProcess(process, port, http_port, log_path, args, tls_ca)


def launch_logged(
    args: list[str], log_path: Path, cwd: Path, without: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """Start a server process with its output, unbuffered, in `log_path` (read on failure);
    the variables named in `without` left out of its environment.

    It dies with the thread that starts it (`batch_child`): a test or benchmark that failed
    before its stop, or was killed, left a server holding its ports and a core for good."""
    env = {**{k: v for k, v in os.environ.items() if k not in without}, "PYTHONUNBUFFERED": "1"}
    command, preexec_fn = batch_child(args)
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            command, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
            preexec_fn=preexec_fn,
        )  # fmt: skip
