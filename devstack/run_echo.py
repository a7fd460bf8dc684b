"""The log of a deployment's flow run, echoed to the terminal as it comes.

`prefect deployment run --watch` prints the run's states only: `make demo` sat silent through
the 20-30 s of each run, though the run logs what it does (its input, its model, its progress,
its counts). This reads the run's log lines from the Prefect REST API while the command waits.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from devstack.local_stack import post_json

log = logging.getLogger(__name__)

# The newest run of the deployment created from this long before the echo started: the
# server's and this process's clocks are the same machine's, the margin is for rounding.
START_MARGIN_S = 5.0


class RunLogEcho:
    """Call it while a deployment's run is awaited (at most once every `every_s` it asks the
    API); `finish()` once it has ended, for the run's last lines."""

    def __init__(self, api_url: str, flow_name: str, deployment: str, every_s: float = 2.0) -> None:
        self.api_url, self.flow_name, self.deployment = api_url, flow_name, deployment
        self.every_s = every_s
        self.since = (datetime.now(UTC) - timedelta(seconds=START_MARGIN_S)).isoformat()
        self.flow_run_id: str | None = None
        self.seen: set[str] = set()
        self.last_timestamp: str | None = None
        self.next_at = 0.0

    def __call__(self) -> None:
        if time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + self.every_s
        self.finish()

    def finish(self) -> None:
        """Echo what the run logged since the last call."""
        try:
            self.echo_new()
        except Exception as exc:  # a courtesy: the run's outcome is read from its state
            log.debug("the run's log could not be read: %s", exc)

    def echo_new(self) -> int:
        """Print the run's INFO and higher lines not printed yet (the first line of each);
        how many."""
        if self.flow_run_id is None:
            self.flow_run_id = self._newest_run()
            if self.flow_run_id is None:  # not created yet
                return 0
        shown = 0
        for entry in self._logs():
            if entry["id"] in self.seen:
                continue
            self.seen.add(entry["id"])
            self.last_timestamp = entry["timestamp"]
            lines = (entry.get("message") or "").strip().splitlines()
            if lines:
                print(f"  {self.flow_name} | {lines[0]}", flush=True)
                shown += 1
        return shown

    def _newest_run(self) -> str | None:
        body = {
            "flows": {"name": {"any_": [self.flow_name]}},
            "deployments": {"name": {"any_": [self.deployment]}},
            "flow_runs": {"expected_start_time": {"after_": self.since}},
            "sort": "EXPECTED_START_TIME_DESC",
            "limit": 1,
        }
        runs = post_json(f"{self.api_url}/flow_runs/filter", body)
        return runs[0]["id"] if runs else None

    def _logs(self) -> list[dict[str, Any]]:
        logs: dict[str, Any] = {
            "flow_run_id": {"any_": [self.flow_run_id]},
            "level": {"ge_": logging.INFO},
        }
        if self.last_timestamp is not None:  # at or after it: the ids seen are skipped
            logs["timestamp"] = {"after_": self.last_timestamp}
        body = {"logs": logs, "sort": "TIMESTAMP_ASC", "limit": 200}
        return post_json(f"{self.api_url}/logs/filter", body)
