"""Ending a finished command's process without tearing down its interpreter."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys


class QuickExit:
    """Ends a command-line process without tearing down its interpreter, once its work is done
    and every other exit handler has run.

    A `vidflow depth` driver holds Prefect, Ray, Lance and pyarrow: after its last output,
    Python spent ~0.9 s of one CPU freeing their modules one object at a time (py-spy:
    `gc_collect_main` during finalization), time a user waits and a benchmark counts. The
    program's entry point calls `arm` before any command runs, so its handler is registered
    before those of Prefect, Ray, Lance and the rest, which the commands import, and runs after
    them (atexit runs handlers in reverse); Prefect drains its log and event queues earlier
    still, at thread shutdown. Logging, imported before `arm`, is shut down here. A process
    that never calls `finish` exits the usual way, and so does one that is not the program
    (code calling `main` in-process).
    """

    def __init__(self) -> None:
        self.code: int | None = None

    def arm(self) -> None:
        atexit.register(self._exit)

    def finish(self, code: int) -> None:
        """The work is done and `code` is the process's exit code."""
        self.code = code

    def _exit(self) -> None:
        if self.code is None:
            return
        logging.shutdown()  # its own exit handler, registered before ours, would run after it
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.code)


quick_exit = QuickExit()
