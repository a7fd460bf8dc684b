"""How a flow run ends Failed for a reason it has explained: the error as the state's message
and data, the message in the run's log, and no traceback.

Prefect raises a Failed state's data when the flow is called, so a caller gets the error itself
(with what the run recorded, for a `RunFailedError`); a raised error instead put a traceback in
the run's log and "Flow run encountered an exception" in the UI.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.states import Failed, State


class RunFailedError(RuntimeError):
    """A run that failed after it had recorded what it could: `report` holds it (a depth run's
    summary, a stream run's figures)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message, report)  # both in args: pickled whole, as Prefect may
        self.report = report

    def __str__(self) -> str:
        return str(self.args[0])

    def __repr__(self) -> str:  # in Prefect's log of the failure: the message, not the report
        return f"{type(self).__name__}({self.args[0]!r})"


def failed_state(failure: Exception, *, log: bool = True) -> State[Any]:
    """The run's end for `failure`: Failed, its message the error's, its data the error (logged
    as one line unless `log` is False, where the state's message says it all)."""
    if log:
        get_run_logger().error("%s", failure)
    return Failed(message=str(failure), data=failure)
