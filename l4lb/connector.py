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

It also starts ``connect(2)`` at once instead of one event-loop pass later
(`_Client`). Written here rather than taken from Twisted because no public Twisted API
hands a connected protocol to a Deferred without the wrapper; the code is
``endpoints._WrappingFactory`` minus the wrapper's lifetime.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import error, tcp
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from l4lb.shapes import TCP_CLIENT, prime


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
        reactor = self._reactor
        try:
            if not isinstance(reactor, PosixReactorBase):  # e.g. a test's fake
                reactor.connectTCP(self._host, self._port, factory, timeout=None)
                return factory.deferred
            # As reactor.connectTCP, with a transport that waits for `start`.
            connector = _Connector(self._host, self._port, factory, None, None, reactor)
            connector.connect()
            transport = connector.transport
            start = getattr(transport, "_start", None)
            if start is not None:
                transport._start = None  # type: ignore[union-attr]
                start()  # connect(2) now; see _Client
        except BaseException:
            return fail()
        return factory.deferred

    def connect_direct(
        self,
        protocol: IProtocol,
        on_connected: Callable[[], None],
        on_failed: Callable[[BaseException], None],
    ) -> _Direct | None:
        """Connect ``protocol`` with callbacks instead of a Deferred; None: not here.

        The session's fast path (`l4lb.proxy.Session`): no Deferred, no
        factory around the protocol. ``on_connected()`` runs once
        ``protocol`` is connected (after its ``connectionMade``),
        ``on_failed(exc)`` with the connect error; either may run before this
        returns. The handle's ``cancel()`` stops the attempt and calls
        neither. None when the reactor is not a real one (test fakes): use
        `connect`.
        """
        reactor = self._reactor
        if not isinstance(reactor, PosixReactorBase):
            return None
        direct = _Direct(protocol, on_connected, on_failed)
        connector = _Connector(self._host, self._port, direct, None, None, reactor)
        direct.connector = connector
        connector.connect()
        start = connector.transport._start  # type: ignore[union-attr]
        if start is not None:
            connector.transport._start = None  # type: ignore[union-attr]
            start()  # connect(2) now; see _Client
        return direct

    def __repr__(self) -> str:
        return f"<DirectTCPEndpoint {self._host}:{self._port}>"


# Linux: socket(2) makes the socket non-blocking; elsewhere setblocking does.
_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)


class _Client(tcp.Client):
    """Twisted's TCP client transport, minus one event-loop pass per connect.

    ``tcp.Client`` schedules the ``connect(2)`` call with ``callLater(0)``: a
    timer pushed on the reactor's heap and one more pass through the event
    loop before the backend connection even starts. For an IP literal nothing
    needs to wait, so the call is kept in ``_start`` and made by
    `DirectTCPEndpoint.connect` once the connector is set up, which is where
    the timer would have fired from. The failure path (no socket) is
    Twisted's. This overrides a private method of ``tcp.Client``
    (``_finishInit``, unchanged since Twisted 12); ``tests/test_connector.py``
    fails if it stops being called.
    """

    _start: Callable[[], None] | None = None
    _shouldShutdown = False  # close() alone sends the FIN: see l4lb.accept

    def createInternetSocket(self) -> socket.socket:
        """Twisted's, made non-blocking by ``socket(2)`` itself.

        ``tcp.Client`` makes a blocking socket, then ``setblocking(0)`` (one
        ``ioctl``), and ``tcp.Connection.__init__`` sets it non-blocking once
        more; this saves the first of the two system calls.
        """
        return socket.socket(self.addressFamily, self.socketType | _NONBLOCK)

    def resolveAddress(self) -> None:
        """Twisted's, without its Deferred when the address is an IP literal.

        ``tcp.Client`` passes its address through ``defer.succeed`` and two
        callbacks even when nothing needs resolving; the errback it adds
        (``failIfNotConnected``) is kept as an ``except``. Overrides a
        private method (tested in ``tests/test_connector.py``).
        """
        if self._requiresResolution:
            super().resolveAddress()
            return
        try:
            self._setRealAddress(self.addr)
        except BaseException:
            self.failIfNotConnected(Failure())

    def stopReading(self) -> None:
        """Twisted's, but kept reading when ``doConnect`` has just succeeded.

        On success ``doConnect`` drops its ``doRead``/``doWrite`` stand-ins,
        stops reading and writing, and ``_connectDone`` starts reading again:
        three epoll changes where stopping writing is the only one needed.
        Only that call is skipped: not connected yet, a connector, and no
        ``doRead`` stand-in (``doConnect`` sets one before it first
        registers, and every failure path runs with it still set). Relies on
        the order inside Twisted's private ``doConnect``, checked by
        ``tests/test_connector.py``.
        """
        if (
            not self.connected
            and getattr(self.doRead, "__func__", None) is type(self).doRead
            and getattr(self, "connector", None) is not None
        ):
            return
        super().stopReading()

    def _finishInit(self, whenDone: Any, skt: Any, error: Any, reactor: Any) -> None:
        if whenDone:
            self._commonConnection.__init__(self, skt, None, reactor)
            self._start = whenDone
        else:
            super()._finishInit(whenDone, skt, error, reactor)


prime(_Client, TCP_CLIENT)


class _Direct(ClientFactory):
    """One `DirectTCPEndpoint.connect_direct` attempt: its factory, stand-in and handle.

    As factory it hands the transport itself (``buildProtocol``); as stand-in
    protocol it steps aside in ``makeConnection``, as `_Handoff` does.
    """

    noisy = False

    def __init__(
        self,
        protocol: IProtocol,
        on_connected: Callable[[], None],
        on_failed: Callable[[BaseException], None],
    ) -> None:
        self._protocol = protocol
        self._on_connected = on_connected
        self._on_failed: Callable[[BaseException], None] | None = on_failed
        self.connector: tcp.Connector | None = None

    def cancel(self) -> None:
        """Stop connecting; neither callback runs (a no-op once it has run)."""
        if self._on_failed is not None:
            self._on_failed = None
            connector = self.connector
            if connector is not None and connector.state == "connecting":
                connector.stopConnecting()

    def doStart(self) -> None:
        """Nothing to start: no factory is wrapped."""

    def doStop(self) -> None:
        """Nothing to stop."""

    def buildProtocol(self, addr: IAddress) -> Any:
        return self

    def logPrefix(self) -> str:
        return self._protocol.__class__.__name__

    def makeConnection(self, transport: Any) -> None:
        self._on_failed = None  # from now on, connectionLost tells the protocol
        protocol = self._protocol
        transport.protocol = protocol  # the transport's events now go straight there
        # As in `_Handoff`: the connector and this attempt are freed now.
        transport.connector = _CONNECTED
        self.connector = None
        protocol.makeConnection(transport)
        self._on_connected()

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.connector = None  # no cycle left for the garbage collector
        on_failed, self._on_failed = self._on_failed, None
        if on_failed is not None:
            on_failed(reason.value)


class _Connector(tcp.Connector):
    def _makeTransport(self) -> _Client:
        return _Client(self.host, self.port, self.bindAddress, self, self.reactor)


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
        return _Handoff(protocol, self)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self._connector = None  # no cycle left for the garbage collector
        if not self.deferred.called:
            self.deferred.errback(reason)


class _Handoff(Protocol):
    """Stands in for the real protocol until the connection is made, then steps aside."""

    def __init__(self, protocol: IProtocol, connecting: _Connecting) -> None:
        self._protocol = protocol
        self._connecting = connecting

    def logPrefix(self) -> str:
        return self._protocol.__class__.__name__

    def makeConnection(self, transport: Any) -> None:
        protocol = self._protocol
        transport.protocol = protocol  # the transport's events now go straight there
        # Connected: the connector (and through it this attempt's factory, its
        # Deferred and the caller's factory) is only told of the connection's
        # end, which no one here listens to. A shared stand-in takes that call
        # so they are freed now rather than held for the connection's life.
        # Dropping the connector <-> factory cycle too frees them at once, not
        # at the garbage collector's next full pass.
        transport.connector = _CONNECTED
        connecting = self._connecting
        connecting._connector = None
        protocol.makeConnection(transport)
        connecting.deferred.callback(protocol)


class _Connected:
    """Stands in for the connector of an established connection.

    ``tcp.Client.connectionLost`` (a Twisted private detail) tells its
    ``connector`` of the end and uses it for nothing else once connected;
    ``tests/test_connector.py`` fails if that changes.
    """

    __slots__ = ()

    def connectionLost(self, reason: Failure) -> None:
        """The connection ended: nothing waits for it (`_Connecting` is gone)."""


_CONNECTED = _Connected()
