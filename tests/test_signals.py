"""The stream commands' stop on SIGTERM and Ctrl-C (`stop_on_signals`)."""

from __future__ import annotations

import signal
import threading

import pytest

from common.processes import stop_on_signals


@pytest.fixture
def restored_handlers():
    """The test process's own SIGTERM and SIGINT handlers, put back after."""
    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in kept.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("restored_handlers")
def test_a_stop_signal_that_comes_inside_the_stop_s_own_wait_still_stops() -> None:
    """A handler runs on the main thread between two of its steps, and the main thread holds
    the event's lock for a moment in every `stop.wait()` (a broker's or a command's loop): a
    handler that set the event there waited for its own thread's lock for ever, and the command
    hung, deaf to every further SIGTERM. Here the handler runs where that lock is held by the
    thread it runs on, as it would inside the wait."""
    stop = stop_on_signals(threading.Event())
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler)
    returned = threading.Event()

    def inside_the_wait() -> None:
        with stop._cond:  # what Event.wait holds while it looks at the flag
            handler(signal.SIGTERM, None)
            returned.set()

    threading.Thread(target=inside_the_wait, daemon=True).start()
    assert returned.wait(5), "the handler never came back"
    assert stop.wait(5)  # and the stop was set once the lock was let go
    second_ctrl_c = signal.getsignal(signal.SIGINT)
    assert callable(second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the stop
        second_ctrl_c(signal.SIGINT, None)
