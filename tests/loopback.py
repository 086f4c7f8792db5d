"""Real-socket helpers for the in-process integration tests (127.0.0.1 only).

A `Lab` owns everything one test creates on the global reactor: backend servers
(`Peer`/`Echo` protocols behind a `Backend` factory), l4lb services built from
TOML, client connections, and plain sockets. `Lab.teardown` closes what is left
and fails the test when a client connection or an l4lb session was still open,
when a port still accepts connections, or when a reader, writer or delayed call
created during the test outlives it.

Peers hash everything they read (SHA-256) and send with flow control: a
`RandomSource` is a streaming producer on the transport, so the test never holds
more than one chunk plus Twisted's 64 KiB write buffer in memory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from twisted.internet import defer, error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from l4lb import splice as l4lb_splice
from l4lb.config import parse_config
from l4lb.frontend import Frontend
from l4lb.service import L4LBService
from tests.e2e import SPLICE

MiB = 1 << 20

# What a sender does once everything is written.
HALF_CLOSE = "half-close"  # shut the write half (FIN), keep reading
CLOSE = "close"  # flush and close the whole connection


class Digest(NamedTuple):
    """How many bytes went through one direction, and their SHA-256."""

    size: int
    sha256: str


class Signal:
    """Something that happens once; any number of waiters get a fresh Deferred."""

    def __init__(self) -> None:
        self.fired = False
        self.value: Any = None
        self._waiters: list[Deferred[Any]] = []

    def fire(self, value: Any = None) -> None:
        if self.fired:
            return
        self.fired, self.value = True, value
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(value)

    def wait(self) -> Deferred[Any]:
        if self.fired:
            return succeed(self.value)
        waiter: Deferred[Any] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter


@implementer(IPushProducer)
class RandomSource:
    """Writes ``total`` random bytes in ``chunk``-sized writes, only while unpaused."""

    def __init__(
        self, peer: Peer, total: int, then: str | None, chunk: int = MiB
    ) -> None:
        self.peer = peer
        self.transport = peer.transport
        self.remaining = total
        self.then = then
        self.chunk = chunk
        self.sha = hashlib.sha256()
        self.sent = 0
        self.paused = False
        self.pauses = 0
        self.finished = False
        self.done: Deferred[Digest] = Deferred()
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    @property
    def digest(self) -> Digest:
        return Digest(self.sent, self.sha.hexdigest())

    def pauseProducing(self) -> None:
        if not self.paused:
            self.pauses += 1
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.remaining > 0 and not self.finished:
            block = os.urandom(min(self.chunk, self.remaining))
            self.sha.update(block)
            self.remaining -= len(block)
            self.sent += len(block)
            self.transport.write(block)
        if self.remaining == 0 and not self.finished:
            self.finished = True
            self.transport.unregisterProducer()
            self.peer.finish_sending(self.then)
            self.done.callback(self.digest)

    def stopProducing(self) -> None:
        if not self.finished:
            self.finished = True
            self.done.errback(
                Failure(
                    ConnectionError(f"connection lost after sending {self.sent} bytes")
                )
            )


Script = Callable[["Peer"], Awaitable[Any]]


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """One end of a test connection (client or backend).

    It hashes what it reads, reports the peer's FIN on `eof` (with the
    `Digest` of everything read), sends on request, and closes the socket
    once both directions are done. ``script`` runs as a coroutine from
    `connectionMade`; ``close_on_eof`` makes a pure sink close when the other
    side finishes; ``paused`` starts without reading (a slow reader).
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        close_on_eof: bool = False,
        keep: bool = False,
        paused: bool = False,
        on_error: Callable[[Failure], None] | None = None,
    ) -> None:
        self.script = script
        self.close_on_eof = close_on_eof
        self.start_paused = paused
        self.on_error = on_error
        self.sha = hashlib.sha256()
        self.received = 0
        self.data: bytearray | None = bytearray() if keep else None
        self.source: RandomSource | None = None
        self.read_eof = False
        self.write_closed = False
        self.is_connected = False
        self.close_reason: Failure | None = None
        self.eof = Signal()  # value: Digest of everything read
        self.closed = Signal()

    @property
    def digest(self) -> Digest:
        return Digest(self.received, self.sha.hexdigest())

    def connectionMade(self) -> None:
        self.is_connected = True
        if self.start_paused:
            self.transport.pauseProducing()
        if self.script is not None:
            run = Deferred.fromCoroutine(self.script(self))
            run.addErrback(self._script_failed)

    def _script_failed(self, failure: Failure) -> None:
        if self.on_error is not None:
            self.on_error(failure)
        if self.is_connected:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.sha.update(data)
        if self.data is not None:
            self.data += data

    # Sending.

    def send(self, data: bytes, then: str | None = None) -> None:
        self.transport.write(data)
        self.finish_sending(then)

    def send_random(self, total: int, then: str | None = None) -> Deferred[Digest]:
        """Send ``total`` random bytes with flow control; fires with their Digest."""
        self.source = RandomSource(self, total, then)
        return self.source.done

    def finish_sending(self, then: str | None) -> None:
        if then == HALF_CLOSE:
            self.transport.loseWriteConnection()
        elif then == CLOSE:
            self.transport.loseConnection()
        else:
            assert then is None, then

    # Half-close: close the socket once both directions are done.

    def readConnectionLost(self) -> None:
        self.read_eof = True
        self.eof.fire(self.digest)
        if self.close_on_eof or self.write_closed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.read_eof:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.is_connected = False
        self.close_reason = reason
        self.eof.fire(self.digest)  # a close without a FIN first ends the read side too
        self.closed.fire(self)


class Echo(Peer):
    """Echoes everything with flow control; on the client's FIN, flushes and closes."""

    def connectionMade(self) -> None:
        super().connectionMade()
        # Its own producer: a full write buffer stops reading.
        self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.read_eof = True
        self.eof.fire(self.digest)
        self.transport.unregisterProducer()
        self.transport.loseConnection()


class Backend(ServerFactory):
    """A listening test server; ``make`` builds one protocol per connection."""

    noisy = False

    def __init__(self, make: Callable[[], Peer]) -> None:
        self.make = make
        self.peers: list[Peer] = []
        self.port: Any = None
        self.address = ""  # as written in an l4lb [[pool.X.server]] table

    def buildProtocol(self, addr: Any) -> Peer:
        peer = self.make()
        peer.factory = self
        self.peers.append(peer)
        return peer

    @property
    def live(self) -> list[Peer]:
        return [p for p in self.peers if p.is_connected]


class L4LB(NamedTuple):
    """An in-process l4lb with one frontend called ``fe`` and one pool ``p``."""

    service: L4LBService
    frontend: Frontend
    port: int


def config_text(
    servers: dict[str, str],
    *,
    pool: str = "",
    frontend: str = "",
    grace: str = "2s",
    listen: str = "127.0.0.1:0",
    splice: bool | None = None,
) -> str:
    """TOML for frontend ``fe`` on an ephemeral port in front of pool ``p``."""
    lines = [
        "[global]",
        f'shutdown_grace = "{grace}"',
        "" if splice is None else f"splice = {str(splice).lower()}",
        "[frontend.fe]",
        f'listen = "{listen}"',
        'pool = "p"',
        frontend,
        "[pool.p]",
        pool,
    ]
    for name, address in servers.items():
        lines += ["[[pool.p.server]]", f'name = "{name}"', f'address = "{address}"']
    return "\n".join(lines) + "\n"


def free_port() -> int:
    """A TCP port on 127.0.0.1 where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """Everything one test makes on the reactor, and the check that it is gone."""

    def __init__(self, reactor: Any, splice: bool | None = None) -> None:
        self.reactor = reactor
        # [global] splice of every l4lb built; None: L4LB_TEST_SPLICE or the default.
        self.splice = SPLICE if splice is None else splice
        self.errors: list[Failure] = []
        self.backends: list[Backend] = []
        self.services: list[L4LB] = []
        self.clients: list[Peer] = []
        self.sockets: list[socket.socket] = []
        self.tcp_ports: list[tuple[str, int]] = []
        self.unix_paths: list[str] = []
        self._readers = set(reactor.getReaders())
        self._writers = set(reactor.getWriters())
        self._delayed = set(reactor.getDelayedCalls())

    def record_error(self, failure: Failure) -> None:
        self.errors.append(failure)

    # -- building ----------------------------------------------------------

    def backend(self, make: Callable[[], Peer], host: str = "127.0.0.1") -> Backend:
        """A TCP server on an ephemeral port of ``host`` (IPv4 or IPv6 literal)."""
        backend = Backend(make)
        backend.port = self.reactor.listenTCP(0, backend, interface=host)
        port = backend.port.getHost().port
        backend.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.tcp_ports.append((host, port))
        self.backends.append(backend)
        return backend

    def unix_backend(self, path: str, make: Callable[[], Peer]) -> Backend:
        backend = Backend(make)
        backend.port = self.reactor.listenUNIX(path, backend)
        backend.address = f"unix:{path}"
        self.unix_paths.append(path)
        self.backends.append(backend)
        return backend

    def peer(self, script: Script | None = None, **kw: Any) -> Peer:
        return Peer(script, on_error=self.record_error, **kw)

    def echo(self) -> Peer:
        return Echo(on_error=self.record_error)

    def l4lb(self, servers: dict[str, str], **sections: str) -> L4LB:
        """Parse, build and start l4lb; its frontend listens on an ephemeral port."""
        config = parse_config(
            config_text(servers, splice=self.splice, **sections), "<test>"
        )
        service = L4LBService(config, self.reactor)
        service.startService()
        frontend = service.frontends["fe"]
        assert frontend.port is not None
        lb = L4LB(service, frontend, frontend.port.getHost().port)
        self.tcp_ports.append((frontend.port.getHost().host, lb.port))
        self.services.append(lb)
        return lb

    async def connect(
        self, port: int, peer: Peer | None = None, host: str = "127.0.0.1"
    ) -> Peer:
        """A client connection to ``host``:``port`` (IPv4 or IPv6 literal)."""
        peer = peer if peer is not None else self.peer()
        make = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint = make(self.reactor, host, port, timeout=5)
        self.clients.append(peer)
        await self.wait(endpoint.connect(_Once(peer)), 5, f"connect to port {port}")
        return peer

    async def connect_unix(self, path: str, peer: Peer) -> Peer:
        self.clients.append(peer)
        endpoint = UNIXClientEndpoint(self.reactor, path, timeout=5)
        await self.wait(endpoint.connect(_Once(peer)), 5, f"connect to {path}")
        return peer

    def plain_socket(self) -> socket.socket:
        """A non-blocking socket outside the reactor, closed at teardown."""
        s = socket.socket()
        s.setblocking(False)
        self.sockets.append(s)
        return s

    # -- waiting -----------------------------------------------------------

    async def wait(self, d: Deferred[Any], timeout: float, what: str) -> Any:
        """``await d`` with a deadline, failing the test with ``what`` on expiry."""
        d.addTimeout(timeout, self.reactor)
        try:
            return await d
        except (defer.TimeoutError, error.ConnectingCancelledError):
            raise AssertionError(f"{what}: nothing after {timeout:g}s") from None

    async def until(
        self,
        condition: Callable[[], bool],
        timeout: float = 10,
        what: str = "",
        step: float = 0.005,
    ) -> None:
        """Poll ``condition`` every ``step`` seconds until it holds (or ``timeout``)."""
        deadline = self.reactor.seconds() + timeout
        while not condition():
            if self.reactor.seconds() > deadline:
                raise AssertionError(
                    f"{what or condition}: still false after {timeout:g}s"
                )
            await deferLater(self.reactor, step, lambda: None)

    async def settle(
        self,
        sample: Callable[[], Any],
        polls: int = 5,
        step: float = 0.02,
        timeout: float = 10,
    ) -> Any:
        """Wait until ``sample()`` returns the same value ``polls`` times in a row."""
        deadline = self.reactor.seconds() + timeout
        last, same = sample(), 0
        while same < polls:
            if self.reactor.seconds() > deadline:
                raise AssertionError(f"still changing after {timeout:g}s: {last!r}")
            await deferLater(self.reactor, step, lambda: None)
            now = sample()
            same = same + 1 if now == last else 0
            last = now
        return last

    # -- teardown ----------------------------------------------------------

    async def teardown(self) -> list[str]:
        """Close everything; return what the test itself had left open or leaking."""
        problems = [
            f"error in a test protocol: {f.getTraceback()}" for f in self.errors
        ]
        # First what the test left open, then close it all.
        open_clients = [c for c in self.clients if c.is_connected]
        open_backends = [p for b in self.backends for p in b.live]
        problems += [
            f"client connection still open: {c.transport.getHost()}"
            for c in open_clients
        ]
        problems += [
            f"l4lb still had {len(lb.frontend.sessions)} live session(s)"
            for lb in self.services
            if lb.frontend.sessions
        ]
        problems += [
            f"backend connection still open: {p.transport.getHost()}"
            for p in open_backends
        ]
        for peer in open_clients + open_backends:
            peer.transport.abortConnection()
        for lb in self.services:
            if lb.service.running:
                await self.wait(lb.service.stopService(), 10, "l4lb stopService")
        for backend in self.backends:
            await self.wait(
                defer.maybeDeferred(backend.port.stopListening),
                5,
                "backend stopListening",
            )
        for s in self.sockets:
            s.close()
        if l4lb_splice.PIPES.in_use:
            problems.append(
                f"{l4lb_splice.PIPES.in_use} splice pipe(s) never given back"
            )
        for host, port in self.tcp_ports:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family) as probe:
                if probe.connect_ex((host, port)) != errno.ECONNREFUSED:
                    problems.append(f"{host}:{port} still accepts connections")
        for path in self.unix_paths:
            with socket.socket(socket.AF_UNIX) as probe:
                if probe.connect_ex(path) not in (errno.ECONNREFUSED, errno.ENOENT):
                    problems.append(f"unix:{path} still accepts connections")

        def leftovers() -> tuple[set[Any], set[Any], list[Any]]:
            readers = set(self.reactor.getReaders()) - self._readers
            writers = set(self.reactor.getWriters()) - self._writers
            delayed = [
                c for c in self.reactor.getDelayedCalls() if c not in self._delayed
            ]
            return readers, writers, delayed

        try:
            await self.until(
                lambda: not any(leftovers()), timeout=2, what="reactor quiet"
            )
        except AssertionError:
            readers, writers, delayed = leftovers()
            problems += [f"reader left in the reactor: {r!r}" for r in readers]
            problems += [f"writer left in the reactor: {w!r}" for w in writers]
            problems += [f"delayed call left: {c!r}" for c in delayed]
            for selectable in readers | writers:
                self.reactor.removeReader(selectable)
                self.reactor.removeWriter(selectable)
                if hasattr(selectable, "stopListening"):
                    selectable.stopListening()
                elif hasattr(selectable, "abortConnection"):
                    selectable.abortConnection()
            for call in delayed:
                call.cancel()
        return problems


class _Once(Factory):
    """Hands out one prepared protocol (for a client endpoint)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance
