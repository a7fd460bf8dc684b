"""The local Prefect stack of `make demo`: a Prefect server, a work pool, deployments, a worker.

Every process started here, and everything those start (flow-run processes, Ray's daemons),
carries a marker in its environment, so that `stop` can find and end all of them, even those
that left the process group or outlived their parent. Nothing is left behind.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.net import free_port, reach_loopback_directly
from common.processes import signal_on_parent_death, stop_process
from devstack.last_words import last_words_in
from devstack.launcher import REPO_ROOT
from devstack.processes import kill_marked_processes, listens_on

log = logging.getLogger("vidflow.stack")

WORK_POOL = "vidflow-local"
MARKER_VARIABLE = "VIDFLOW_STACK_ID"
# This interpreter's Prefect: `make demo` runs without the venv on PATH.
PREFECT_CLI = [sys.executable, "-m", "prefect"]
FLOW_RUN_ID = re.compile(r"UUID:\s*([0-9a-f-]{36})")
# The watcher's signals: the kernel's SIGTERM as its parent dies, the parent's "stand down".
WATCHER_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}


def port_or_free(preferred: int) -> int:
    """The usual port when it is free (so printed URLs look familiar), else any free one."""
    import socket

    with socket.socket() as sock:
        # As servers bind: a port in TIME_WAIT after a previous run counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


@dataclass
class LocalStack:
    """Starts and stops the Prefect side of a local run; all logs go to `logs_dir`."""

    logs_dir: Path
    prefect_home: Path
    ui_port: int = 4200
    # Settings for every process of the stack, e.g. PREFECT_API_DATABASE_CONNECTION_URL for
    # PostgreSQL or PREFECT_SERVER_API_AUTH_STRING with PREFECT_API_AUTH_STRING for basic auth.
    extra_env: dict[str, str] = field(default_factory=dict)
    stack_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Its calls to 127.0.0.1 (the health check, the REST calls, the CLI's and the
        # worker's) went to an http_proxy set without no_proxy where not the demo, which does
        # this too, started the stack (found in review, stop 62: a benchmark's stack)
        reach_loopback_directly()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    def env(self) -> dict[str, str]:
        """The environment of every process of the stack (CLI calls, server, worker); behind
        basic auth, its clients use the server's string unless given one of their own."""
        given = {**os.environ, **self.extra_env}
        return {
            **os.environ,
            **_client_auth(given),
            MARKER_VARIABLE: self.stack_id,
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Pick up a run within 1 s, not 10: one local worker's polls cost the server little.
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "VIDFLOW_PROJECT_DIR": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            # The venv's commands first, for whatever the flow runs start.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            **self.extra_env,
        }

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs_dir / f"{name}.log", "ab") as output:
            process = subprocess.Popen(
                args,
                cwd=REPO_ROOT,
                env=self.env(),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches only the demo
            )
        self.processes[name] = process
        return process

    def prefect(
        self,
        *args: str,
        timeout_s: float = 300,
        ok_codes: tuple[int, ...] = (0,),
        while_waiting: Callable[[], None] | None = None,
    ) -> str:
        """Run a `prefect` CLI command against this stack's server; its output (stdout, and
        stderr after it where it exits other than 0), or an error. `while_waiting` is called
        about once a second until it ends."""
        command = [*PREFECT_CLI, "--no-prompt", *args]
        with subprocess.Popen(
            command, cwd=REPO_ROOT, env=self.env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ) as running:  # fmt: skip
            try:
                stdout, stderr = _communicate(running, timeout_s, args, self._gone, while_waiting)
            except BaseException:  # a stop, a Ctrl-C: the command goes too (as subprocess.run)
                running.kill()
                raise
        with open(self.logs_dir / "prefect-cli.log", "a") as output:
            output.write(f"$ prefect {' '.join(args)}\n{stdout}{stderr}\n")
        if running.returncode not in ok_codes:
            raise RuntimeError(
                f"`prefect {' '.join(args)}` exited {running.returncode}:\n"
                f"{(stdout + stderr)[-3000:]}"
            )
        return stdout if running.returncode == 0 else stdout + stderr

    def _gone(self) -> str | None:
        """Why the stack can no longer serve a command: its worker or server exited."""
        for name in ("prefect-worker", "prefect-server"):
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                log_file = self.logs_dir / f"{name}.log"
                return (
                    f"the {name.replace('-', ' ')} exited with {process.returncode}; see {log_file}"
                )
        return None

    def start_server(self, timeout_s: float = 120) -> None:
        self.launch_server()
        self.wait_for_server(timeout_s)

    def launch_server(self) -> None:
        """Start the Prefect server without waiting for it: its first start on a new database
        takes ~10 s on 2 cores (migrations), which the caller can spend on other work."""
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        self._start(
            "prefect-server",
            [*PREFECT_CLI, "server", "start", "--host", "127.0.0.1", "--port", str(self.ui_port)],
        )

    def wait_for_server(self, timeout_s: float = 120) -> None:
        """Return once the launched server answers its health check; an error if it exits."""
        server = self.processes["prefect-server"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(
                    f"the Prefect server exited with {server.returncode}: {self._server_said()}"
                )
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    # Another server on the port (a demo started a moment before this one,
                    # its port free when chosen) answers too: this one then fails to bind.
                    if response.status == 200 and listens_on(server.pid, self.ui_port):
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"the Prefect server did not answer within {timeout_s:.0f} s: {self._server_said()}"
        )

    def _server_said(self) -> str:
        """The server's own last words, and where its log is (a benchmark's temporary folder
        is gone by the time its reader looks)."""
        return last_words_in(self.logs_dir / "prefect-server.log")

    def restart_server(self, timeout_s: float = 120) -> None:
        """Stop the Prefect server (SIGTERM) and start it again on the same port and database."""
        if (server := self.processes.pop("prefect-server", None)) is not None:
            stop_process(server, 30)
        # The new server must not find the old one's port still held (or answering health).
        deadline = time.monotonic() + 30
        while port_or_free(self.ui_port) != self.ui_port and time.monotonic() < deadline:
            time.sleep(0.2)
        self.start_server(timeout_s)

    def deploy(self, *deployments: str) -> None:
        self.prefect("work-pool", "create", WORK_POOL, "--type", "process", "--overwrite")
        names = [arg for name in deployments for arg in ("--name", name)]
        self.prefect("deploy", *names)

    def cancel_leftover_runs(self) -> list[str]:
        """Cancel the runs of this stack's work pool that are not final: with the Prefect
        history held by this demo (`vidflow.demo`'s lock), they are left by an earlier one that
        ended mid-run, and a new worker would run them with that demo's dead addresses."""
        return cancel_open_runs(self.api_url, WORK_POOL)

    def start_worker(self) -> None:
        self._start("prefect-worker", [*PREFECT_CLI, "worker", "start", "--pool", WORK_POOL])

    def run_deployment(
        self,
        name: str,
        parameters: dict[str, Any],
        timeout_s: float = 1800,
        allow_failed: bool = False,
        while_waiting: Callable[[], None] | None = None,
    ) -> tuple[str, str]:
        """`prefect deployment run NAME --watch`; returns the flow run's id and the line
        that gives its final state. A run that did not complete is an error unless
        `allow_failed` (the command exits 1 for it). `while_waiting`: see `prefect`."""
        output = self.prefect(
            "deployment", "run", name, "--params", json.dumps(parameters),
            "--watch", "--watch-interval", "1", "--watch-timeout", str(int(timeout_s)),
            timeout_s=timeout_s + 60, ok_codes=(0, 1) if allow_failed else (0,),
            while_waiting=while_waiting,
        )  # fmt: skip
        match = FLOW_RUN_ID.search(output)
        finished = [line for line in output.splitlines() if "Flow run finished" in line]
        if match is None or not finished:
            raise RuntimeError(
                f"no flow run id or final state in the output of `prefect deployment run`:\n"
                f"{output}"
            )
        return match.group(1), finished[-1].strip()

    def stop(self, timeout_s: float = 30) -> list[int]:
        """Stop the worker, then the server, then anything left with this stack's marker."""
        for name in ("prefect-worker", "prefect-server"):
            if (process := self.processes.pop(name, None)) is not None:
                stop_process(process, timeout_s)
        return kill_marked_processes(MARKER_VARIABLE, self.stack_id)


def _communicate(
    running: subprocess.Popen[str],
    timeout_s: float,
    args: tuple[str, ...],
    gone: Callable[[], str | None],
    while_waiting: Callable[[], None] | None = None,
) -> tuple[str, str]:
    """The command's output once it ends; an error once `timeout_s` passes, or as soon as
    `gone` says why the stack can no longer serve it (its worker or server exited: a run
    watched for 30 min waited that long for a worker that had died)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return running.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:
            if while_waiting is not None:
                while_waiting()
            why = gone()
            if why is None and time.monotonic() < deadline:
                continue
            if why is not None:
                raise RuntimeError(f"`prefect {' '.join(args[:2])}` stopped: {why}") from None
            raise subprocess.TimeoutExpired(running.args, timeout_s) from None


def start_reaper(variable: str, value: str) -> subprocess.Popen[bytes]:
    """A watcher that ends every process marked variable=value once this process dies.

    A SIGKILLed demo cannot stop what it started, and what it started (Prefect server, worker,
    flow runs, Ray, broker, service) lives in other sessions and process groups; the watcher
    gets SIGTERM from the kernel when its parent dies, however it dies, and sweeps them.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "devstack.local_stack", "reap", variable, value, str(os.getpid())],
        # Without the marker itself: the stack's own stop sweeps marked processes first.
        env={name: text for name, text in os.environ.items() if name != variable},
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C in the terminal does not reach it
        preexec_fn=_watcher_start,
    )


def _watcher_start() -> None:
    """`preexec_fn` of the watcher: its two signals are held (the mask outlives exec) until it
    waits for them. A parent SIGKILLed while the watcher still imported its modules (~0.3 s)
    ended it by SIGTERM's default action, before any sweep."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHER_SIGNALS)
    signal_on_parent_death()


def stop_reaper(reaper: subprocess.Popen[bytes]) -> None:
    """Tell the watcher the parent stops everything itself: it exits without sweeping."""
    if reaper.poll() is None:
        reaper.send_signal(signal.SIGUSR1)
    stop_process(reaper, 10)


def _reap(variable: str, value: str, parent_pid: int) -> None:
    """The watcher's body: on the kernel's SIGTERM, wait for the parent to be gone, then sweep.

    The kernel signals when the thread that started the watcher dies; the rest of the parent
    may take a moment longer (getppid() says the parent until then). SIGUSR1 is the parent's
    own "stop watching". Both are taken from the held set, never by a handler: one that came
    between a check of the parent and a `pause()` left the watcher paused for good.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHER_SIGNALS)  # held already, unless run by hand
    # Polled too: the parent may have died before the kernel was told to signal us.
    while os.getppid() == parent_pid:
        taken = _signal_taken(1.0)
        if taken == signal.SIGUSR1:
            return
        if taken is not None:
            break
    deadline = time.monotonic() + 10
    while os.getppid() == parent_pid and time.monotonic() < deadline:
        time.sleep(0.1)
    if os.getppid() != parent_pid:  # reparented: the parent died
        kill_marked_processes(variable, value)


def _signal_taken(timeout_s: float) -> int | None:
    """One of the watcher's held signals, within `timeout_s`; SIGUSR1 first where both are.
    macOS has no sigtimedwait: there the held ones are looked at after each wait."""
    if hasattr(signal, "sigtimedwait"):
        taken = signal.sigtimedwait(WATCHER_SIGNALS, timeout_s)
        return None if taken is None else taken.si_signo
    time.sleep(timeout_s)
    held = signal.sigpending() & WATCHER_SIGNALS
    return signal.SIGUSR1 if signal.SIGUSR1 in held else next(iter(held), None)


if __name__ == "__main__" and sys.argv[1:2] == ["reap"]:
    _reap(sys.argv[2], sys.argv[3], int(sys.argv[4]))


OPEN_STATES = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]


def cancel_open_runs(api_url: str, work_pool: str) -> list[str]:
    """Set every flow run of `work_pool` that is not final to Cancelled; their ids."""
    query = {
        "flow_runs": {"state": {"type": {"any_": OPEN_STATES}}},
        "work_pools": {"name": {"any_": [work_pool]}},
    }
    open_runs = post_json(f"{api_url}/flow_runs/filter", query)
    cancelled = {"type": "CANCELLED", "name": "Cancelled", "message": "left by an ended demo"}
    for run in open_runs:
        post_json(f"{api_url}/flow_runs/{run['id']}/set_state", {"state": cancelled, "force": True})
    return [run["id"] for run in open_runs]


def _client_auth(env: dict[str, str]) -> dict[str, str]:
    """PREFECT_API_AUTH_STRING for the stack's clients: the one given, else the server's."""
    auth = env.get("PREFECT_API_AUTH_STRING") or env.get("PREFECT_SERVER_API_AUTH_STRING")
    return {"PREFECT_API_AUTH_STRING": auth} if auth else {}


def post_json(url: str, body: dict[str, Any]) -> Any:
    """POST `body` as JSON to the Prefect REST API at `url`; its JSON answer. Behind basic auth
    (PREFECT_API_AUTH_STRING, or the stack's PREFECT_SERVER_API_AUTH_STRING), with it."""
    headers = {"Content-Type": "application/json"}
    if auth := _client_auth(dict(os.environ)).get("PREFECT_API_AUTH_STRING"):
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)
