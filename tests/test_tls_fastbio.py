"""`l4lb.tls.fastbio`: the leaner TLS protocol, in memory against a pyOpenSSL client.

The real-socket paths (direct send, the read right after accept) run in
``test_tls_termination.py`` and ``test_tls_e2e.py``; here each behaviour is
pinned without a reactor: delivery of many records in few calls, both read
paths (pyOpenSSL's cffi ``SSL_read`` and its public ``recv``), data before a
close_notify, one transport write per application write, and the interface
declarations.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import providedBy

from l4lb.config import CertificateConfig, FrontendTLSConfig
from l4lb.tls import fastbio
from l4lb.tls.termination import ServerTLS
from tests.tls_material import TLSMaterial


class Collector(Protocol):
    """Records what the TLS layer delivers."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class Settling(Collector):
    """A `Collector` that wants ``handshakeSettled`` (as `TLSClientProtocol` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[object] = []

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.events.append(data)

    def handshakeSettled(self) -> None:
        self.events.append("settled")


class Pair:
    """A server `TerminatingTLSProtocol` on a StringTransport, and a client.

    ``first`` is sent by the client with its Finished (one server read),
    followed by a close_notify with ``close``; ``complete``: whether the
    server is expected to finish the handshake.
    """

    def __init__(
        self,
        server_tls: ServerTLS,
        app: Collector | None = None,
        first: bytes = b"",
        close: bool = False,
        complete: bool = True,
    ) -> None:
        self.app = app if app is not None else Collector()
        factory = server_tls.wrap(Factory.forProtocol(lambda: self.app))
        self.server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.wire = StringTransport()
        self.server.makeConnection(self.wire)
        client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.client = SSL.Connection(client_context, None)
        self.client.set_connect_state()
        done = False
        for _ in range(4):
            if not done:
                with contextlib.suppress(SSL.WantReadError):
                    self.client.do_handshake()
                    done = True
                    if first:
                        self.client_sends(first)
                    if close:
                        self.client.shutdown()
            self.to_server()
            self.to_client()
        assert self.server._handshakeDone == complete

    def to_server(self) -> None:
        """Everything the client has queued, in one server read."""
        data = b""
        while True:
            try:
                data += self.client.bio_read(1 << 20)
            except SSL.WantReadError:
                break
        if data:
            self.server.dataReceived(data)

    def to_client(self) -> bytes:
        """Hand the server's output to the client; the plaintext it decrypts."""
        if self.wire.value():
            self.client.bio_write(self.wire.value())
        self.wire.clear()
        plain = b""
        while True:
            try:
                plain += self.client.recv(1 << 16)
            except (SSL.WantReadError, SSL.ZeroReturnError):
                return plain

    def client_sends(self, payload: bytes) -> None:
        view = memoryview(payload)
        while view:
            view = view[self.client.send(view) :]


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    material = TLSMaterial(Path(tmp_path_factory.mktemp("fastbio")))
    issued = material.server("db", "db.example.com")
    config = FrontendTLSConfig(
        certificates=(
            CertificateConfig(cert=str(issued.cert_path), key=str(issued.key_path)),
        )
    )
    return ServerTLS(config, "frontend.fe.tls")


@pytest.fixture(params=["cffi SSL_read", "public recv"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "public recv":
        monkeypatch.setattr(fastbio, "_SSL_read", None)
    return str(request.param)


class TestReceive:
    def test_many_records_arrive_in_few_deliveries(
        self, server_tls: ServerTLS, read_path: str
    ) -> None:
        """600 KiB read at once (38 records) reaches the application whole, in few calls."""
        pair = Pair(server_tls)
        payload = bytes(range(256)) * (600 * 4)
        pair.client_sends(payload)
        pair.to_server()
        assert b"".join(pair.app.chunks) == payload
        # Direct: one per 256 KiB buffer; public: one per read.
        assert len(pair.app.chunks) <= 3

    def test_data_before_close_notify_is_delivered_first(
        self, server_tls: ServerTLS, read_path: str
    ) -> None:
        """Bytes followed by close_notify in the same read arrive, then TLS shuts down."""
        pair = Pair(server_tls)
        pair.client_sends(b"last words")
        pair.client.shutdown()
        pair.to_server()
        assert b"".join(pair.app.chunks) == b"last words"
        assert pair.server._lostTLSConnection
        assert pair.wire.disconnecting

    def test_garbage_fails_the_connection(
        self, server_tls: ServerTLS, read_path: str
    ) -> None:
        """A corrupt record after the handshake ends TLS with the OpenSSL error."""
        pair = Pair(server_tls)
        pair.server.dataReceived(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        assert pair.app.chunks == []
        assert pair.server._lostTLSConnection
        assert isinstance(pair.server._reason.value, SSL.Error)


class TestSettled:
    """``handshakeSettled``: the application hears of the handshake after its read."""

    def test_called_once_after_the_bytes_of_the_same_read(
        self, server_tls: ServerTLS, read_path: str
    ) -> None:
        """Bytes sent with the Finished are delivered first, then settled, once."""
        app = Settling()
        pair = Pair(server_tls, app, first=b"hello")
        assert app.events == [b"hello", "settled"]
        pair.client_sends(b"more")
        pair.to_server()
        assert app.events == [b"hello", "settled", b"more"]

    def test_called_without_bytes(self, server_tls: ServerTLS) -> None:
        app = Settling()
        Pair(server_tls, app)
        assert app.events == ["settled"]

    def test_not_called_when_the_client_closed_with_its_finished(
        self, server_tls: ServerTLS, read_path: str
    ) -> None:
        """close_notify in the read that finished the handshake: no settled, TLS closes."""
        app = Settling()
        pair = Pair(server_tls, app, first=b"bye", close=True)
        assert app.events == [b"bye"]
        assert pair.server._lostTLSConnection
        assert pair.wire.disconnecting

    def test_client_reset_before_its_finished_is_read(
        self, server_tls: ServerTLS, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A reset pending with the client's Finished: dropped, not processed."""
        monkeypatch.setattr(
            fastbio.TerminatingTLSProtocol, "_reset_by_peer", lambda self: True
        )
        app = Settling()
        pair = Pair(server_tls, app, first=b"hello", complete=False)
        assert app.events == []
        assert pair.wire.disconnected  # aborted

    def test_other_applications_are_not_asked(self, server_tls: ServerTLS) -> None:
        """An application without ``handshakeSettled`` sees Twisted's behaviour."""
        pair = Pair(server_tls, first=b"hi")
        assert pair.app.chunks == [b"hi"]
        assert not pair.wire.disconnecting


class TestSend:
    def test_one_application_write_is_one_transport_write(
        self, server_tls: ServerTLS
    ) -> None:
        """100 KiB becomes seven records handed to the transport in one write."""
        pair = Pair(server_tls)
        writes: list[bytes] = []
        pair.wire.write = writes.append  # type: ignore[method-assign]
        payload = b"x" * (100 * 1024)
        pair.server.write(payload)
        assert len(writes) == 1
        pair.wire.io.write(writes[0])
        assert pair.to_client() == payload


class TestInterfaces:
    def test_provides_what_the_transport_provides_once_per_spec(
        self, server_tls: ServerTLS
    ) -> None:
        """Both connections provide the transport's interfaces, from one cached declaration."""
        first, second = Pair(server_tls), Pair(server_tls)
        assert ITCPTransport.providedBy(first.server)
        assert set(providedBy(first.wire)) <= set(providedBy(first.server))
        assert first.server.__provides__ is second.server.__provides__
