"""Stopping child processes the same way everywhere: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess


def stop_process(process: subprocess.Popen, timeout_s: float) -> int:
    """Ask a child to stop, give it `timeout_s` to drain, then kill it; return its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
