"""`services/inference/call_pool.py` on its own: the slot accounting under calls whose requests
come at once, late or never. The contexts stand in for grpcio's servicer context, of which the
pool calls only `cancel()`; tests/test_plain_server.py drives the same pool through a real gRPC
server, and the service's tests through `vidflow serve`."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from services.inference import call_pool
from services.inference.call_pool import CallPool


class FakeContext:
    """What the pool calls on a servicer context: `cancel()`, which here ends the wait."""

    def __init__(self, fail: bool = False) -> None:
        self.request_came = threading.Event()
        self.cancelled = False
        self.fail = fail

    def cancel(self) -> None:
        self.cancelled = True
        self.request_came.set()
        if self.fail:
            raise RuntimeError("cancel failed")


class ModelCalls:
    """Counts the calls past their request at once, as the model would see them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def run(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(0.005)
        with self._lock:
            self.now -= 1


def _handler(pool: CallPool, model: ModelCalls, request_after_s: float | None) -> FakeContext:
    context = FakeContext()
    with pool.waiting_for_request(context):  # type: ignore[arg-type]
        context.request_came.wait(request_after_s)
    model.run()
    return context


def _settled(pool: CallPool) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (pool._running or pool._queue or pool._late):
        time.sleep(0.01)
    assert (pool._running, len(pool._queue), pool._late) == (0, 0, 0)


def test_at_most_limit_calls_run_whatever_their_requests_do() -> None:
    # A timeout well above the latest request (0.1 s), which a loaded machine may delay
    pool, model = CallPool(2, idle_timeout_s=1.5), ModelCalls()
    waits = [0.0, 0.0, 0.0, 0.05, 0.1, None] * 8  # None: the request never comes
    futures = [pool.submit(_handler, pool, model, wait) for wait in waits]
    contexts = [future.result(timeout=20) for future in futures]
    assert model.peak == 2  # both slots used, never a third
    cancelled = [context.cancelled for context in contexts]
    assert cancelled == [wait is None for wait in waits]  # only the requests that never came
    _settled(pool)


def test_at_the_thread_cap_the_oldest_stalled_call_makes_room() -> None:
    pool, model = CallPool(1, idle_timeout_s=30, max_threads=3), ModelCalls()
    stalled = [pool.submit(_handler, pool, model, None) for _ in range(3)]  # every thread held
    deadline = time.monotonic() + 10
    while len(pool._waits) < 3 or not all(wait.stalled for wait in list(pool._waits.values())):
        assert time.monotonic() < deadline, pool._waits
        time.sleep(0.01)
    waits = sorted(pool._waits.values(), key=lambda wait: wait.since)  # oldest first
    answered = pool.submit(_handler, pool, model, 0.0)
    answered.result(timeout=5)  # before: queued for the 30-s idle timeout
    assert sum(future.done() for future in stalled) == 1  # one made room, the others wait on
    # The one waiting longest (stop 57: any one of them passed).
    assert len(waits) == 3 and [wait.made_room for wait in waits] == [True, False, False]
    for wait in list(pool._waits.values()):  # end them for the test
        wait.context.cancel()
    assert all(future.result(timeout=5).cancelled for future in stalled)
    _settled(pool)


def test_a_cancel_that_fails_leaves_the_watchdog_running() -> None:
    pool, model = CallPool(1, idle_timeout_s=0.1), ModelCalls()

    def failing_handler() -> FakeContext:
        context = FakeContext(fail=True)
        with pool.waiting_for_request(context):  # type: ignore[arg-type]
            context.request_came.wait()
        return context

    assert pool.submit(failing_handler).result(timeout=5).cancelled
    later = pool.submit(_handler, pool, model, None).result(timeout=5)
    assert later.cancelled  # before: a dead watchdog, and this call held for ever
    _settled(pool)


def _switches(thread: threading.Thread) -> int:
    """How often the thread has given up the CPU: every tick of a watchdog's sleep is one."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def test_an_idle_pool_ends_its_spare_thread_then_its_watchdog_sleeps_until_a_call_waits() -> None:
    pool, model = CallPool(1, idle_timeout_s=0.3), ModelCalls()
    stalled = pool.submit(_handler, pool, model, 0.1)  # its slot goes to the next call's thread
    pool.submit(_handler, pool, model, 0.0).result(timeout=5)
    stalled.result(timeout=5)
    _settled(pool)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (pool._threads > 1 or not pool._watchdog.asleep):
        time.sleep(0.01)
    assert pool._threads == 1  # the spare ended
    watchdog = pool._watchdog.thread
    assert watchdog is not None and pool._watchdog.asleep
    time.sleep(0.05)  # past its last switches on the way to sleep
    before = _switches(watchdog)
    time.sleep(0.5)
    assert _switches(watchdog) - before <= 1  # before: a tick every 20 ms, ~25 here
    assert pool.submit(_handler, pool, model, None).result(timeout=5).cancelled  # it woke
    _settled(pool)


def test_a_thread_the_system_refuses_leaves_the_call_queued_until_one_starts(
    monkeypatch, caplog
) -> None:
    """At the system's thread limit, a failed start raised out of `submit` into grpcio's
    loop that takes calls, which then took none; now the call waits and the start is retried."""
    refusals = 3
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        nonlocal refusals
        if thread.name == "call-pool" and refusals:
            refusals -= 1
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(call_pool, "_warned_at", -1e9)
    pool, model = CallPool(1, idle_timeout_s=5), ModelCalls()
    with caplog.at_level("WARNING", logger="services.inference.call_pool"):
        answered = pool.submit(_handler, pool, model, 0.0)  # before: RuntimeError here
        assert not answered.result(timeout=5).cancelled
    assert refusals == 0 and caplog.text.count("could not start a thread") == 1
    _settled(pool)


class _NoPlaces:
    """Places of a server whose every place is taken."""

    def take(self) -> bool:
        return False

    def give_back(self) -> None:
        raise AssertionError("no place was taken")


def test_a_refusal_without_a_thread_still_ends_its_future(monkeypatch) -> None:
    """grpcio counts a call as held until its future ends: a refusal left pending for want of
    a thread held one of the server's places for good."""
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "call-pool-refusal":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    pool = CallPool(1, idle_timeout_s=5, places=_NoPlaces())
    refused = pool.submit(lambda: None)
    assert refused.done() and isinstance(refused.exception(), RuntimeError)  # before: pending


def test_the_watchdog_goes_on_after_a_tick_that_fails(caplog) -> None:
    """A watchdog thread that ended on an error would leave every later stalled call holding
    its slot; a tick cannot be made to fail for real, so this one fails its first on purpose."""
    ticks: list[int] = []

    def tick() -> bool:
        ticks.append(len(ticks))
        if len(ticks) <= 3:
            raise RuntimeError("tick failed")
        return len(ticks) < 5  # the fifth tick says the pool has shut down

    watchdog = call_pool._Watchdog(threading.Lock(), lambda: True, tick)
    watchdog.thread.join(10)
    assert not watchdog.thread.is_alive()
    assert ticks == [0, 1, 2, 3, 4]
    assert caplog.text.count("failed a tick") == 1  # said once, not at every tick


def test_at_the_thread_cap_a_running_call_is_waited_for_and_no_stalled_one_is_ended() -> None:
    """With a thread running a call, every thread is not held by a stalled call: its thread is
    about to be free. The rule read only "queued, none idle, at the cap", and ended a slow
    upload "to make room" on a server with room (a thread between its call and idle)."""
    pool, model = CallPool(2, idle_timeout_s=30, max_threads=3), ModelCalls()
    stalled = [pool.submit(_handler, pool, model, None) for _ in range(2)]
    time.sleep(0.2)  # both stalled: their slots are free
    release = threading.Event()
    running = pool.submit(release.wait, 5)  # the third thread, in a call
    time.sleep(0.05)
    queued = pool.submit(_handler, pool, model, 0.0)
    time.sleep(0.3)  # the watchdog ticks every 20 ms
    assert not any(future.done() for future in stalled)  # none ended to make room
    release.set()
    queued.result(timeout=5)  # the running call's thread took it
    assert running.result(timeout=5)
    for wait in list(pool._waits.values()):  # end them for the test
        wait.context.cancel()
    assert all(future.result(timeout=5).cancelled for future in stalled)
    _settled(pool)
