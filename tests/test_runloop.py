"""`l4lb.runloop`: the main loop that skips Twisted's per-pass timer bookkeeping.

Each test runs its own `EPollReactor` (never the suite's shared reactor),
without signal handlers, except the signal test, which runs one in a child
process. ``TestTwistedPrivateAPI`` fails loudly if Twisted changes what the
loop relies on.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import abstract, base
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher

from l4lb import fastpoll, runloop

epollreactor = pytest.importorskip("twisted.internet.epollreactor")

SAFETY = 30.0  # seconds: a test whose loop hangs stops here and fails


@pytest.fixture
def reactor() -> Iterator[Any]:
    """A fresh epoll reactor with fastpoll and runloop installed."""
    reactor = epollreactor.EPollReactor()
    assert fastpoll.install(reactor)
    assert runloop.install(reactor)
    yield reactor
    if reactor.waker is not None:
        reactor.waker.connectionLost(None)  # closes its pipe
    reactor._poller.close()


def run(reactor: Any) -> bool:
    """Run ``reactor`` until it stops; False if the safety timer had to stop it."""
    hung: list[bool] = []

    def stop() -> None:
        hung.append(True)
        reactor.stop()

    safety = reactor.callLater(SAFETY, stop)
    reactor.run(installSignalHandlers=False)
    if safety.active():
        safety.cancel()
    return not hung


class TestInstall:
    def test_only_twisted_epoll_reactor(self) -> None:
        """Other reactors (and test fakes) keep their own main loop."""
        memory = MemoryReactorClock()
        assert not runloop.install(memory)
        assert "mainLoop" not in vars(memory)

    def test_installed_on_the_instance(self, reactor: Any) -> None:
        assert vars(reactor)["mainLoop"].func is runloop.main_loop
        assert "mainLoop" not in vars(epollreactor.EPollReactor)


class TestMainLoop:
    def test_timers_fire_in_order_and_shutdown_triggers_run(self, reactor: Any) -> None:
        """Due timers fire by time then by order of creation, cancelled ones
        never; timers added by timers fire too; stop() runs the triggers."""
        fired: list[str] = []
        reactor.callLater(0.02, fired.append, "b")
        reactor.callLater(0.01, fired.append, "a")
        reactor.callLater(0.02, fired.append, "c")
        reactor.callLater(0.015, fired.append, "never").cancel()

        def chain() -> None:
            fired.append("d")
            reactor.callLater(0, fired.append, "e")
            reactor.callLater(0.01, reactor.stop)

        reactor.callLater(0.03, chain)
        for phase in ("before", "during", "after"):
            reactor.addSystemEventTrigger(phase, "shutdown", fired.append, phase)
        assert run(reactor)
        assert fired == ["a", "b", "c", "d", "e", "before", "during", "after"]

    @pytest.mark.parametrize("timer", [None, 1000.0])
    def test_poll_timeout(self, reactor: Any, timer: float | None) -> None:
        """Without timers the poll blocks (None); with one, it waits until the
        timer is due: on the pass that inserts it (Twisted's ``timeout``) and
        on the next ones (computed by runloop)."""
        timeouts: list[float | None] = []

        def recording(timeout: float | None) -> None:
            timeouts.append(timeout)  # no poll: it could block
            if len(timeouts) == 3:
                reactor.crash()

        reactor.doIteration = recording
        if timer is not None:
            reactor.callLater(timer, lambda: None)
        reactor.run(installSignalHandlers=False)
        if timer is None:
            assert timeouts == [None, None, None]
        else:
            assert all(t is not None and timer - 10 < t <= timer for t in timeouts)
            assert timeouts == sorted(timeouts, reverse=True)

    def test_call_from_thread_wakes_a_blocked_loop(self, reactor: Any) -> None:
        """The loop is blocked in a long poll (only the safety timer, 30 s
        away): a thread's call must wake it and run at once."""
        ran: list[str] = []
        blocked = threading.Event()
        poll = reactor.doIteration

        def watched(timeout: float | None) -> None:
            if timeout is None or timeout > 1:
                blocked.set()  # about to block: no timer work left
            poll(timeout)

        reactor.doIteration = watched

        def in_thread() -> None:
            assert blocked.wait(SAFETY)
            reactor.callFromThread(ran.append, threading.current_thread().name)
            reactor.callFromThread(reactor.stop)

        thread = threading.Thread(target=in_thread, name="helper")
        reactor.callWhenRunning(thread.start)
        began = time.monotonic()
        assert run(reactor)
        thread.join()
        assert ran == ["helper"]
        assert time.monotonic() - began < SAFETY / 2

    def test_stop_from_an_event_handler(self, reactor: Any) -> None:
        """stop() called while handling I/O (not from a timer or a thread
        call): the next pass must fire the shutdown triggers at once."""
        a, b = socket.socketpair()
        stopped: list[str] = []

        class Stopper(abstract.FileDescriptor):
            def fileno(self) -> int:
                return b.fileno()

            def doRead(self) -> None:
                b.recv(10)
                reactor.removeReader(self)
                reactor.stop()

        reactor.addSystemEventTrigger("before", "shutdown", stopped.append, "yes")
        reactor.addReader(Stopper(reactor))
        reactor.callWhenRunning(a.send, b"x")
        began = time.monotonic()
        try:
            assert run(reactor)
        finally:
            a.close()
            b.close()
        assert stopped == ["yes"]
        assert time.monotonic() - began < SAFETY / 2

    def test_error_in_a_pass_is_logged_and_the_loop_goes_on(self, reactor: Any) -> None:
        """As with Twisted's ``_topHandler``: logged critical, next pass runs."""
        poll = reactor.doIteration
        failures: list[int] = []

        def failing_once(timeout: float | None) -> None:
            if not failures:
                failures.append(1)
                raise RuntimeError("boom in the poll")
            poll(timeout)

        reactor.doIteration = failing_once
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        fired: list[int] = []
        try:
            reactor.callLater(0.01, fired.append, 1)
            reactor.callLater(0.02, reactor.stop)
            assert run(reactor)
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert fired == [1]
        errors = [e for e in events if "log_failure" in e]
        assert len(errors) == 1
        assert errors[0]["log_level"] is LogLevel.critical
        assert errors[0]["log_format"] == "Unexpected error in main loop"
        assert errors[0]["log_failure"].check(RuntimeError)

    def test_cancelled_timers_are_compacted(self, reactor: Any) -> None:
        """Timers cancelled while handling I/O: the next pass lets Twisted
        rebuild its heap, as its own loop does."""
        timers = [reactor.callLater(1000 + i, lambda: None) for i in range(200)]
        a, b = socket.socketpair()
        cancelled: list[bool] = []
        sizes: list[int] = []
        poll = reactor.doIteration

        class Canceller(abstract.FileDescriptor):
            def fileno(self) -> int:
                return b.fileno()

            def doRead(self) -> None:
                b.recv(10)
                reactor.removeReader(self)
                for timer in timers[:150]:
                    timer.cancel()
                cancelled.append(True)

        def watched(timeout: float | None) -> None:
            if cancelled and not sizes:
                sizes.append(len(reactor._pendingTimedCalls))
                reactor.stop()
                timeout = 0
            poll(timeout)

        reactor.doIteration = watched
        reactor.addReader(Canceller(reactor))
        reactor.callWhenRunning(a.send, b"x")
        try:
            assert run(reactor)
        finally:
            a.close()
            b.close()
            for timer in timers[150:]:
                timer.cancel()
        assert sizes == [51]  # 50 timers left and the safety timer

    def test_crash_leaves_the_loop(self, reactor: Any) -> None:
        reactor.callLater(0, reactor.crash)
        safety = reactor.callLater(SAFETY, reactor.crash)
        reactor.run(installSignalHandlers=False)
        assert safety.active()
        safety.cancel()


_SIGNAL_CHILD = """
import sys
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor
from l4lb import fastpoll, runloop
assert fastpoll.install(reactor) and runloop.install(reactor)
reactor.addSystemEventTrigger("before", "shutdown", print, "shutdown", flush=True)
reactor.callWhenRunning(print, "ready", flush=True)
reactor.run()
print("stopped", flush=True)
"""


def test_signal_wakes_a_blocked_loop_and_stops_it() -> None:
    """SIGTERM reaches a loop blocked in epoll with no timer at all."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SIGNAL_CHILD)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGTERM)
        out, _ = child.communicate(timeout=SAFETY)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert out.split() == ["shutdown", "stopped"]
    assert child.returncode == 0


# What l4lb.runloop was checked against: Twisted's main loop and the methods
# whose work it skips when they have none. A change here means re-reading
# them and l4lb/runloop.py's conditions, then updating the digests.
_CHECKED = {
    "mainLoop": "421c59cabb4e63c1",
    "runUntilCurrent": "461bb58be3c72108",
    "timeout": "a7879e4dbc964421",
    "_insertNewDelayedCalls": "fa57ecd82fbf80aa",
    "callFromThread": "d0a41f4c1d08bd44",
    "stop": "6177127abab95c10",
    "_cancelCallLater": "d8e24bd32e8128e4",
}


def _digest(name: str) -> str:
    source = textwrap.dedent(inspect.getsource(getattr(base.ReactorBase, name)))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


class TestTwistedPrivateAPI:
    """Loud failures if Twisted changes what l4lb.runloop relies on."""

    @pytest.mark.parametrize("name", sorted(_CHECKED))
    def test_loop_code_unchanged(self, name: str) -> None:
        assert _digest(name) == _CHECKED[name], (
            f"Twisted's ReactorBase.{name} changed: check l4lb/runloop.py's "
            "fast-path conditions still match it, then update _CHECKED"
        )

    def test_epoll_reactor_uses_base_loop(self) -> None:
        """EPollReactor must not override what runloop mirrors."""
        for name in _CHECKED:
            owner = next(
                c for c in epollreactor.EPollReactor.__mro__ if name in vars(c)
            )
            assert owner is base.ReactorBase, name

    def test_state_attributes(self, reactor: Any) -> None:
        """The private state runloop reads exists, with the meaning it assumes."""
        assert reactor._started is False
        assert reactor._justStopped is False
        assert reactor.threadCallQueue == []
        assert reactor._newTimedCalls == []
        assert reactor._pendingTimedCalls == []
        assert reactor._cancellations == 0
        call = reactor.callLater(5, lambda: None)
        assert reactor._newTimedCalls == [call]
        reactor.runUntilCurrent()
        assert reactor._newTimedCalls == []
        assert reactor._pendingTimedCalls == [call]
        assert call.time == pytest.approx(reactor.seconds() + 5, abs=1)
        call.cancel()
        assert reactor._cancellations == 1
        reactor.callFromThread(lambda: None)
        assert len(reactor.threadCallQueue) == 1
        reactor.runUntilCurrent()
        assert reactor.threadCallQueue == []
