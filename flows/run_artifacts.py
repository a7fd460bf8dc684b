"""Recording a run's artifacts so that one refused artifact costs no more than itself."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger
from prefect.context import FlowRunContext

log = logging.getLogger(__name__)


def record_each(creates: Sequence[functools.partial[Any]]) -> None:
    """Call each artifact's `create_*_artifact`, whether or not the others could be recorded:
    the run's work is done by now, so a refused artifact (a proxy's body limit in front of the
    API, which once refused a depth run's video table; an API that failed after its retries) is
    worth a warning naming its key, not the run, its figures or the artifacts after it."""
    logger = get_run_logger() if FlowRunContext.get() is not None else log
    for create in creates:
        try:
            create()
        except Exception as exc:  # the API's errors share no base class with the client's
            logger.warning("artifact %s not recorded: %s", create.keywords["key"], exc)
