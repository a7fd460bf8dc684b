"""Health that follows the model: a server whose model stopped answering says NOT_SERVING.

Health and `/readyz` were set once, as the model loaded: a GPU that fell off the bus (an Xid,
a sticky "illegal memory access") failed every call with INTERNAL while the probes of Docker,
compose and Kubernetes read SERVING and kept sending traffic. No library watches a model's own
calls, so this does: a few model calls failing in a row (not an image's own error: those never
reach the model) turn health NOT_SERVING; the next call that succeeds turns it SERVING again.
A server that says NOT_SERVING gets no traffic to prove it mended, so a probe batch (zeros, as
the warm-up) runs every PROBE_EVERY_S meanwhile.

A model call that never returns (a wedged GPU or driver) fails nothing: its callers wait, the
calls behind it queue, and health read SERVING for good. A call running `hung_after_s`
(`--hung-model-call-s`) turns health NOT_SERVING at once, until a call answers again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from services.inference.backends import Backend
from services.inference.loader import ServedModel

log = logging.getLogger(__name__)

FAILURES_TO_UNREADY = 3  # model calls failed in a row: one failure may be one batch's own
PROBE_EVERY_S = 5.0
HANG_CHECK_S = 1.0  # how often the calls running are looked at for one stuck


class ModelNotAnsweringError(RuntimeError):
    """A model call failed while the model is known not to answer (health NOT_SERVING): the
    server's outage, not the request's, answered UNAVAILABLE so that clients wait and retry.
    Answered INTERNAL, a stream consumer dead-lettered every frame of the outage."""


class WatchedBackend:
    """A backend whose calls tell `on_change(answers)` when the model stops answering and when
    it answers again; everything else is the backend's own."""

    def __init__(
        self,
        backend: Backend,
        probe_batch: np.ndarray,
        on_change: Callable[[bool], None],
        hung_after_s: float = 30.0,
    ) -> None:
        self._backend, self._probe_batch, self._on_change = backend, probe_batch, on_change
        self.hung_after_s = hung_after_s
        self._lock = threading.Lock()
        self._failures = 0  # guarded by _lock, with _down and _probing
        self._down = False
        self._probing = False  # one probe thread at a time, however often the model flaps
        self._running: dict[int, float] = {}  # monotonic start of each call running, by key
        self._hung: set[int] = set()  # the keys of those already told as stuck
        self._keys = itertools.count()
        self._closed = threading.Event()
        threading.Thread(target=self._watch_for_hangs, name="model-hang-watch", daemon=True).start()

    def __getattr__(self, name: str) -> Any:  # name, device, warm_up: the backend's
        return getattr(self._backend, name)

    def run(self, batch: np.ndarray) -> np.ndarray:
        key = next(self._keys)
        with self._lock:
            self._running[key] = time.monotonic()
        try:
            probabilities = self._backend.run(batch)
        except Exception as exc:
            self._record(answered=False)
            if self._down:
                raise ModelNotAnsweringError(
                    f"the model is not answering (health says NOT_SERVING until a probe, every "
                    f"{PROBE_EVERY_S:.0f} s, sees it answer): {type(exc).__name__}: {exc}"
                ) from exc
            raise
        finally:
            with self._lock:
                del self._running[key]
                self._hung.discard(key)
        self._record(answered=True)
        return probabilities

    @property
    def answering(self) -> bool:
        """Whether the model answers (False after FAILURES_TO_UNREADY failures in a row)."""
        return not self._down

    def close(self) -> None:
        """Stop probing (the server is shutting down)."""
        self._closed.set()

    def _record(self, answered: bool, hung: tuple[int, ...] = ()) -> None:
        """A call's outcome; `hung`: the keys of calls found stuck (told only if one of them
        is still running: one that returned meanwhile has told its own outcome)."""
        with self._lock:
            if hung and not any(key in self._running for key in hung):
                return
            self._failures = 0 if answered else self._failures + 1
            failing = bool(hung) or self._failures >= FAILURES_TO_UNREADY
            down = not answered and (self._down or failing)
            changed, self._down = down != self._down, down
            probe = down and not self._probing
            self._probing |= probe
        if not changed:
            return
        if down:
            why = (
                f"a model call has not returned in {self.hung_after_s:g} s"
                if hung
                else f"the model failed {FAILURES_TO_UNREADY} calls in a row"
            )
            log.error(
                "%s: health says NOT_SERVING until it answers again (a probe every %.0f s)",
                why, PROBE_EVERY_S,
            )  # fmt: skip
        else:
            log.warning("the model answers again: health says SERVING")
        # Told of a change, not given it: changes told from two model threads may arrive in
        # either order, and the listener reads `answering` as it applies them.
        self._on_change(not down)
        if probe:
            threading.Thread(target=self._probe, name="model-probe", daemon=True).start()

    def _watch_for_hangs(self) -> None:
        """Tell each call running `hung_after_s` once, as a failure that turns health at once."""
        while not self._closed.wait(HANG_CHECK_S):
            now = time.monotonic()
            with self._lock:
                stuck = [key for key, since in self._running.items()
                         if now - since >= self.hung_after_s and key not in self._hung]  # fmt: skip
                self._hung.update(stuck)
            if stuck:
                self._record(answered=False, hung=tuple(stuck))

    def _probe(self) -> None:
        """Run the probe batch while the model does not answer (until the server closes)."""
        while not self._closed.wait(PROBE_EVERY_S):
            with self._lock:
                if not self._down:
                    self._probing = False
                    return
            with contextlib.suppress(Exception):  # counted by run: still down
                self.run(self._probe_batch)


def watched(
    model: ServedModel, on_change: Callable[[bool], None], hung_after_s: float = 30.0
) -> ServedModel:
    """`model` with its backend watched (the probe batch: one image of zeros)."""
    probe = np.zeros((1, *model.preprocess.input_shape), np.float32)
    backend = WatchedBackend(model.backend, probe, on_change, hung_after_s)
    return dataclasses.replace(model, backend=backend)
