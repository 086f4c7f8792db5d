"""`l4lb.closing`: closing plain TCP transports without the writable round trip."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import abstract, defer, error, main, posixbase, reactor, task, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python import failure
from zope.interface import implementer

from l4lb import closing, fastpoll

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


@implementer(IHalfCloseableProtocol)
class _Side(Protocol):
    """The accepted side: records what its transport tells it."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.lost: defer.Deferred[Any] = defer.Deferred()

    def readConnectionLost(self) -> None:
        self.events.append("eof")

    def writeConnectionLost(self) -> None:
        self.events.append("write closed")

    def connectionLost(self, reason: Any = None) -> None:
        self.events.append("lost")
        self.reason = reason
        self.lost.callback(None)


class _Accepted:
    """A listening port whose accepted transports the test gets."""

    def __init__(self) -> None:
        self.sides: defer.DeferredQueue[_Side] = defer.DeferredQueue()
        self.port = reactor.listenTCP(
            0, Factory.forProtocol(self._build), interface="127.0.0.1"
        )

    def _build(self) -> _Side:
        side = _Side()
        reactor.callLater(0, self.sides.put, side)
        return side

    async def connect(self) -> tuple[socket.socket, _Side]:
        peer = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        peer.settimeout(5)
        return peer, await self.sides.get()


async def _until(condition: Any, timeout: float = 5.0) -> None:
    """Let the reactor run until ``condition()`` holds (polled, with a deadline)."""
    deadline = reactor.seconds() + timeout
    while not condition():
        assert reactor.seconds() < deadline, "timed out"
        await task.deferLater(reactor, 0.005, lambda: None)


@pytest.fixture
def accepted() -> Iterator[_Accepted]:
    lab = _Accepted()
    yield lab
    lab.port.stopListening()


class TestTwistedPrivateAPI:
    """Fails loudly if the Twisted internals `l4lb.closing` relies on change."""

    def test_attributes_and_methods(self) -> None:
        fd = abstract.FileDescriptor.__new__(abstract.FileDescriptor)
        for name in ("disconnecting", "_writeDisconnecting", "_writeDisconnected"):
            assert hasattr(abstract.FileDescriptor, name), name
        abstract.FileDescriptor.__init__(fd, reactor)
        assert (fd.dataBuffer, fd.offset, fd._tempDataLen) == (b"", 0, 0)
        assert tcp.Connection._aborting is False
        assert callable(tcp.Connection._closeWriteConnection)
        assert callable(posixbase.PosixReactorBase._disconnectSelectable)
        # loseConnection is a no-op once `disconnecting` is set.
        assert (
            "disconnecting" in abstract.FileDescriptor.loseConnection.__code__.co_names
        )

    def test_doWrite_closes_the_way_drain_does(self) -> None:
        """Twisted's doWrite ends a flushed close with CONNECTION_DONE, which the
        reactor hands to _disconnectSelectable: what `drain` calls."""
        names = abstract.FileDescriptor.doWrite.__code__.co_names
        assert "_postLoseConnection" in names and "_closeWriteConnection" in names
        assert abstract.FileDescriptor._postLoseConnection(None) is main.CONNECTION_DONE  # type: ignore[arg-type]

    def test_drain_does_what_disconnectSelectable_does(self) -> None:
        """`drain` calls ``connectionLost`` directly: the reactor's
        ``_disconnectSelectable`` (not after a read) only removes the reader and
        writer first, which ``FileDescriptor.connectionLost`` does again."""
        names = (
            posixbase._DisconnectSelectableMixin._disconnectSelectable.__code__.co_names
        )
        assert {"removeReader", "removeWriter", "connectionLost"} <= set(names)
        lost = abstract.FileDescriptor.connectionLost.__code__.co_names
        assert "stopReading" in lost and "stopWriting" in lost
        # tcp.Connection.connectionLost asks check() (the cached part of _Done).
        assert "check" in tcp.Connection.connectionLost.__code__.co_names


class TestDoneFailure:
    """`closing._DONE` answers like the reactor's own ConnectionDone failure."""

    @pytest.mark.parametrize(
        "types",
        [
            (error.ConnectionAborted,),
            (error.ConnectionDone,),
            (error.ConnectionLost, error.ConnectionDone),
            (Exception,),
            ("twisted.internet.error.ConnectionDone",),
            ("nope",),
            (),
        ],
    )
    def test_check_matches_failure(self, types: tuple[Any, ...]) -> None:
        plain = failure.Failure(error.ConnectionDone())
        for _ in range(2):  # computed, then cached
            assert closing._DONE.check(*types) == plain.check(*types)
        assert closing._DONE.type is error.ConnectionDone
        assert isinstance(closing._DONE, failure.Failure)

    def test_trap(self) -> None:
        assert closing._DONE.trap(error.ConnectionDone) is error.ConnectionDone
        with pytest.raises(error.ConnectionDone):  # trap re-raises the original
            closing._DONE.trap(error.ConnectionAborted)


class TestLoseConnection:
    @pytest_twisted.ensureDeferred
    async def test_closes_without_watching_for_writability(
        self, accepted: _Accepted
    ) -> None:
        peer, side = await accepted.connect()
        transport = side.transport
        closing.lose_connection(transport)
        assert transport.disconnecting
        assert transport not in reactor.getWriters()
        assert transport not in reactor.getReaders()
        assert closing.pending()
        await side.lost
        assert side.reason.check(error.ConnectionDone)
        assert not closing.pending()
        assert transport not in reactor.getWriters()
        assert transport not in reactor.getReaders()
        assert not transport.connected and transport.disconnected
        assert peer.recv(10) == b""  # an orderly FIN
        peer.close()

    @pytest_twisted.ensureDeferred
    async def test_buffered_bytes_go_first(self, accepted: _Accepted) -> None:
        """With bytes in Twisted's buffer it is Twisted's loseConnection."""
        peer, side = await accepted.connect()
        transport = side.transport
        transport.write(b"last words")
        closing.lose_connection(transport)
        assert transport in reactor.getWriters()
        assert not closing.pending()
        await side.lost
        assert peer.recv(100) == b"last words"
        assert peer.recv(100) == b""
        peer.close()

    @pytest_twisted.ensureDeferred
    async def test_pending_bytes_elsewhere(self, accepted: _Accepted) -> None:
        """``pending`` (a splice pipe not yet empty) means Twisted's loseConnection."""
        peer, side = await accepted.connect()
        closing.lose_connection(side.transport, pending=10)
        assert side.transport in reactor.getWriters()
        await side.lost
        peer.close()

    @pytest_twisted.ensureDeferred
    async def test_written_after_queueing_is_flushed(self, accepted: _Accepted) -> None:
        peer, side = await accepted.connect()
        closing.lose_connection(side.transport)
        side.transport.write(b"late")
        await side.lost
        assert peer.recv(100) == b"late"
        assert peer.recv(100) == b""
        peer.close()

    @pytest_twisted.ensureDeferred
    async def test_abort_wins(self, accepted: _Accepted) -> None:
        """An abort after the close was queued resets the connection."""
        peer, side = await accepted.connect()
        closing.lose_connection(side.transport)
        side.transport.abortConnection()
        await side.lost
        assert side.reason.check(error.ConnectionAborted)
        with pytest.raises(ConnectionResetError):
            peer.recv(10)
        peer.close()

    def test_other_transports_use_their_own(self) -> None:
        class Fake:
            called = False

            def loseConnection(self) -> None:
                self.called = True

        fake = Fake()
        closing.lose_connection(fake)
        assert fake.called


class TestLoseWriteConnection:
    @pytest_twisted.ensureDeferred
    async def test_shuts_down_at_once(self, accepted: _Accepted) -> None:
        peer, side = await accepted.connect()
        transport = side.transport
        closing.lose_write_connection(transport)
        assert side.events == ["write closed"]
        assert transport._writeDisconnected
        assert transport not in reactor.getWriters()
        assert peer.recv(10) == b""  # the FIN is out already
        peer.sendall(b"still open")  # the other half is
        peer.shutdown(socket.SHUT_WR)
        closing.lose_connection(transport)  # as the session does after both FINs
        await side.lost
        assert side.events[0] == "write closed" and side.events[-1] == "lost"
        peer.close()

    @pytest_twisted.ensureDeferred
    async def test_buffered_bytes_go_first(self, accepted: _Accepted) -> None:
        peer, side = await accepted.connect()
        side.transport.write(b"tail")
        closing.lose_write_connection(side.transport)
        assert side.events == []
        await _until(lambda: side.events == ["write closed"])
        assert peer.recv(100) == b"tail"
        assert peer.recv(100) == b""
        side.transport.loseConnection()
        await side.lost
        peer.close()


@pytest.fixture
def own_reactor() -> Iterator[Any]:
    own = epollreactor.EPollReactor()
    yield own
    for selectable in own.removeAll():
        selectable.socket.close()
    own.waker.connectionLost(None)
    own._poller.close()
    closing.loop_drains(None)


class TestFastPollDrains:
    def _connection(self, own: Any) -> tuple[socket.socket, Any, _Side]:
        a, b = socket.socketpair()
        side = _Side()
        transport = tcp.Connection(b, side, own)
        side.makeConnection(transport)
        transport.connected = 1
        transport.startReading()
        return a, transport, side

    def test_closed_after_the_batch_without_a_timer(self, own_reactor: Any) -> None:
        assert fastpoll.install(own_reactor)
        peer, transport, side = self._connection(own_reactor)
        closing.lose_connection(transport)
        assert own_reactor.getDelayedCalls() == []
        own_reactor.iterate(0)
        assert side.events == ["lost"]
        assert peer.recv(10) == b""
        peer.close()

    def test_queued_outside_events_does_not_block_the_poll(
        self, own_reactor: Any
    ) -> None:
        """A close asked by a timer is made before polling, and the poll does not wait."""
        assert fastpoll.install(own_reactor)
        peer, transport, side = self._connection(own_reactor)
        closing.lose_connection(transport)
        fastpoll.do_poll(own_reactor, 30)  # would block 30 s if it polled with it
        assert side.events == ["lost"]
        peer.close()
