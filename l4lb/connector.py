"""A client endpoint for IP-literal servers that costs less per connection.

Twisted's ``TCP4ClientEndpoint``/``TCP6ClientEndpoint`` wrap every protocol
in ``endpoints._WrappingProtocol``, which declares the wrapped protocol's
interfaces on itself with ``directlyProvides`` at each connection, and then
stays between the transport and the protocol for the connection's life: every
``dataReceived``, ``readConnectionLost`` and ``connectionLost`` goes through
one more Python call. `DirectTCPEndpoint` keeps the endpoint contract (a
``connect(factory)`` Deferred that fires with the connected protocol, fails
with the connect error, and cancels with ``ConnectingCancelledError``) but its
`_Handoff` protocol steps aside as soon as the connection is made: it points
the transport at the real protocol, connects it and fires the Deferred.
Twisted's transports look up ``transport.protocol`` at each event, so from
then on the reactor talks to the real protocol directly.

Written here rather than taken from Twisted because no public Twisted API
hands a connected protocol to a Deferred without the wrapper; the code is
``endpoints._WrappingFactory`` minus the wrapper's lifetime.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IStreamClientEndpoint)
class DirectTCPEndpoint:
    """Connects to an IP literal (v4 or v6) with ``reactor.connectTCP``.

    No connector timeout: the caller's own timer enforces ``connect_timeout``.
    """

    __slots__ = ("_host", "_port", "_reactor")

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        factory = _Connecting(protocolFactory)
        try:
            self._reactor.connectTCP(self._host, self._port, factory, timeout=None)
        except BaseException:
            return fail()
        return factory.deferred

    def __repr__(self) -> str:
        return f"<DirectTCPEndpoint {self._host}:{self._port}>"


class _Connecting(ClientFactory):
    """One connect attempt: builds the protocol and fires ``deferred``."""

    noisy = False  # no "Starting factory" line per connection

    def __init__(self, wrapped: IProtocolFactory) -> None:
        self._wrapped = wrapped
        self._connector: IConnector | None = None
        self.deferred: Deferred[IProtocol] = Deferred(self._cancel)

    def startedConnecting(self, connector: IConnector) -> None:
        self._connector = connector

    def _cancel(self, deferred: Deferred[IProtocol]) -> None:
        connector = self._connector
        assert connector is not None  # connectTCP runs before connect() returns
        deferred.errback(error.ConnectingCancelledError(connector.getDestination()))
        connector.stopConnecting()

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        try:
            protocol = self._wrapped.buildProtocol(addr)
            if protocol is None:
                raise error.NoProtocol()
        except BaseException:
            self.deferred.errback()
            return None
        return _Handoff(protocol, self.deferred)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self.deferred.called:
            self.deferred.errback(reason)


class _Handoff(Protocol):
    """Stands in for the real protocol until the connection is made, then steps aside."""

    def __init__(self, protocol: IProtocol, deferred: Deferred[IProtocol]) -> None:
        self._protocol = protocol
        self._deferred = deferred

    def logPrefix(self) -> str:
        return self._protocol.__class__.__name__

    def makeConnection(self, transport: Any) -> None:
        protocol = self._protocol
        transport.protocol = protocol  # the transport's events now go straight there
        protocol.makeConnection(transport)
        self._deferred.callback(protocol)
