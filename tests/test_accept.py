"""`l4lb.accept`: the listening port's lean accept loop and server transports."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import pytest_twisted
from twisted.internet import reactor, task, tcp
from twisted.internet.protocol import Factory, Protocol

from l4lb import accept


class _Echo(Protocol):
    made: list[_Echo] = []

    def connectionMade(self) -> None:
        _Echo.made.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


async def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = reactor.seconds() + timeout
    while not condition():
        assert reactor.seconds() < deadline, "timed out"
        await task.deferLater(reactor, 0.005, lambda: None)


class TestTwistedPrivateAPI:
    """Fails loudly if the parts of ``tcp.Port``/``tcp.Server`` used here change."""

    def test_port_and_server(self) -> None:
        assert tcp.Port.transport is tcp.Server
        for name in ("_buildAddr", "doRead", "startListening"):
            assert callable(getattr(tcp.Port, name)), name
        listen_names = tcp.Port.startListening.__code__.co_names
        assert "numberAccepts" in listen_names
        read_names = tcp.Port.doRead.__code__.co_names
        for name in ("sessionno", "numberAccepts", "transport", "buildProtocol"):
            assert name in read_names, name
        # What tcp.Server.__init__ sets, and accept.Server sets too (or derives).
        server_names = set(tcp.Server.__init__.__code__.co_names)
        assert server_names <= {
            "Connection",
            "__init__",
            "len",
            "_addressType",
            "address",
            "IPv6Address",
            "server",
            "client",
            "sessionno",
            "hostname",
            "_getLogPrefix",
            "protocol",
            "logstr",
            "repstr",
            "format",
            "__class__",
            "__name__",
            "_realPortNumber",
            "startReading",
            "connected",
        }, server_names
        assert tcp.Server._shouldShutdown is True  # Twisted's default, ours differs
        assert "_shouldShutdown" in tcp._SocketCloser._closeSocket.__code__.co_names

    def test_what_stops_reading_calls_stopReading(self) -> None:
        """`accept.Server` hears of a stop or close during makeConnection
        through its ``stopReading``: these must keep calling it."""
        from twisted.internet import abstract

        for method in (
            abstract.FileDescriptor.pauseProducing,
            abstract.FileDescriptor.loseConnection,
            abstract.FileDescriptor.connectionLost,
            tcp.Connection.abortConnection,
        ):
            assert "stopReading" in method.__code__.co_names, method

    def test_lean_only_twisted_port(self) -> None:
        class Other(tcp.Port):
            pass

        other = Other(0, Factory())
        assert not accept.lean(other)
        assert type(other) is Other
        port = tcp.Port(0, Factory())
        assert accept.lean(port)
        assert type(port) is accept.Port


class TestLeanPort:
    @pytest_twisted.ensureDeferred
    async def test_accepts_many_and_serves_them(self) -> None:
        _Echo.made = []
        port = reactor.listenTCP(0, Factory.forProtocol(_Echo), interface="127.0.0.1")
        assert accept.lean(port)
        peers = []
        try:
            for _ in range(30):  # more than one accept batch
                peers.append(
                    socket.create_connection(("127.0.0.1", port.getHost().port))
                )
            await _until(lambda: len(_Echo.made) == 30)
            for i, peer in enumerate(peers):
                peer.sendall(b"hi %d" % i)
            received = [b""] * len(peers)

            def echoed() -> bool:
                for i, peer in enumerate(peers):
                    with contextlib.suppress(BlockingIOError):
                        received[i] += peer.recv(100, socket.MSG_DONTWAIT)
                return all(r == b"hi %d" % i for i, r in enumerate(received))

            await _until(echoed)
            transport: Any = _Echo.made[3].transport
            assert type(transport) is accept.Server
            assert transport.sessionno == 3
            peer_port = peers[3].getsockname()[1]
            assert transport.logstr == "_Echo,3,127.0.0.1"
            assert repr(transport) == f"<_Echo #3 on {port.getHost().port}>"
            assert transport.getPeer().port == peer_port
            assert transport.connected and transport in reactor.getReaders()
            transport.logstr = "changed"
            assert transport.logstr == "changed"
            # Closed without shutdown(2): the peer still sees an orderly FIN.
            transport.loseConnection()
            await _until(lambda: not transport.connected)
            peers[3].settimeout(5)
            assert peers[3].recv(10) == b""
        finally:
            for peer in peers:
                peer.close()
            await _until(lambda: all(not e.transport.connected for e in _Echo.made))
            await port.stopListening()

    @pytest_twisted.ensureDeferred
    async def test_reading_starts_after_makeConnection_unless_stopped(self) -> None:
        """A protocol that stops reading in connectionMade is never registered;
        one that does nothing, or stops then resumes, or raises, reads."""
        made: list[Any] = []
        registered: list[Any] = []

        class P(Protocol):
            def connectionMade(self) -> None:
                self.was_reading = self.transport in reactor.getReaders()
                made.append(self)
                mode = modes[len(made) - 1]
                if mode in ("pause", "pause-resume"):
                    self.transport.pauseProducing()
                if mode == "pause-resume":
                    self.transport.resumeProducing()
                if mode == "close":
                    self.transport.loseConnection()
                if mode == "abort":
                    self.transport.abortConnection()
                if mode == "raise":
                    raise RuntimeError("connectionMade failed")

        modes = ["plain", "pause", "pause-resume", "close", "abort", "raise"]
        port = reactor.listenTCP(0, Factory.forProtocol(P), interface="127.0.0.1")
        assert accept.lean(port)
        add_reader = reactor.addReader

        def counting(reader: Any) -> None:
            registered.append(reader)
            add_reader(reader)

        reactor.addReader = counting  # type: ignore[method-assign]
        peers = []
        try:
            for _ in modes:
                peers.append(
                    socket.create_connection(("127.0.0.1", port.getHost().port))
                )
                n = len(peers)
                await _until(lambda n=n: len(made) == n)  # type: ignore[misc]
        finally:
            reactor.addReader = add_reader  # type: ignore[method-assign]
        try:
            by_mode = dict(zip(modes, made, strict=True))
            assert not any(p.was_reading for p in made)  # after makeConnection
            readers = reactor.getReaders()
            assert by_mode["plain"].transport in readers
            assert by_mode["pause"].transport not in readers
            assert by_mode["pause"].transport not in registered  # no epoll change
            assert by_mode["pause-resume"].transport in readers
            assert by_mode["raise"].transport in readers  # as Twisted leaves it
            assert accept._unstarted is None
            await _until(
                lambda: (
                    not by_mode["close"].transport.connected
                    and not by_mode["abort"].transport.connected
                )
            )
            assert by_mode["close"].transport not in registered
            by_mode["pause"].transport.resumeProducing()
            assert by_mode["pause"].transport in reactor.getReaders()
        finally:
            for peer in peers:
                peer.close()
            await _until(lambda: all(not p.transport.connected for p in made))
            await port.stopListening()

    @pytest_twisted.ensureDeferred
    async def test_protocol_none_closes_the_client(self) -> None:
        class Refuse(Factory):
            def buildProtocol(self, addr: Any) -> None:  # type: ignore[override]
                return None

        port = reactor.listenTCP(0, Refuse(), interface="127.0.0.1")
        accept.lean(port)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        peer.setblocking(False)
        try:
            got: list[bytes] = []

            def closed() -> bool:
                try:
                    got.append(peer.recv(10))
                except BlockingIOError:
                    return False
                except ConnectionResetError:
                    got.append(b"")
                return True

            await _until(closed)
            assert got == [b""]
        finally:
            peer.close()
            await port.stopListening()

    @pytest_twisted.ensureDeferred
    async def test_ipv6(self) -> None:
        _Echo.made = []
        try:
            port = reactor.listenTCP(0, Factory.forProtocol(_Echo), interface="::1")
        except Exception:  # no IPv6 here
            return
        accept.lean(port)
        peer = socket.create_connection(("::1", port.getHost().port))
        try:
            await _until(lambda: len(_Echo.made) == 1)
            transport: Any = _Echo.made[0].transport
            assert transport.getPeer().host == "::1"
            assert transport.logstr.endswith(",::1")
        finally:
            peer.close()
            await _until(lambda: not _Echo.made[0].transport.connected)
            await port.stopListening()
