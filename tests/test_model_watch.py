"""The model watch (services/inference/model_watch.py) on a stand-in model: one that fails and
answers again on demand, many times over, cannot be had from a real model (the server's own
path: test_service_faults.py, the health test of a model that stops answering)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from services.inference import model_watch
from services.inference.model_watch import FAILURES_TO_UNREADY, WatchedBackend


class _Flapping:
    """A backend that fails while `failing` is set (a GPU lost, then back)."""

    name, device = "stand-in", "cuda"

    def __init__(self) -> None:
        self.failing = threading.Event()

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.failing.is_set():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return batch


def _fail(watch: WatchedBackend, times: int) -> None:
    for _ in range(times):
        with pytest.raises(RuntimeError):
            watch.run(np.zeros(1))


def test_a_flapping_model_is_told_each_change_once_and_keeps_one_probe(monkeypatch) -> None:
    """Found in review: each fall started a probe thread of its own (a model that flapped
    ran one more probe batch every 5 s per flap)."""
    monkeypatch.setattr(model_watch, "PROBE_EVERY_S", 0.05)
    model, told = _Flapping(), []
    watch = WatchedBackend(model, np.zeros(1), told.append)
    try:
        for _ in range(5):
            model.failing.set()
            _fail(watch, FAILURES_TO_UNREADY - 1)
            assert watch.answering  # not yet: one batch's failure may be its own
            _fail(watch, 1)
            assert not watch.answering
            model.failing.clear()
            watch.run(np.zeros(1))
            assert watch.answering
            probes = [t for t in threading.enumerate() if t.name == "model-probe"]
            assert len(probes) <= 1, probes
        assert told == [False, True] * 5
        # Down and left alone: the probe brings it back with no call of a client's.
        model.failing.set()
        _fail(watch, FAILURES_TO_UNREADY)
        model.failing.clear()
        deadline = time.monotonic() + 5
        # `answering` turns before the listener is told (outside the watch's lock): wait for both
        while not watch.answering or told[-1] is not True:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert told[-2:] == [False, True]
        # Its probe ends once the model answers; a later outage starts another, which brings
        # the model back again with no call of a client's (a probe that never ended, or one
        # never started again, left the server NOT_SERVING for good).
        while [t for t in threading.enumerate() if t.name == "model-probe"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        model.failing.set()
        _fail(watch, FAILURES_TO_UNREADY)
        model.failing.clear()
        while not watch.answering or told[-1] is not True:
            assert time.monotonic() < deadline, "the second outage was never probed"
            time.sleep(0.01)
        assert told[-2:] == [False, True]
    finally:
        watch.close()


class _Stuck:
    """A backend whose calls do not return while `stuck` is set (a wedged GPU or driver)."""

    name, device = "stand-in", "cuda"

    def __init__(self) -> None:
        self.stuck = threading.Event()
        self.released = threading.Event()

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.stuck.is_set():
            self.released.wait(30)
        return batch


def test_a_model_call_that_does_not_return_turns_health_until_one_answers(monkeypatch) -> None:
    """A call that never returned failed nothing: its callers and the calls queued behind it
    waited, and health said SERVING for good (found in review, stop 59). One that returns as
    it is found stuck tells nothing more (the watch looks again under the lock)."""
    monkeypatch.setattr(model_watch, "HANG_CHECK_S", 0.05)
    monkeypatch.setattr(model_watch, "PROBE_EVERY_S", 60.0)  # the hung call's return brings it
    model, told = _Stuck(), []
    watch = WatchedBackend(model, np.zeros(1), told.append, hung_after_s=2.0)
    try:
        watch.run(np.zeros(1))  # a call that returns at once
        model.stuck.set()
        stuck = threading.Thread(target=watch.run, args=(np.zeros(1),), daemon=True)
        started = time.monotonic()
        stuck.start()
        time.sleep(0.3)
        if time.monotonic() - started < 1.5:  # (a loaded machine may have slept past it)
            assert watch.answering and told == []  # not yet stuck: a call may take a while
        deadline = time.monotonic() + 10
        while watch.answering:
            assert time.monotonic() < deadline, "a stuck call was never told"
            time.sleep(0.01)
        time.sleep(0.3)  # told once, however long it stays stuck
        assert told == [False]
        model.stuck.clear()
        model.released.set()
        stuck.join(5)
        assert watch.answering and told == [False, True]
        # Found stuck as it returned: the watch's word comes after the call's own, and is
        # dropped (it turned health off with nothing running)
        watch._record(answered=False, hung=(10**9,))  # a key no call runs under
        assert watch.answering and told == [False, True]
    finally:
        watch.close()
