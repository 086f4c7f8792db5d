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

    def test_failing_doRead_is_logged_and_disconnects(self, reactor: Any) -> None:
        """As Twisted's _doReadOrWrite: the error is logged, the selectable lost."""
        assert fastpoll.install(reactor)
        errors: list[dict[str, Any]] = []
        log.addObserver(errors.append)
        a, b = socket.socketpair()
        try:
            reader = _Reader(b, reactor)
            reader.doRead = lambda: 1 / 0  # type: ignore[method-assign]
            reactor.addReader(reader)
            a.send(b"x")
            reactor.iterate(0)
        finally:
            log.removeObserver(errors.append)
        failures = [e for e in errors if e.get("isError")]
        assert len(failures) == 1
        assert failures[0]["failure"].check(ZeroDivisionError)
        assert reader.calls == ["lost"]
        assert reader not in reactor.getReaders()
        a.close()
        b.close()


class TestLeanInterest:
    """`fastpoll.install` also swaps in leaner add/remove reader/writer methods."""

    def test_twisted_private_attributes(self) -> None:
        """Fails loudly if the epoll reactor's bookkeeping changes."""
        fresh = epollreactor.EPollReactor()
        try:
            assert isinstance(fresh._reads, set) and isinstance(fresh._writes, set)
            assert isinstance(fresh._selectables, dict)
            assert hasattr(fresh._poller, "modify")
            continuous = fresh._continuousPolling
            assert isinstance(continuous._readers, set)
            assert isinstance(continuous._writers, set)
        finally:
            fresh.waker.connectionLost(None)
            fresh._poller.close()

    def test_same_bookkeeping_as_twisted(self, reactor: Any) -> None:
        """Every transition leaves the sets and epoll as Twisted's methods do."""
        plain = epollreactor.EPollReactor()
        assert fastpoll.install(reactor)
        pairs = []
        try:
            for r in (plain, reactor):
                a, b = socket.socketpair()
                pairs.append((a, b))
                sel = _Reader(b, r)
                steps = [
                    r.addReader,
                    r.addReader,
                    r.addWriter,
                    r.removeReader,
                    r.removeReader,
                    r.addReader,
                    r.removeWriter,
                    r.removeWriter,
                    r.removeReader,
                    r.addWriter,
                    r.removeWriter,
                ]
                states = []
                for step in steps:
                    step(sel)
                    fd = sel.fileno()
                    states.append(
                        (fd in r._reads, fd in r._writes, r._selectables.get(fd) is sel)
                    )
                if r is plain:
                    expected = states
            assert states == expected
            # And epoll agrees: a writer-only registration reports writability.
            a, b = pairs[1]
            sel = _Reader(b, reactor)
            reactor.addWriter(sel)
            assert [fd for fd, _ in reactor._poller.poll(0)] == [b.fileno()]
            reactor.removeWriter(sel)
            assert reactor._poller.poll(0) == []
        finally:
            for a, b in pairs:
                a.close()
                b.close()
            plain.waker.connectionLost(None)
            plain._poller.close()

    def test_regular_file_falls_back_to_continuous_polling(
        self, reactor: Any, tmp_path: Any
    ) -> None:
        """epoll refuses regular files (EPERM): Twisted's methods take over."""
        assert fastpoll.install(reactor)
        with open(tmp_path / "f", "w") as f:

            class FileReader(abstract.FileDescriptor):
                def fileno(self) -> int:
                    return f.fileno()

            sel = FileReader(reactor)
            reactor.addReader(sel)
            assert reactor._continuousPolling.isReading(sel)
            assert f.fileno() not in reactor._reads
            reactor.removeReader(sel)
            assert not reactor._continuousPolling.isReading(sel)

    def test_closed_selectable_is_found_by_identity(self, reactor: Any) -> None:
        """A selectable whose fileno() is already -1 is removed as Twisted does."""
        assert fastpoll.install(reactor)
        a, b = socket.socketpair()
        sel = _Reader(b, reactor)
        reactor.addReader(sel)
        fd = b.fileno()
        sel.fileno = lambda: -1  # type: ignore[method-assign]
        reactor.removeReader(sel)
        assert fd not in reactor._reads and fd not in reactor._selectables
        a.close()
        b.close()
