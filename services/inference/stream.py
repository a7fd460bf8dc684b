"""ClassifyStream's flow: requests worked on concurrently (so one stream fills batches), answered
in order, with a window on what one stream holds and an end for a stream that idles.

The handler thread answers; a reader thread of the stream's own reads its requests, since
grpcio's synchronous request iterator blocks until the next one comes.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

# Requests of one ClassifyStream processed at once; enough to fill batches from a single stream.
STREAM_WINDOW = 32
# ... and their image bytes at most (one request always goes, whatever its size): 32 requests of
# --max-message-bytes each would hold 512 MiB for one stream (a review's stream of 64 images of
# 12.8 MB each took a server from 1.2 to 2.35 GB). Each is held about twice: protobuf (upb) hands
# out a copy of a message's bytes, kept by the batch beside the message itself.
STREAM_WINDOW_BYTES = 32 * 1024 * 1024


# How often the send watch looks at the streams' answers in sending.
SEND_WATCH_EVERY_S = 0.5


class StreamIdleError(TimeoutError):
    """The stream had nothing in flight and sent no request for its idle timeout."""


class StreamClosedError(RuntimeError):
    """The stream was closed (its call ended) while it was being answered."""


RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

_END = object()  # the reader's last entry, however its reading ended


class AnswersInOrder(Generic[RequestT, ResponseT]):
    """Each request's response in request order, with at most `window` of them started and not
    yet answered, and no more than `window_bytes` of their `size` (unless one alone is larger):
    no further request is read meanwhile, so a client's stream waits in gRPC's flow control,
    not in this server's memory.

    `start` begins one request's work and returns its future response (an item answers its
    errors as a response, so its future fails only if cancelled). Whatever is left unanswered
    when the stream ends or is closed is cancelled, every started item included: an item is
    queued the moment it starts, under the lock that closing takes.

    With `idle_timeout_s`, a stream that has nothing in flight and sends no request for that
    long raises StreamIdleError once its answers are out: an idle client holds a call's place.
    So does a client that stops reading answers: with `on_unread`, an answer in sending for
    that long has `on_unread` called (SendWatch), which ends the call.
    """

    def __init__(
        self,
        requests: Iterator[RequestT],
        start: Callable[[RequestT], Future[ResponseT]],
        window: int = STREAM_WINDOW,
        size: Callable[[RequestT], int] = lambda _: 0,
        window_bytes: int = STREAM_WINDOW_BYTES,
        idle_timeout_s: float | None = None,
        on_unread: Callable[[], None] | None = None,
    ) -> None:
        self._requests, self._start, self._size = requests, start, size
        self._window, self._window_bytes = window, window_bytes
        self._idle_timeout_s, self.on_unread = idle_timeout_s, on_unread
        # Since when an answer has been handed to gRPC to send (None: none in sending); set and
        # read without the lock (one float, the send watch reads it)
        self.sending_since: float | None = None
        self._lock = threading.Condition()  # told each time an answer frees its share, or closing
        # Guarded by `_lock`:
        self._held_requests = self._held_bytes = 0
        self._closed = False
        self._answering: Future[ResponseT] | None = None  # the item the answers wait for
        self._last_moved = time.monotonic()
        self._in_order: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name="stream-reader", daemon=True)

    def __iter__(self) -> Iterator[ResponseT]:
        self._reader.start()
        if self._idle_timeout_s is not None and self.on_unread is not None:
            SEND_WATCH.watch(self, self._idle_timeout_s)
        try:
            while (item := self._next_item()) is not _END:
                if isinstance(item, BaseException):
                    raise item  # reading the request stream failed
                future, nbytes = item  # type: ignore[misc]
                with self._lock:
                    if self._closed:
                        future.cancel()
                    self._answering = future
                try:
                    response = future.result()
                except CancelledError:
                    raise StreamClosedError("the stream was closed") from None
                self._release(nbytes)
                self.sending_since = time.monotonic()
                yield response  # grpcio sends it, then asks for the next
                self.sending_since = None
                self._moved()
        finally:
            self.close()

    def close(self) -> None:
        """Stop reading and cancel every item not yet answered; safe from any thread (a call's
        end callback) and more than once."""
        SEND_WATCH.unwatch(self)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            if self._answering is not None:
                self._answering.cancel()
            while True:
                try:
                    item = self._in_order.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, tuple):
                    item[0].cancel()
            self._in_order.put(_END)  # wakes an answering thread waiting for the next item

    def _read(self) -> None:
        try:
            for request in self._requests:
                self._moved()
                nbytes = self._size(request)
                with self._lock:
                    self._lock.wait_for(functools.partial(self._room_for, nbytes))
                    if self._closed:
                        return
                    self._held_requests += 1
                    self._held_bytes += nbytes
                    self._in_order.put((self._start(request), nbytes))
        except BaseException as exc:  # handed to the answering thread
            self._in_order.put(exc)
        finally:
            self._in_order.put(_END)

    def _room_for(self, nbytes: int) -> bool:
        """Closed, or room for a request of `nbytes` (one always goes alone, however large)."""
        return self._closed or (
            self._held_requests < self._window
            and (self._held_bytes == 0 or self._held_bytes + nbytes <= self._window_bytes)
        )

    def _release(self, nbytes: int) -> None:
        """An answer is ready: its share of the window is free, and the stream has moved (an
        item slower than the idle timeout does not leave it idle)."""
        with self._lock:
            self._held_requests -= 1
            self._held_bytes -= nbytes
            self._last_moved = time.monotonic()
            self._lock.notify_all()

    def _moved(self) -> None:
        with self._lock:
            self._last_moved = time.monotonic()

    def _next_item(self) -> object:
        """The reader's next entry; StreamIdleError once idle for the timeout."""
        while True:
            with self._lock:
                wait_s = None
                if self._idle_timeout_s is not None and not self._held_requests:
                    wait_s = self._last_moved + self._idle_timeout_s - time.monotonic()
            try:
                return self._in_order.get(timeout=max(wait_s, 0) if wait_s is not None else None)
            except queue.Empty:
                with self._lock:
                    quiet_s = time.monotonic() - self._last_moved
                    if not self._held_requests and quiet_s >= (self._idle_timeout_s or 0):
                        raise StreamIdleError(
                            f"no request and nothing in flight for {quiet_s:.0f} s"
                        ) from None


class SendWatch:
    """Calls `on_unread` of each stream whose answer has been in sending for longer than its
    timeout. A client that stops reading answers leaves the stream's handler thread inside
    grpcio's send, waiting for HTTP/2 flow-control window that never comes back, where no
    check of the stream's own runs: the call held its place, threads and images for ever (found
    in review, stop 62). gRPC has no send timeout; one thread watches every stream of the
    process, started with the first, asleep while none is watched."""

    def __init__(self, every_s: float = SEND_WATCH_EVERY_S) -> None:
        self.every_s = every_s
        self._lock = threading.Condition()
        self._timeouts: dict[AnswersInOrder[object, object], float] = {}  # guarded by `_lock`
        self._thread: threading.Thread | None = None

    def watch(self, answers: AnswersInOrder[object, object], timeout_s: float) -> None:
        with self._lock:
            self._timeouts[answers] = timeout_s
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="send-watch", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def unwatch(self, answers: AnswersInOrder[object, object]) -> None:
        with self._lock:
            self._timeouts.pop(answers, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._timeouts))
                now = time.monotonic()
                stuck = [
                    answers
                    for answers, timeout_s in self._timeouts.items()
                    if (since := answers.sending_since) is not None and now - since >= timeout_s
                ]
                for answers in stuck:
                    del self._timeouts[answers]
            for answers in stuck:
                try:
                    answers.on_unread()  # type: ignore[misc]
                except Exception:  # the watch goes on for the other streams
                    log.exception("a stream whose answers were not read could not be ended")
            time.sleep(self.every_s)


SEND_WATCH = SendWatch()
