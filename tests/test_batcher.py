"""The dynamic batcher with real worker threads, called from threads as gRPC's handlers do."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.inference.batcher import DynamicBatcher


def _recording_batcher(max_batch_size: int, max_delay_s: float, batches: list[list[int]]):
    def run_batch(items: list[int]) -> list[int]:
        batches.append(list(items))
        time.sleep(0.02)
        return [item * 10 for item in items]

    return DynamicBatcher(run_batch, max_batch_size=max_batch_size, max_delay_s=max_delay_s)


def _classify(batcher: DynamicBatcher, item: int, arrival_delay_s: float = 0.0):
    with batcher.admit() as admission:
        time.sleep(arrival_delay_s)  # a request still being received
        future = admission.submit(item)
    return future.result(timeout=30)


def _at_once(*calls) -> list:
    """Each (function, args...) on a thread of its own; their results or exceptions, in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call[0], *call[1:]) for call in calls]
    return [f.exception() if f.exception() is not None else f.result() for f in futures]


def test_concurrent_requests_share_batches_up_to_the_limit() -> None:
    batches: list[list[int]] = []
    batcher = _recording_batcher(4, 1.0, batches)
    batcher.start()
    with contextlib.ExitStack() as arriving:  # ten requests in the server at once
        admissions = [arriving.enter_context(batcher.admit()) for _ in range(10)]
        futures = [admission.submit(i) for i, admission in enumerate(admissions)]
    results = [future.result(timeout=30) for future in futures]
    batcher.close()
    assert [r.value for r in results] == [i * 10 for i in range(10)]
    assert sorted(i for batch in batches for i in batch) == list(range(10))
    assert max(len(b) for b in batches) == 4
    assert len(batches) == 3
    assert all(r.batch_size == len(b) for b in batches for r in results if r.value // 10 in b)
    # Each waited in the queue for the batches before its own (one worker, 20 ms a batch): the
    # response's queue_ms and the "queue" stage (stop 57: no test read them when batching).
    assert min(r.queue_s for r in results) >= 0 and max(r.queue_s for r in results) >= 0.035


def test_a_lone_request_is_not_held_back() -> None:
    batcher = _recording_batcher(8, 5.0, [])
    batcher.start()
    started = time.perf_counter()
    result = _classify(batcher, 7)
    elapsed = time.perf_counter() - started
    batcher.close()
    assert result.value == 70 and result.batch_size == 1
    assert elapsed < 2.5  # the 5 s delay never applied (the model call itself takes 20 ms)


def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for the batcher's state (not a fixed sleep, which a busy machine outruns)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_batch_waits_for_requests_on_their_way_but_not_past_the_delay() -> None:
    def scenario(delay_s: float, second_comes: Callable[[DynamicBatcher, list], bool]):
        batches: list[list[int]] = []
        batcher = _recording_batcher(8, delay_s, batches)
        batcher.start()
        with batcher.admit() as second:  # on its way before the first is queued
            first = threading.Thread(target=_classify, args=(batcher, 1))
            first.start()
            _until(lambda: second_comes(batcher, batches))
            result = second.submit(2)
        result.result(timeout=30)
        first.join()
        batcher.close()
        return batches

    # The first queued and waiting: the second joins its batch.
    assert scenario(1.0, lambda batcher, _: len(batcher._pending) == 1) == [[1, 2]]
    # With 10 ms to wait, the first runs alone while the second is still on its way.
    assert scenario(0.01, lambda _, batches: batches == [[1]]) == [[1], [2]]


def test_a_failing_batch_fails_each_caller_and_the_batcher_goes_on() -> None:
    calls = []

    def run_batch(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return items

    batcher = DynamicBatcher(run_batch, max_batch_size=4, max_delay_s=0.0)
    batcher.start()
    with pytest.raises(RuntimeError, match="model exploded"):
        _classify(batcher, 1)
    result = _classify(batcher, 2)
    batcher.close()
    assert result.value == 2


def test_workers_run_batches_at_once_each_taking_its_own() -> None:
    # Each batch waits at the barrier for another batch to be running: one worker would time out.
    both_running = threading.Barrier(2, timeout=10)

    def run_batch(items: list[int]) -> list[int]:
        both_running.wait()
        return [item + 100 for item in items]

    batcher = DynamicBatcher(run_batch, max_batch_size=1, max_delay_s=0.0, workers=2)
    batcher.start()
    results = _at_once((_classify, batcher, 1), (_classify, batcher, 2))
    batcher.close()
    assert [r.value for r in results] == [101, 102]


def _outcome(batcher: DynamicBatcher, item: int) -> object:
    try:
        return _classify(batcher, item)
    except Exception as exc:
        return exc


def test_a_model_that_loses_results_fails_its_callers_clearly_and_the_batcher_goes_on() -> None:
    def run_batch(items: list[int]) -> list[int]:
        return items[:-1] if len(items) > 1 else items  # drops one result of a real batch

    batcher = DynamicBatcher(run_batch, max_batch_size=4, max_delay_s=1.0)
    batcher.start()
    # The second is on its way while the first waits for it, so both share one batch.
    with batcher.admit() as second:
        first = threading.Thread(target=lambda: outcomes.append(_outcome(batcher, 1)))
        outcomes: list = []
        first.start()
        _until(lambda: len(batcher._pending) == 1)  # the first queued, waiting for the second
        second_result = second.submit(2)
    first.join()
    outcomes.append(second_result.exception(timeout=30))
    after = _classify(batcher, 3)
    batcher.close()
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes
    assert "returned 1 results for a batch of 2" in str(outcomes[0])
    assert after.value == 3


def test_a_caller_that_gives_up_while_queued_is_not_run() -> None:
    release = threading.Event()
    batches: list[list[int]] = []

    def run_batch(items: list[int]) -> list[int]:
        batches.append(list(items))
        release.wait(10)  # keeps the only worker busy, so the next request stays queued
        return items

    batcher = DynamicBatcher(run_batch, max_batch_size=4, max_delay_s=0.0)
    batcher.start()
    with batcher.admit() as admission:
        first = admission.submit(1)
    while not batches:  # the worker has taken the first batch
        time.sleep(0.01)
    with batcher.admit() as admission:
        abandoned = admission.submit(2)
    time.sleep(0.05)
    assert abandoned.cancel()  # its caller is gone (its call ended)
    assert not batcher._pending  # withdrawn at once: it holds no place in a batch, sets no deadline
    time.sleep(0.05)
    release.set()
    results = [first.result(timeout=30), _classify(batcher, 3)]
    batcher.close()
    assert [r.value for r in results] == [1, 3]
    assert batches == [[1], [3]]


def _held_batches(started: threading.Event, release: threading.Event, wait_s: float):
    """A run_batch that says it started, then runs until `release` (or `wait_s`)."""

    def run_batch(items: list[int]) -> list[int]:
        started.set()
        release.wait(wait_s)
        return items

    return run_batch


def test_closing_fails_what_is_still_queued_after_the_running_batch_ends() -> None:
    release = threading.Event()
    started = threading.Event()
    batcher = DynamicBatcher(_held_batches(started, release, 10), max_batch_size=1, max_delay_s=0.0)
    batcher.start()
    with batcher.admit() as admission:
        running = admission.submit(1)
    started.wait(10)
    with batcher.admit() as admission:
        queued = admission.submit(2)
    time.sleep(0.05)
    closing = threading.Thread(target=batcher.close)
    closing.start()
    _until(lambda: batcher._closing)  # else the worker, released, takes the queued one
    release.set()
    closing.join(10)
    finished, refused = running.result(timeout=10), queued.exception(timeout=10)
    assert finished.value == 1
    assert isinstance(refused, RuntimeError) and "shutting down" in str(refused)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice: Linux")
def test_model_workers_run_lowered_and_the_handlers_are_not() -> None:
    """Workers run the model `worker_niceness` steps below the threads that call them (gRPC's
    handlers), which keep their priority."""
    seen: list[int] = []

    def run_batch(items: list[int]) -> list[int]:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return items

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    batcher = DynamicBatcher(
        run_batch, max_batch_size=1, max_delay_s=0.0, workers=2, worker_niceness=5
    )
    batcher.start()
    _at_once(*((_classify, batcher, item) for item in range(4)))
    batcher.close()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert seen and set(seen) == {min(19, before + 5)}


def test_a_request_handed_straight_to_a_worker_wakes_the_one_idle_last() -> None:
    """One request at a time keeps going to the same (warm) worker, never round the pool."""
    ran_on: list[int] = []

    def run_batch(items: list[int]) -> list[int]:
        ran_on.append(threading.get_ident())
        return items

    batcher = DynamicBatcher(run_batch, max_batch_size=1, max_delay_s=0.0, workers=3)
    batcher.start()
    for item in range(6):
        assert _classify(batcher, item).value == item
        _until(lambda: len(batcher._idle) == 3)  # the worker is back among the idle ones
    batcher.close()
    assert len(ran_on) == 6 and len(set(ran_on)) == 1


def test_each_caller_of_a_failed_batch_gets_an_error_of_its_own() -> None:
    """One exception instance was set on every caller of a failed batch: each re-raise in its
    own handler thread added that thread's frames to the one traceback, so the k-th caller's
    logged traceback showed the k-1 others' frames (and kept their requests alive)."""

    class ModelNotReady(RuntimeError):
        pass

    batcher = DynamicBatcher(lambda items: (_ for _ in ()).throw(ModelNotReady("gpu lost")),
                             max_batch_size=4, max_delay_s=1.0)  # fmt: skip
    batcher.start()
    with batcher.admit() as second:
        outcomes: list = []
        first = threading.Thread(target=lambda: outcomes.append(_outcome(batcher, 1)))
        first.start()
        _until(lambda: len(batcher._pending) == 1)  # both in one batch
        second_result = second.submit(2)
    first.join()
    outcomes.append(second_result.exception(timeout=30))
    batcher.close()
    assert all(isinstance(o, ModelNotReady) and str(o) == "gpu lost" for o in outcomes), outcomes
    assert outcomes[0] is not outcomes[1]  # each its own, of the model's type, caused by it
    assert outcomes[0].__cause__ is outcomes[1].__cause__


def test_closing_does_not_wait_for_ever_on_a_model_call_that_never_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A model call that never returns (a wedged GPU) held the server's exit for good: closing
    joined the worker threads without a limit, and a second stop signal did nothing more."""
    stuck, release = threading.Event(), threading.Event()
    batcher = DynamicBatcher(_held_batches(stuck, release, 60), max_batch_size=1, max_delay_s=0.0)
    batcher.start()
    with batcher.admit() as admission:
        waiting = admission.submit(1)
    assert stuck.wait(10)
    started = time.monotonic()
    try:
        batcher.close(timeout_s=0.5)
        assert time.monotonic() - started < 5
        assert "batch-0 still running after" in caplog.text
    finally:
        release.set()
    assert waiting.result(timeout=10).value == 1  # the call itself, once it returns, answers
