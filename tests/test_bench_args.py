"""The benchmarks refuse a bad flag in one line, exit 2, before measuring anything; a server that
dies at start-up is reported at once, not after the 180-s wait for it to serve."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack.launcher import start_server
from services.inference.client import ServerExitedError

REPO = Path(__file__).resolve().parents[1]

BAD_FLAGS = [
    (["bench.depth_peer", "--videos", "0"], "--videos: must be 1 or more"),
    (["bench.depth_peer", "--ray", "foo"], "--ray: must be comma-separated names from local"),
    (["bench.depth", "--parts", "nonsense"], "--parts: must be comma-separated names"),
    (["bench.depth_scale", "--sizes", "200,,2000"], "--sizes: must be comma-separated numbers"),
    (["bench.service", "--rounds", "0"], "--rounds: must be 1 or more"),
    (["bench.serve_start", "--baseline-repo", "/tmp"], "not a vidflow checkout: /tmp"),
    (["bench.service_sweep", "--json", "/no/such/folder/x.json"], "folder /no/such/folder"),
    (["bench.service_sweep", "--vidflow", "foo"], "--vidflow: takes LABEL=VALUE"),
    (["bench.service_sweep", "--vidflow-repo", "a=/tmp"], "no --vidflow a=..."),
    (
        ["bench.service_sweep", "--vidflow", "a=", "--vidflow-repo", "a=/tmp"],
        "--vidflow-repo a=...: not a vidflow checkout: /tmp",
    ),
    (["bench.service_sweep", "--plain", "plain=--classify-pool"], "--plain plain=...: that label"),
    (["bench.service_sweep", "--vidflow", "plain=--x"], "--vidflow plain=...: that label is the"),
    (["bench.depth_peer", "--baseline", "/tmp"], "not a vidflow checkout: /tmp"),
    (["bench.depth_peer", "--baseline", ".", "--ray", "cluster"], "--ray must include local"),
    (["bench.plain_server", "--onnx-model", "Makefile", "--port", "-5"], "--port: must be a port"),
    (
        [
            "bench.plain_server",
            "--onnx-model",
            "Makefile",
            "--port",
            "5",
            "--idle-call-timeout-s",
            "1",
        ],
        "--idle-call-timeout-s: only with --classify-pool",
    ),
    (["bench.stream_capacity", "--budget-ms", "nan"], "--budget-ms: must be more than 0"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_and_exit_2(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_help_shows_the_whole_docstring_and_the_defaults() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.depth_peer", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "zero_overhead_bound" in done.stdout  # past the docstring's first line
    assert "(default: 48)" in done.stdout


def test_a_server_that_exits_at_start_is_reported_at_once(tmp_path: Path) -> None:
    server = start_server(tmp_path, tmp_path / "cache", "--max-batch-size", "0")
    started = time.monotonic()
    with pytest.raises(ServerExitedError, match="process exited") as raised:
        server.wait_serving(timeout_s=120)
    assert time.monotonic() - started < 60  # before: the whole timeout, then TimeoutError
    assert "max-batch-size" in str(raised.value).lower()  # the server's log comes with it
    server.terminate()
