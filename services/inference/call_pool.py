"""A thread pool for methods of grpcio's synchronous server: at most `limit` threads run their
calls, and a call still waiting for its request does not keep the others out.

A plain grpcio server is fastest at every concurrency because exactly one thread per core ever
takes a call and runs the model on it (docs/benchmarks.md); a `ThreadPoolExecutor` of that size
does that, but a client that opens a call and never sends its request then holds one of those
few threads until its deadline, and a handful of such clients stop the method. Here the handler
reads its request inside `waiting_for_request`: a wait longer than STALL_S gives its slot to the
next call (the pool starts a thread for it where none is idle), one longer than
`idle_timeout_s` is ended (its `on_timeout`, by default a cancel), and a thread whose request
came late waits for a slot before it runs the model. With every one of MAX_THREADS threads held
by such calls, the oldest is cancelled to make room; idle threads beyond `limit` end.

Written here because no library pool does this: `ThreadPoolExecutor` knows nothing of what its
work waits for. It subclasses `ThreadPoolExecutor` only because grpcio takes a method's own pool
(`experimental_thread_pool`) only from an instance of one; none of the base class's machinery is
used. Idle threads wait last in, first out, so the thread that ran the model last, whose caches
are warm, takes the next call.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

STALL_S = 0.02  # a request not in by then is stalled: its slot goes to another call
MAX_THREADS = 64  # stalled calls each hold a thread until they end: this many at most (default)
WARN_EVERY_S = 10.0  # a thread the system refuses is said in the log at most this often
_warned_at = -WARN_EVERY_S

log = logging.getLogger(__name__)


_current = threading.local()  # the work a pool thread runs now: when it came (queued_since)


def queued_since() -> float | None:
    """When the call the calling pool thread runs came to its pool (perf_counter); None off
    a pool thread. Its wait in the queue counts in its latency."""
    return getattr(_current, "queued_at", None)


@dataclass
class _Work:
    future: futures.Future[Any]
    run: Callable[[], Any]
    queued_at: float = field(default_factory=time.perf_counter)

    def __call__(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        _current.queued_at = self.queued_at
        try:
            result = self.run()
        except BaseException as exc:  # handed to the future, as ThreadPoolExecutor does
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


@dataclass(eq=False)
class _Thread:
    wake: threading.Event = field(default_factory=threading.Event)
    work: _Work | None = None


@dataclass(eq=False)
class Wait:
    """A handler's wait for its request, as the pool's watchdog sees it."""

    since: float
    context: grpc.ServicerContext
    on_timeout: Callable[[], None]
    stalled: bool = False
    cancelled: bool = False
    made_room: bool = False  # cancelled to make room (RESOURCE_EXHAUSTED), not for idling


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from a thread other than its handler's, with a status its client reads.

    The synchronous context can only cancel (its client reads CANCELLED, without a reason); the
    call underneath it cancels with a status (`grpc_call_cancel_with_status`), reached through
    grpcio's private `_rpc_event` (grpcio is pinned; tests/test_service_faults.py reads the
    status). Its handler's read of the request then raises grpc.RpcError."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)  # type: ignore[union-attr]
    except Exception:  # not grpcio's context, or its API moved: cancel without the reason
        log.debug("cancelling with a status failed; cancelling", exc_info=True)
        context.cancel()


def ends_within(context: grpc.ServicerContext, seconds: float) -> bool:
    """Whether the call ends within `seconds`. A request stream that ended without a request is
    either a client's half-close or the first sign of a cancel (its deadline, its client gone):
    grpcio hears the end of the stream a moment before the cancel, so only waiting tells."""
    ended = threading.Event()
    if not context.add_callback(ended.set):
        return True  # ended already
    return ended.wait(seconds)


class Places(Protocol):
    """A bound on calls held at once (CallLimit): a place is taken when a call comes."""

    def take(self) -> bool: ...

    def give_back(self) -> None: ...


def _start_thread(target: Callable[[], None], name: str) -> threading.Thread | None:
    """A daemon thread running `target`, started; None where the system refuses one (its
    thread limit), said in the log at most every WARN_EVERY_S."""
    global _warned_at
    thread = threading.Thread(target=target, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError as exc:  # "can't start new thread"
        if time.monotonic() - _warned_at > WARN_EVERY_S:
            _warned_at = time.monotonic()
            log.warning("a call pool could not start a thread (%s); its calls wait", exc)
        return None
    return thread


def _refuse_on_own_thread(work: _Work) -> None:
    """Run a call that found no place on a thread of its own, for its handler to refuse it.
    Without a thread its future is still settled, so that grpcio counts the call as ended (its
    client's deadline ends it): left pending, each took one of the server's places for good."""
    if _start_thread(work, "call-pool-refusal") is None:
        work.future.set_exception(RuntimeError("no thread to refuse the call on"))


FAILED_TICK_LOG_EVERY_S = 60.0  # a tick that keeps failing is said once a minute


class _Watchdog:
    """A pool's thread that ticks every STALL_S while it has something to watch (calls waiting
    for their request, spare threads, a shut-down to end on) and sleeps otherwise, until woken:
    an idle server is not woken 50 times a second. Its state is guarded by the pool's lock."""

    def __init__(
        self, lock: threading.Lock, to_watch: Callable[[], bool], tick: Callable[[], bool]
    ) -> None:
        self._wake = threading.Condition(lock)
        self._to_watch = to_watch  # called with the lock held
        self._tick = tick  # takes the lock itself; False: the pool has shut down
        self.asleep = False
        # Started with its pool, where a refused thread fails the server's start, not a call
        # (asleep, it costs nothing): a watchdog started by the first call could fail to start
        # just as that call's own thread did, and nothing would then try either again.
        self.thread = threading.Thread(target=self._run, name="call-pool-watchdog", daemon=True)
        self.thread.start()

    def wake_locked(self) -> None:
        """Wake it if it sleeps (the caller holds the pool's lock)."""
        if self.asleep:
            self.asleep = False
            self._wake.notify()

    def _run(self) -> None:
        said_at = -FAILED_TICK_LOG_EVERY_S
        while True:
            with self._wake:
                while not self._to_watch():
                    self.asleep = True
                    self._wake.wait()
                self.asleep = False
            time.sleep(STALL_S)
            try:
                going = self._tick()
            except Exception:  # one that ended here would leave every later stall unreaped
                if time.monotonic() - said_at >= FAILED_TICK_LOG_EVERY_S:  # not 50 a second
                    said_at = time.monotonic()
                    log.exception("the call pool's watchdog failed a tick; it goes on")
                going = True
            if not going:
                return


class CallPool(futures.ThreadPoolExecutor):
    """At most `limit` threads running calls; see the module's docstring.

    With `places`, a call takes a place as it comes, queued or not, and gives it back when its
    handler returns; a call that finds none runs at once on a thread of its own, where
    `refusing()` is true, for its handler to refuse it: queued unrefused, such calls filled
    gRPC's own limit on calls, and health checks were refused behind them."""

    def __init__(
        self,
        limit: int,
        idle_timeout_s: float,
        max_threads: int = MAX_THREADS,
        places: Places | None = None,
    ) -> None:
        super().__init__(max_workers=1)  # starts no thread: submit is this class's own
        self._limit = limit
        self._max_threads = max_threads
        self._places = places
        self._refusal = threading.local()
        self._idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # a slot freed
        # Guarded by `_lock`:
        self._queue: deque[_Work] = deque()
        self._idle: list[_Thread] = []  # last in, first out
        self._threads = 0
        self._running = 0  # threads holding a slot: running a call, not stalled on its request
        self._late = 0  # threads whose request came after they gave up their slot: served first
        self._waits: dict[int, Wait] = {}  # by thread id
        self._closed = False
        self._watchdog = _Watchdog(self._lock, self._to_watch_locked, self._tick)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        places = self._places
        if places is not None and not places.take():
            _refuse_on_own_thread(_Work(future, lambda: self._refused(fn, *args, **kwargs)))
            return future

        def run() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                if places is not None:
                    places.give_back()

        with self._lock:
            if self._closed:
                if places is not None:
                    places.give_back()
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.append(_Work(future, run))
            self._dispatch_locked()
        return future

    def refusing(self) -> bool:
        """Whether the calling handler's call found no place (see the class's docstring)."""
        return getattr(self._refusal, "on", False)

    def _refused(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._refusal.on = True
        return fn(*args, **kwargs)

    def set_limit(self, limit: int) -> None:
        """Let `limit` threads run calls from now on (the model's concurrency, once loaded)."""
        with self._lock:
            self._limit = limit
            self._room.notify_all()
            self._dispatch_locked()
            self._watchdog.wake_locked()  # spares past a lower limit end

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._watchdog.wake_locked()  # to end
        for thread in idle:
            thread.wake.set()  # with no work: it ends

    @contextlib.contextmanager
    def waiting_for_request(
        self, context: grpc.ServicerContext, on_timeout: Callable[[], None] | None = None
    ) -> Iterator[Wait]:
        """Around the handler's read of its request (see the module's docstring); past the idle
        timeout the watchdog calls `on_timeout` (by default the context's `cancel`). The wait's
        `cancelled` says, once the read is done, that the watchdog ended the call meanwhile."""
        wait = Wait(time.monotonic(), context, on_timeout or context.cancel)
        key = threading.get_ident()
        with self._lock:
            self._waits[key] = wait
            self._watchdog.wake_locked()
        read = False
        try:
            yield wait
            read = True
        finally:
            with self._lock:
                del self._waits[key]
                if wait.stalled:  # its slot went to another call: take one back to go on
                    # A read that failed only ends its call: it takes its slot back at once
                    # (one over the limit for a moment) rather than wait behind the model.
                    self._late += read
                    while read and self._running >= self._limit:
                        self._room.wait()
                    self._late -= read
                    self._running += 1
                    self._dispatch_locked()  # slots that waited for it, if any are free

    def _dispatch_locked(self) -> None:
        """Hand queued calls to idle threads, or new ones, while slots are free."""
        while self._startable_locked():
            if self._idle:
                thread = self._idle.pop()
            elif self._threads < self._max_threads:
                thread = _Thread()
                if _start_thread(functools.partial(self._serve, thread), "call-pool") is None:
                    # Raised, it would end grpcio's loop that takes calls: the call waits in
                    # the queue, and the watchdog tries again every tick while it does.
                    self._watchdog.wake_locked()
                    return
                self._threads += 1
            else:
                return
            thread.work = self._queue.popleft()
            self._running += 1
            thread.wake.set()

    def _serve(self, thread: _Thread) -> None:
        while True:
            thread.wake.wait()
            work, thread.work = thread.work, None
            if work is None:  # shut down, or reaped by the watchdog
                with self._lock:
                    self._threads -= 1
                return
            while work is not None:
                work()
                with self._lock:
                    self._running -= 1
                    self._room.notify()
                    work = None
                    if self._startable_locked():
                        work = self._queue.popleft()
                        self._running += 1
                    elif self._closed:
                        self._threads -= 1
                        return
                    else:
                        thread.wake.clear()
                        self._idle.append(thread)
                        if len(self._idle) > self._limit:  # a spare, for the watchdog to end
                            self._watchdog.wake_locked()

    def _startable_locked(self) -> bool:  # a call queued, a slot free, no late call ahead
        return bool(self._queue) and self._running < self._limit and not self._late

    def _to_watch_locked(self) -> bool:  # startable: a thread's start failed, tried each tick
        spare = len(self._idle) > self._limit
        return bool(self._waits) or self._startable_locked() or self._closed or spare

    def _tick(self) -> bool:
        """Free the slots of stalled calls, cancel those past the idle timeout, end spare
        threads; False once the pool is shut down."""
        now = time.monotonic()
        with self._lock:
            if self._closed:
                return False
            overdue = []
            for wait in self._waits.values():
                if not wait.stalled and now - wait.since > STALL_S:
                    wait.stalled = True
                    self._running -= 1
                    self._room.notify()
                if not wait.cancelled and now - wait.since > self._idle_timeout_s:
                    wait.cancelled = True
                    overdue.append(wait.on_timeout)
            overdue += self._make_room_locked()
            self._dispatch_locked()
            while len(self._idle) > self._limit:  # spares left by stalls: the coldest end
                self._idle.pop(0).wake.set()
        for end in overdue:
            try:
                end()
            except Exception:  # the watchdog must go on: it frees every other slot
                log.exception("cancelling a call whose request did not come failed")
        return True

    def _make_room_locked(self) -> list[Callable[[], None]]:
        """At MAX_THREADS, calls queued and every thread held by a stalled call (none running
        one), the oldest is cancelled rather than every call waiting for the timeout."""
        if not self._queue or self._idle or self._threads < self._max_threads:
            return []
        stalled = [w for w in self._waits.values() if w.stalled and not w.cancelled]
        if not stalled or len(stalled) < self._threads:
            return []
        oldest = min(stalled, key=lambda wait: wait.since)
        oldest.cancelled = oldest.made_room = True
        code, why = grpc.StatusCode.RESOURCE_EXHAUSTED, "ended to make room: its request never came"
        return [functools.partial(end_call, oldest.context, code, why)]


def queued_calls(*pools: CallPool) -> int:
    """Calls taken and waiting for a thread of `pools`: no handler has begun them, so no
    interceptor counts them (shutdown's account of the calls it drained does)."""
    total = 0
    for pool in pools:
        with pool._lock:
            total += len(pool._queue)
    return total
