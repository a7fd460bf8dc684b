"""The dynamic batcher on a real event loop with a real worker thread."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import pytest

from services.inference.batcher import DynamicBatcher


def _recording_batcher(max_batch_size: int, max_delay_s: float, batches: list[list[int]]):
    def run_batch(items: list[int]) -> list[int]:
        batches.append(list(items))
        time.sleep(0.02)
        return [item * 10 for item in items]

    return DynamicBatcher(run_batch, max_batch_size=max_batch_size, max_delay_s=max_delay_s)


async def _classify(batcher: DynamicBatcher, item: int, arrival_delay_s: float = 0.0):
    with batcher.admit() as admission:
        await asyncio.sleep(arrival_delay_s)  # a request still being received
        return await admission.submit(item)


def test_concurrent_requests_share_batches_up_to_the_limit() -> None:
    async def scenario():
        batches: list[list[int]] = []
        batcher = _recording_batcher(4, 1.0, batches)
        batcher.start()
        results = await asyncio.gather(*(_classify(batcher, i) for i in range(10)))
        await batcher.close()
        return batches, results

    batches, results = asyncio.run(scenario())
    assert [r.value for r in results] == [i * 10 for i in range(10)]
    assert sorted(i for batch in batches for i in batch) == list(range(10))
    assert max(len(b) for b in batches) == 4
    assert len(batches) == 3
    assert all(r.batch_size == len(b) for b in batches for r in results if r.value // 10 in b)


def test_a_lone_request_is_not_held_back() -> None:
    async def scenario():
        batcher = _recording_batcher(8, 5.0, [])
        batcher.start()
        started = time.perf_counter()
        result = await _classify(batcher, 7)
        elapsed = time.perf_counter() - started
        await batcher.close()
        return result, elapsed

    result, elapsed = asyncio.run(scenario())
    assert result.value == 70 and result.batch_size == 1
    assert elapsed < 2.5  # the 5 s delay never applied (the model call itself takes 20 ms)


def test_a_batch_waits_for_requests_on_their_way_but_not_past_the_delay() -> None:
    async def scenario(delay_s: float):
        batches: list[list[int]] = []
        batcher = _recording_batcher(8, delay_s, batches)
        batcher.start()
        await asyncio.gather(_classify(batcher, 1), _classify(batcher, 2, arrival_delay_s=0.1))
        await batcher.close()
        return batches

    assert asyncio.run(scenario(delay_s=1.0)) == [[1, 2]]  # waited 0.1 s for the second
    assert asyncio.run(scenario(delay_s=0.01)) == [[1], [2]]  # did not wait past 10 ms


def test_a_failing_batch_fails_each_caller_and_the_batcher_goes_on() -> None:
    calls = []

    def run_batch(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return items

    async def scenario():
        batcher = DynamicBatcher(run_batch, max_batch_size=4, max_delay_s=0.0)
        batcher.start()
        with pytest.raises(RuntimeError, match="model exploded"):
            await _classify(batcher, 1)
        result = await _classify(batcher, 2)
        await batcher.close()
        return result

    assert asyncio.run(scenario()).value == 2


def test_workers_run_batches_at_once_each_taking_its_own() -> None:
    # Each batch waits at the barrier for another batch to be running: one worker would time out.
    both_running = threading.Barrier(2, timeout=10)

    def run_batch(items: list[int]) -> list[int]:
        both_running.wait()
        return [item + 100 for item in items]

    async def scenario():
        batcher = DynamicBatcher(run_batch, max_batch_size=1, max_delay_s=0.0, workers=2)
        batcher.start()
        results = await asyncio.gather(_classify(batcher, 1), _classify(batcher, 2))
        await batcher.close()
        return results

    assert [r.value for r in asyncio.run(scenario())] == [101, 102]


def test_a_model_that_loses_results_fails_its_callers_clearly_and_the_batcher_goes_on() -> None:
    def run_batch(items: list[int]) -> list[int]:
        return items[:-1] if len(items) > 1 else items  # drops one result of a real batch

    async def scenario():
        batcher = DynamicBatcher(run_batch, max_batch_size=4, max_delay_s=1.0)
        batcher.start()
        # The second arrives while the first waits for it, so both share one batch.
        outcomes = await asyncio.gather(
            _classify(batcher, 1), _classify(batcher, 2, arrival_delay_s=0.05),
            return_exceptions=True,
        )  # fmt: skip
        after = await _classify(batcher, 3)
        await batcher.close()
        return outcomes, after

    outcomes, after = asyncio.run(scenario())
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

    async def scenario():
        batcher = DynamicBatcher(run_batch, max_batch_size=4, max_delay_s=0.0)
        batcher.start()
        first = asyncio.ensure_future(_classify(batcher, 1))
        while not batches:  # the worker has taken the first batch
            await asyncio.sleep(0.01)
        abandoned = asyncio.ensure_future(_classify(batcher, 2))
        await asyncio.sleep(0.05)
        abandoned.cancel()
        await asyncio.sleep(0.05)
        release.set()
        results = [await first, await _classify(batcher, 3)]
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert [r.value for r in results] == [1, 3]
    assert batches == [[1], [3]]


def test_closing_fails_what_is_still_queued_after_the_running_batch_ends() -> None:
    release = threading.Event()
    started = threading.Event()

    def run_batch(items: list[int]) -> list[int]:
        started.set()
        release.wait(10)
        return items

    async def scenario():
        batcher = DynamicBatcher(run_batch, max_batch_size=1, max_delay_s=0.0)
        batcher.start()
        running = asyncio.ensure_future(_classify(batcher, 1))
        await asyncio.to_thread(started.wait, 10)
        queued = asyncio.ensure_future(_classify(batcher, 2))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.05)
        release.set()
        await closing
        return await running, await asyncio.gather(queued, return_exceptions=True)

    finished, (refused,) = asyncio.run(scenario())
    assert finished.value == 1
    assert isinstance(refused, RuntimeError) and "shutting down" in str(refused)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice: Linux")
def test_model_workers_run_lowered_and_the_event_loop_does_not() -> None:
    """Workers run the model `worker_niceness` steps below the loop, which keeps its priority."""
    seen: list[int] = []

    def run_batch(items: list[int]) -> list[int]:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return items

    async def scenario() -> int:
        batcher = DynamicBatcher(
            run_batch, max_batch_size=1, max_delay_s=0.0, workers=2, worker_niceness=5
        )
        batcher.start()
        await asyncio.gather(*(_classify(batcher, item) for item in range(4)))
        await batcher.close()
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    loop_priority = asyncio.run(scenario())
    assert loop_priority == before
    assert seen and set(seen) == {min(19, before + 5)}


def test_a_request_handed_straight_to_a_worker_wakes_the_one_idle_last() -> None:
    """One request at a time keeps going to the same (warm) worker, never round the pool."""
    ran_on: list[int] = []

    def run_batch(items: list[int]) -> list[int]:
        ran_on.append(threading.get_ident())
        return items

    async def scenario() -> None:
        batcher = DynamicBatcher(run_batch, max_batch_size=1, max_delay_s=0.0, workers=3)
        batcher.start()
        for item in range(6):
            assert (await _classify(batcher, item)).value == item
            await asyncio.sleep(0.01)  # the worker is back among the idle ones
        await batcher.close()

    asyncio.run(scenario())
    assert len(ran_on) == 6 and len(set(ran_on)) == 1
