"""`l4lb.connector.DirectTCPEndpoint`: the endpoint contract without a wrapper protocol."""

from __future__ import annotations

import os
import weakref
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from l4lb import connector as connector_module
from l4lb.connector import DirectTCPEndpoint
from tests.e2e import free_port


@implementer(IHalfCloseableProtocol)
class _Recorder(Protocol):
    """Records what the transport tells it."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.events.append("eof")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.events.append("write closed")

    def connectionLost(self, reason: Any = None) -> None:
        self.events.append("lost")
        self.lost.callback(None)


class _SendThenHalfClose(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello")
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]


class _OneProtocol(Factory):
    """Hands out one protocol without pointing it back at the factory."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


class _NoneFactory(Factory):
    def buildProtocol(self, addr: Any) -> None:  # type: ignore[override]
        return None


class TestDirectTCPEndpoint:
    @pytest_twisted.ensureDeferred
    async def test_connects_and_steps_aside(self) -> None:
        """connect(2) starts at once; the Deferred fires with the real protocol,
        which the transport then talks to directly (data, half-close)."""
        server_factory = Factory.forProtocol(_SendThenHalfClose)
        port = reactor.listenTCP(0, server_factory, interface="127.0.0.1")
        try:
            recorder = _Recorder()
            endpoint = DirectTCPEndpoint(reactor, "127.0.0.1", port.getHost().port)
            timers = len(reactor.getDelayedCalls())
            connecting = endpoint.connect(Factory.forProtocol(lambda: recorder))
            # connect(2) has started: no callLater(0) left to start it.
            assert len(reactor.getDelayedCalls()) == timers
            connected = await connecting
            assert connected is recorder
            assert recorder.transport.protocol is recorder  # type: ignore[attr-defined]
            await recorder.lost
            assert recorder.data == b"hello"
            assert recorder.events == ["made", "eof", "lost"]
        finally:
            await port.stopListening()

    @pytest_twisted.ensureDeferred
    async def test_connected_transport_lets_the_attempt_go(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Once connected, nothing of the attempt stays alive (connector, factory,
        Deferred, the caller's factory); Twisted still reports the connection's
        end to the stand-in connector, and to nothing else of ours.

        Guards a Twisted private detail: ``tcp.Client.connectionLost`` calls
        ``self.connector.connectionLost`` and uses the connector for nothing
        else once connected. If Twisted changes that, this fails.
        """
        told: list[object] = []
        monkeypatch.setattr(
            connector_module._Connected,
            "connectionLost",
            lambda self, reason: told.append(reason),
        )
        port = reactor.listenTCP(
            0, Factory.forProtocol(_SendThenHalfClose), interface="127.0.0.1"
        )
        try:
            recorder = _Recorder()
            factory = _OneProtocol(recorder)
            endpoint = DirectTCPEndpoint(reactor, "127.0.0.1", port.getHost().port)
            connecting = endpoint.connect(factory)
            connected = await connecting
            assert connected is recorder
            transport: Any = recorder.transport
            assert transport.connector is connector_module._CONNECTED
            gone = weakref.ref(factory)
            del factory, connecting, connected
            # (The await resumed inside the transport's connect call: let it return.)
            await task.deferLater(reactor, 0, lambda: None)
            # Freed at once, without waiting for the garbage collector: no
            # reference cycle is left between the connector and the factory.
            assert gone() is None  # nothing of the attempt holds the caller's factory
            await recorder.lost
            assert recorder.events == ["made", "eof", "lost"]
            # The transport tells its connector right after the protocol.
            await task.deferLater(reactor, 0, lambda: None)
            assert len(told) == 1
        finally:
            await port.stopListening()

    @pytest_twisted.ensureDeferred
    async def test_refused(self) -> None:
        """A refused connect fails the Deferred with Twisted's own error."""
        endpoint = DirectTCPEndpoint(reactor, "127.0.0.1", free_port())
        with pytest.raises(error.ConnectionRefusedError):
            await endpoint.connect(Factory.forProtocol(Protocol))

    def test_cancel_stops_connecting(self) -> None:
        """Cancelling gives ConnectingCancelledError and stops the connector."""
        memory = MemoryReactorClock()
        endpoint = DirectTCPEndpoint(memory, "::1", 6379)
        connecting = endpoint.connect(Factory.forProtocol(Protocol))
        (connector,) = memory.connectors
        (host, port, factory, timeout, _) = memory.tcpClients[0]
        assert (host, port, timeout) == ("::1", 6379, None)
        connecting.cancel()
        failures: list[Any] = []
        connecting.addErrback(failures.append)
        assert failures[0].check(error.ConnectingCancelledError)
        assert connector.stoppedConnecting

    def test_no_protocol_fails_the_connect(self) -> None:
        """A factory that builds nothing fails the Deferred (NoProtocol)."""
        memory = MemoryReactorClock()
        connecting = DirectTCPEndpoint(memory, "127.0.0.1", 1).connect(_NoneFactory())
        factory = memory.tcpClients[0][2]
        assert factory.buildProtocol(None) is None
        failures: list[Any] = []
        connecting.addErrback(failures.append)
        assert failures[0].check(error.NoProtocol)


class TestConnectDirect:
    """`DirectTCPEndpoint.connect_direct`: callbacks instead of a Deferred."""

    def test_not_offered_on_fake_reactors(self) -> None:
        endpoint = DirectTCPEndpoint(MemoryReactorClock(), "127.0.0.1", 1)
        assert endpoint.connect_direct(Protocol(), lambda: None, lambda e: None) is None

    @pytest_twisted.ensureDeferred
    async def test_connects_without_deferred_or_timer(self) -> None:
        """The protocol is connected (its own transport, no wrapper), then on_connected runs."""
        port = reactor.listenTCP(
            0, Factory.forProtocol(_SendThenHalfClose), interface="127.0.0.1"
        )
        try:
            recorder = _Recorder()
            done: defer.Deferred[None] = defer.Deferred()
            timers = len(reactor.getDelayedCalls())
            handle = DirectTCPEndpoint(
                reactor, "127.0.0.1", port.getHost().port
            ).connect_direct(recorder, lambda: done.callback(None), done.errback)
            assert handle is not None
            assert len(reactor.getDelayedCalls()) == timers
            await done
            assert recorder.events[0] == "made"
            assert recorder.transport.protocol is recorder  # type: ignore[attr-defined]
            handle.cancel()  # connected already: nothing to stop
            await recorder.lost
            assert recorder.data == b"hello"
        finally:
            await port.stopListening()

    @pytest_twisted.ensureDeferred
    async def test_refused(self) -> None:
        """A refused connect reaches on_failed with Twisted's own error."""
        failed: defer.Deferred[BaseException] = defer.Deferred()
        DirectTCPEndpoint(reactor, "127.0.0.1", free_port()).connect_direct(
            Protocol(),
            lambda: failed.errback(AssertionError("connected")),
            failed.callback,
        )
        assert isinstance(await failed, error.ConnectionRefusedError)

    @pytest_twisted.ensureDeferred
    async def test_cancel_calls_neither_callback(self) -> None:
        """cancel() stops connect(2) (the socket is closed) and reports nothing."""
        calls: list[object] = []
        # A listener that never accepts: connect(2) may still complete (backlog),
        # so cancel at once, before the reactor runs.
        handle = DirectTCPEndpoint(reactor, "127.0.0.1", free_port()).connect_direct(
            Protocol(), lambda: calls.append("connected"), calls.append
        )
        assert handle is not None
        connector = handle.connector
        handle.cancel()
        assert connector.state == "disconnected"
        waited: defer.Deferred[None] = defer.Deferred()
        reactor.callLater(0.05, waited.callback, None)
        await waited
        assert calls == []


class TestTwistedPrivateAPI:
    """Fails loudly if the private parts of ``tcp.Client`` the connector uses change."""

    def test_client_resolution_hooks(self) -> None:
        """`_Client.resolveAddress` replaces Twisted's: same name, same callers."""
        from twisted.internet import tcp

        for name in ("resolveAddress", "_setRealAddress", "failIfNotConnected"):
            assert callable(getattr(tcp.Client, name)), name
        init_names = tcp.Client.__init__.__code__.co_names
        # tcp.Client hands resolveAddress to _finishInit as whenDone, and sets
        # _requiresResolution there.
        assert "resolveAddress" in init_names
        assert "_requiresResolution" in init_names
        assert "addr" in init_names
        # l4lb's client transports set _shouldShutdown = False (l4lb.accept).
        assert "_shouldShutdown" in tcp._SocketCloser._closeSocket.__code__.co_names

    def test_client_socket_non_blocking_from_the_start(self) -> None:
        """`_Client.createInternetSocket` replaces Twisted's (called from
        ``tcp.Client.__init__``); ``_finishInit`` then runs
        ``Connection.__init__``, which sets it non-blocking again."""
        import socket

        from twisted.internet import tcp

        from l4lb.connector import _Client

        assert "createInternetSocket" in tcp.Client.__init__.__code__.co_names
        assert callable(tcp.BaseClient.createInternetSocket)
        assert "__init__" in tcp.BaseClient._finishInit.__code__.co_names
        assert "setblocking" in tcp.Connection.__init__.__code__.co_names
        client = _Client.__new__(_Client)
        client.addressFamily, client.socketType = socket.AF_INET, socket.SOCK_STREAM
        skt = client.createInternetSocket()
        try:
            assert skt.gettimeout() == 0.0 and not skt.getblocking()
            assert skt.type == socket.SOCK_STREAM and skt.family == socket.AF_INET
            assert not os.get_inheritable(skt.fileno())  # close-on-exec, as before
        finally:
            skt.close()

    def test_do_connect_order(self) -> None:
        """`_Client.stopReading` skips the stop in ``doConnect``'s success path:
        that path deletes the ``doRead`` stand-in, then stops reading and
        writing, then ``_connectDone`` starts reading again."""
        import dis

        from twisted.internet import tcp

        ops = [
            (i.opname, i.argval)
            for i in dis.get_instructions(tcp.BaseClient.doConnect)
            if i.opname in ("DELETE_ATTR", "LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR")
        ]
        names = [name for _, name in ops]
        assert ("STORE_ATTR", "doRead") in ops  # the stand-in, set first
        assert names.index("doRead") < names.index("getsockopt")
        deleted = ops.index(("DELETE_ATTR", "doRead"))
        tail = names[deleted:]
        assert tail.index("stopReading") < tail.index("stopWriting")
        assert tail.index("stopWriting") < tail.index("_connectDone")
        assert "startReading" in tcp.BaseClient._connectDone.__code__.co_names

    @pytest_twisted.ensureDeferred
    async def test_connected_socket_reads_and_does_not_write(self) -> None:
        """After connect(2) succeeds: read interest only, as with Twisted's order."""
        port = reactor.listenTCP(
            0, Factory.forProtocol(_SendThenHalfClose), interface="127.0.0.1"
        )
        try:
            recorder = _Recorder()
            done: defer.Deferred[None] = defer.Deferred()
            DirectTCPEndpoint(reactor, "127.0.0.1", port.getHost().port).connect_direct(
                recorder, lambda: done.callback(None), done.errback
            )
            await done
            transport = recorder.transport
            assert transport in reactor.getReaders()
            assert transport not in reactor.getWriters()
            await recorder.lost
            assert recorder.data == b"hello"
        finally:
            await port.stopListening()
