"""`l4lb.fastpoll`: the epoll dispatch loop without the per-event log context.

Each test drives its own, never-run `EPollReactor` with ``iterate``; the
suite's shared reactor is not touched.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import abstract, main
from twisted.internet.testing import MemoryReactorClock
from twisted.python import log

from l4lb import fastpoll

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class _Reader(abstract.FileDescriptor):
    """Reads one end of a socket pair; records what the reactor calls."""

    def __init__(self, sock: socket.socket, reactor: Any) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.calls: list[str] = []
        self.fail_on_lost = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> Any:
        data = self.sock.recv(100)
        self.calls.append(f"read {data!r}")
        return None if data else main.CONNECTION_DONE

    def connectionLost(self, reason: Any) -> None:
        self.calls.append("lost")
        super().connectionLost(reason)
        if self.fail_on_lost:
            raise RuntimeError("boom in connectionLost")


@pytest.fixture
def reactor() -> Iterator[Any]:
    reactor = epollreactor.EPollReactor()
    yield reactor
    for selectable in reactor.removeAll():
        selectable.sock.close()
    reactor.waker.connectionLost(None)  # closes its pipe
    reactor._poller.close()


class TestFastPoll:
    def test_only_twisted_epoll_reactor(self) -> None:
        """Other reactors (and test fakes) are left alone."""
        memory = MemoryReactorClock()
        assert not fastpoll.install(memory)
        assert "doIteration" not in vars(memory)

    def test_dispatches_reads_and_disconnects(self, reactor: Any) -> None:
        """Readiness reaches doRead, and an end of stream disconnects as before."""
        assert fastpoll.install(reactor)
        a, b = socket.socketpair()
        reader = _Reader(b, reactor)
        reactor.addReader(reader)
        a.send(b"hi")
        reactor.iterate(0)
        assert reader.calls == ["read b'hi'"]
        a.close()
        reactor.iterate(0)
        assert reader.calls == ["read b'hi'", "read b''", "lost"]
        assert reader not in reactor.getReaders()
        b.close()

    def test_error_in_handler_is_logged_and_loop_goes_on(self, reactor: Any) -> None:
        """An exception from a disconnect handler is logged; other events still run."""
        assert fastpoll.install(reactor)
        errors: list[dict[str, Any]] = []
        log.addObserver(errors.append)
        try:
            a1, b1 = socket.socketpair()
            a2, b2 = socket.socketpair()
            bad, good = _Reader(b1, reactor), _Reader(b2, reactor)
            bad.fail_on_lost = True
            reactor.addReader(bad)
            reactor.addReader(good)
            a1.close()
            a2.send(b"ok")
            reactor.iterate(0)
        finally:
            log.removeObserver(errors.append)
        assert "lost" in bad.calls
        assert good.calls == ["read b'ok'"]
        failures = [e for e in errors if e.get("isError")]
        assert len(failures) == 1
        assert failures[0]["failure"].check(RuntimeError)
        a2.close()
        b1.close()  # removed from the reactor; ``good`` is closed by the fixture
