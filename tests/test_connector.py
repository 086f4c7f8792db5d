"""`l4lb.connector.DirectTCPEndpoint`: the endpoint contract without a wrapper protocol."""

from __future__ import annotations

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
