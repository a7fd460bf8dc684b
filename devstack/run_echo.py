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
# Lines are stamped by the process that logs them and sent in batches every 2 s, each process
# on its own (the flow's, each Ray worker's): one stamped before a line already shown can
# arrive after it. Asked again this far back; the lines seen are skipped.
LOOKBACK_S = 10.0
PAGE = 200
# After the run has ended: its last lines may still be on their way (its last batch).
LAST_LINES_WAIT_S = 2.5
# What Prefect's task engine logs as each task run that went well ends.
TASK_RUN_WENT_WELL = "Finished in state Completed("


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
        self.task_names: dict[str, str] = {}

    def __call__(self) -> None:
        if time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + self.every_s
        self._echo_quietly()

    def finish(self, wait_s: float = LAST_LINES_WAIT_S) -> None:
        """Echo what the run logged since the last call, and what comes in the next `wait_s`
        (the run has ended: its last batch of lines may still be on its way)."""
        until = time.monotonic() + wait_s
        while True:
            self._echo_quietly()
            if time.monotonic() >= until:
                return
            time.sleep(min(0.5, until - time.monotonic()))

    def _echo_quietly(self) -> None:
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
        shown, offset = 0, 0
        after = self._after()
        while True:
            page = self._logs(after, offset)
            for entry in page:
                if entry["id"] in self.seen:
                    continue
                self.seen.add(entry["id"])
                self.last_timestamp = max(self.last_timestamp or "", entry["timestamp"])
                if line := self._line(entry):
                    print(f"  {self.flow_name} | {line}", flush=True)
                    shown += 1
            if len(page) < PAGE:
                return shown
            offset += PAGE

    def _line(self, entry: dict[str, Any]) -> str | None:
        """The entry's first line, a task run's with that run's name in front (`download
        shard 2 of 4: ...`); None for a task run that ended well: one such line per task run
        buried the run's own lines (found in review, stop 62)."""
        lines = (entry.get("message") or "").strip().splitlines()
        if not lines:
            return None
        task_run_id = entry.get("task_run_id")
        if task_run_id is None:
            return lines[0]
        if lines[0].startswith(TASK_RUN_WENT_WELL):
            return None
        return f"{self._task_name(task_run_id)}: {lines[0]}"

    def _task_name(self, task_run_id: str) -> str:
        if task_run_id not in self.task_names:
            body = {"task_runs": {"id": {"any_": [task_run_id]}}, "limit": 1}
            runs = post_json(f"{self.api_url}/task_runs/filter", body)
            self.task_names[task_run_id] = runs[0]["name"] if runs else "a task"
        return self.task_names[task_run_id]

    def _after(self) -> str | None:
        """The time the lines asked for start at: LOOKBACK_S before the latest one seen."""
        if self.last_timestamp is None:
            return None
        latest = datetime.fromisoformat(self.last_timestamp)
        return (latest - timedelta(seconds=LOOKBACK_S)).isoformat()

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

    def _logs(self, after: str | None, offset: int) -> list[dict[str, Any]]:
        logs: dict[str, Any] = {
            "flow_run_id": {"any_": [self.flow_run_id]},
            "level": {"ge_": logging.INFO},
        }
        if after is not None:  # at or after it: the ids seen are skipped
            logs["timestamp"] = {"after_": after}
        body = {"logs": logs, "sort": "TIMESTAMP_ASC", "offset": offset, "limit": PAGE}
        return post_json(f"{self.api_url}/logs/filter", body)
