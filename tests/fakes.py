"""Deterministic stand-ins for the unit tests of the data path.

A `Harness` builds one frontend and one pool on a `MemoryReactorClock`, with the
"endpoint for this server" seam replaced by `FakeEndpoint`s whose connect
attempts the test completes, refuses or leaves hanging.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from l4lb.config import FrontendConfig, PoolConfig, ServerAddress, ServerConfig
from l4lb.frontend import ConnectionCap, Frontend
from l4lb.pool import Pool
from l4lb.proxy import ClientProtocol, ServerProtocol


class FakeTransport(StringTransport):
    """A StringTransport that also half-closes and can report its own loss."""

    def __init__(self, protocol: Any = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.protocol = protocol
        self.write_closed = False
        self.nodelay = False
        self.keepalive = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepalive = enabled

    def peer_sends_eof(self) -> None:
        """The peer shut down its write half (a FIN arrived)."""
        assert IHalfCloseableProtocol.providedBy(self.protocol)
        self.protocol.readConnectionLost()

    def lose(self, reason: type[Exception] = error.ConnectionDone) -> None:
        """The connection is gone (closed, reset, or our close completed)."""
        if self.connected:
            self.connected = False
            self.protocol.connectionLost(Failure(reason()))


# Claim ITCPTransport so the data path tunes it like a real TCP socket.
from twisted.internet.interfaces import ITCPTransport  # noqa: E402
from zope.interface import classImplements  # noqa: E402

classImplements(FakeTransport, ITCPTransport)


class FakeEndpoint:
    """Records connect attempts; the test decides how each one ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.attempts: list[tuple[Any, Deferred[Any]]] = []
        self.cancelled = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            # As Twisted's client endpoints do when a connect is cancelled.
            self.cancelled += 1
            d.errback(Failure(error.ConnectingCancelledError(None)))

        d: Deferred[Any] = Deferred(cancel)
        self.attempts.append((factory, d))
        return d

    @property
    def pending(self) -> list[tuple[Any, Deferred[Any]]]:
        return [(f, d) for f, d in self.attempts if not d.called]


class DirectFakeEndpoint(FakeEndpoint):
    """Also offers ``connect_direct``, as `l4lb.connector.DirectTCPEndpoint` does.

    Its attempts are recorded like `FakeEndpoint`'s, so `Harness.complete` and
    `Harness.refuse` end them the same way; they reach the session through
    the callbacks instead of a Deferred.
    """

    def connect_direct(
        self,
        protocol: Any,
        on_connected: Callable[[], None],
        on_failed: Callable[[BaseException], None],
    ) -> Any:
        endpoint = self

        class Handle:
            live = True

            def cancel(self) -> None:
                if self.live:
                    self.live = False
                    endpoint.cancelled += 1
                    d.callback(None)  # over: no longer pending

        handle = Handle()

        def connected(_: Any) -> None:
            if handle.live:
                handle.live = False
                on_connected()

        def failed(failure: Failure) -> None:
            if handle.live:
                handle.live = False
                on_failed(failure.value)

        d: Deferred[Any] = Deferred()
        d.addCallbacks(connected, failed)
        self.attempts.append((_OneProtocol(protocol), d))
        return handle


class _OneProtocol:
    """A factory stand-in: `Harness.complete` builds the protocol through it."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol


class Harness:
    """One frontend in front of one pool of fake servers, on a fake clock.

    With ``direct`` (default: the class's ``direct``), the fake endpoints
    offer ``connect_direct``, and the session's fast connect path runs.
    """

    direct = False

    def __init__(
        self,
        servers: int | list[dict[str, Any]] = 2,
        *,
        pool: dict[str, Any] | None = None,
        frontend: dict[str, Any] | None = None,
        process_limit: int = 1000,
        direct: bool | None = None,
    ) -> None:
        self.clock = MemoryReactorClock()
        if direct is None:
            direct = self.direct
        endpoint_type = DirectFakeEndpoint if direct else FakeEndpoint
        if isinstance(servers, int):
            servers = [{} for _ in range(servers)]
        server_configs = tuple(
            ServerConfig(
                name=kw.pop("name", f"s{i}"),
                address=ServerAddress(host="127.0.0.1", port=7000 + i),
                **kw,
            )
            for i, kw in enumerate(dict(s) for s in servers)
        )
        self.pool_config = PoolConfig(name="p", servers=server_configs, **(pool or {}))
        self.pool = Pool(self.pool_config, self.clock)
        self.endpoints = {s.name: endpoint_type(s.name) for s in server_configs}
        self.frontend_config = FrontendConfig(
            name="fe",
            listen="127.0.0.1:0",
            endpoint="tcp:0",
            pool="p",
            **(frontend or {}),
        )
        self.cap = ConnectionCap(process_limit)
        self.frontend = Frontend(
            self.frontend_config,
            self.pool,
            self.clock,
            lambda server: self.endpoints[server.name],
            self.cap,
        )

    def accept(
        self, host: str = "10.0.0.7", port: int = 40000
    ) -> tuple[ClientProtocol, FakeTransport]:
        protocol = self.frontend.buildProtocol(IPv4Address("TCP", host, port))
        transport = FakeTransport(protocol, peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return protocol, transport

    def pending_attempts(self) -> list[tuple[str, Any, Deferred[Any]]]:
        return [
            (name, factory, d)
            for name, endpoint in self.endpoints.items()
            for factory, d in endpoint.pending
        ]

    def only_attempt(self) -> tuple[str, Any, Deferred[Any]]:
        attempts = self.pending_attempts()
        assert len(attempts) == 1, attempts
        return attempts[0]

    def complete(self) -> tuple[str, ServerProtocol, FakeTransport]:
        """The one pending connect attempt succeeds."""
        name, factory, d = self.only_attempt()
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 7000))
        transport = FakeTransport(protocol)
        protocol.makeConnection(transport)
        d.callback(protocol)
        return name, protocol, transport

    def refuse(self) -> str:
        """The one pending connect attempt is refused."""
        name, _, d = self.only_attempt()
        d.errback(Failure(error.ConnectionRefusedError()))
        return name

    def connected_pair(
        self, host: str = "10.0.0.7"
    ) -> tuple[ClientProtocol, FakeTransport, ServerProtocol, FakeTransport]:
        client, client_transport = self.accept(host)
        _, server, server_transport = self.complete()
        return client, client_transport, server, server_transport
