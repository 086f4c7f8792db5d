"""Unit tests of the PostgreSQL STARTTLS negotiation, on a fake clock and fake transports.

The TLS layer is a stand-in (`FakeTLSLayer`): these tests drive what it would
report (bytes it received, a completed handshake, a handshake failure); the
real handshake is covered by `tests/test_pgstarttls_integration.py`.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from structlog.testing import capture_logs
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.python.failure import Failure
from zope.interface import alsoProvides

from l4lb.config import CertificateConfig, FrontendTLSConfig
from l4lb.proxy import ClientProtocol
from l4lb.tls.pgstarttls import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST,
    REFUSAL_MESSAGE,
    SSL_REQUEST,
    Kind,
    PostgresNegotiation,
    classify,
    error_response,
)
from tests.fakes import FakeTransport, Harness

CREATOR = object()  # what startTLS must receive: the frontend's creator, untouched

STARTUP = (
    struct.pack("!ii", 0, 196608) + b"user\0alice\0database\0app\0\0"
)  # length patched below
STARTUP = struct.pack("!i", len(STARTUP)) + STARTUP[4:]
CANCEL = struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, 4242, 987654321)
CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x11" * 32


class FakeTLSLayer:
    """What ``startTLS`` puts above the transport: records bytes, reports a handshake."""

    def __init__(self, transport: TLSFakeTransport, wrapped: Any) -> None:
        self.transport = transport
        self.wrapped = wrapped
        self.received = b""
        self.negotiatedProtocol: bytes | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def handshake_done(self, alpn: bytes | None = b"postgresql") -> None:
        self.negotiatedProtocol = alpn
        self.wrapped.handshakeCompleted()

    def decrypted(self, data: bytes) -> None:
        """Application bytes out of the TLS layer, as after the handshake."""
        self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self.wrapped.connectionLost(reason)


class TLSFakeTransport(FakeTransport):
    """A fake TCP transport that supports ``startTLS`` like Twisted's (TLS goes above)."""

    def __init__(self, protocol: Any = None, **kw: Any) -> None:
        super().__init__(protocol, **kw)
        self.tls: FakeTLSLayer | None = None
        self.tls_creator: Any = None
        self.plain = b""  # bytes written before TLS started

    def startTLS(self, creator: Any) -> None:
        self.tls_creator = creator
        self.plain = self.value()
        self.tls = FakeTLSLayer(self, self.protocol)
        self.protocol = self.tls
        alsoProvides(self, ISSLTransport)


def tls_config(**kw: Any) -> FrontendTLSConfig:
    return FrontendTLSConfig(
        certificates=(CertificateConfig(cert="c.pem", key="c.key"),),
        starttls="postgres",
        **kw,
    )


class Lab:
    """A starttls frontend before fake servers; ``accept`` gives a negotiating client."""

    def __init__(self, servers: int = 1, **tls: Any) -> None:
        self.h = Harness(servers, frontend={"tls": tls_config(**tls)})
        self.h.frontend.tls = CREATOR

    def accept(self) -> tuple[PostgresNegotiation, TLSFakeTransport]:
        addr = IPv4Address("TCP", "10.0.0.7", 40000)
        protocol = self.h.frontend.buildProtocol(addr)
        assert isinstance(protocol, PostgresNegotiation)
        transport = TLSFakeTransport(protocol, peerAddress=addr)
        protocol.makeConnection(transport)
        return protocol, transport

    @property
    def attempts(self) -> list[Any]:
        return self.h.pending_attempts()


def closed_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "connection closed"]


def feed(transport: TLSFakeTransport, data: bytes, step: int | None = None) -> None:
    """Deliver ``data`` in ``step``-sized reads to whatever protocol the transport has now."""
    step = step or len(data)
    for i in range(0, len(data), step):
        transport.protocol.dataReceived(data[i : i + step])


class TestClassify:
    @pytest.mark.parametrize(
        ("data", "kind"),
        [
            (SSL_REQUEST, Kind.SSL_REQUEST),
            (GSSENC_REQUEST, Kind.GSSENC_REQUEST),
            (STARTUP, Kind.STARTUP),
            (CANCEL, Kind.CANCEL),
            (b"\x16", Kind.DIRECT_TLS),
            (CLIENT_HELLO_START, Kind.DIRECT_TLS),
            (struct.pack("!ii", 8, 0x00030002), Kind.STARTUP),  # protocol 3.2
        ],
    )
    def test_known_openings(self, data: bytes, kind: Kind) -> None:
        """Each request the PostgreSQL protocol defines is recognised."""
        assert classify(data).kind is kind

    @pytest.mark.parametrize(
        ("data", "problem"),
        [
            (struct.pack("!ii", 9, 80877103), "SSLRequest with length 9, not 8"),
            (struct.pack("!ii", 16, 80877104), "GSSENCRequest with length 16, not 8"),
            (struct.pack("!ii", 8, CANCEL_REQUEST_CODE), "CancelRequest with length 8"),
            (struct.pack("!ii", 7, 196608), "StartupMessage with invalid length 7"),
            (struct.pack("!ii", 10001, 196608), "invalid length 10001"),
            (struct.pack("!ii", -8, 196608), "not a PostgreSQL startup packet"),
            (
                struct.pack("!ii", 8, 0x00020000),
                "unsupported protocol or request code 2.0",
            ),
            (struct.pack("!ii", 8, 1234 << 16 | 9999), "request code 1234.9999"),
            (b"GET / HTTP/1.1\r\n", "not a PostgreSQL startup packet"),
            (b"\x01", "not a PostgreSQL startup packet"),
        ],
    )
    def test_invalid_openings(self, data: bytes, problem: str) -> None:
        """Bad lengths, unknown codes and other protocols are refused with a reason."""
        opening = classify(data)
        assert opening.kind is Kind.INVALID
        assert problem in (opening.problem or "")

    @pytest.mark.parametrize("data", [SSL_REQUEST, GSSENC_REQUEST, STARTUP, CANCEL])
    def test_prefixes_need_more(self, data: bytes) -> None:
        """Fewer than 8 bytes of a valid packet are not decided yet."""
        for end in range(8):
            assert classify(data[:end]).kind is Kind.NEED_MORE

    @given(st.binary(max_size=64))
    def test_never_raises_and_decides_by_eight_bytes(self, data: bytes) -> None:
        """Any bytes classify without raising; 8 bytes always suffice for a decision."""
        opening = classify(data)
        if len(data) >= 8:
            assert opening.kind is not Kind.NEED_MORE
        if opening.kind is not Kind.NEED_MORE:
            # More bytes never change a decision already taken.
            assert classify(data + b"\0" * 8).kind is opening.kind


class TestErrorResponse:
    def test_wire_format(self) -> None:
        """A FATAL ErrorResponse with SQLSTATE and message, length-prefixed like the server's."""
        message = error_response("TLS required")
        assert message[:1] == b"E"
        (length,) = struct.unpack("!i", message[1:5])
        assert length == len(message) - 1
        assert message[5:] == b"SFATAL\0VFATAL\0C28000\0MTLS required\0\0"


class TestSSLRequest:
    @pytest.mark.parametrize("step", [None, 1, 3])
    def test_answers_s_then_starts_tls(self, step: int | None) -> None:
        """An SSLRequest, whole or byte by byte, gets ``S`` and then TLS with the frontend's creator."""
        lab = Lab()
        protocol, transport = lab.accept()
        feed(transport, SSL_REQUEST[:7], step)
        assert transport.value() == b"" and transport.tls is None
        protocol.dataReceived(SSL_REQUEST[7:])
        assert transport.plain == b"S"
        assert transport.tls_creator is CREATOR
        assert lab.attempts == []  # no backend before the handshake

    def test_backend_only_after_handshake(self) -> None:
        """The server connection is opened once the handshake completes, and the stream is spliced."""
        lab = Lab()
        protocol, transport = lab.accept()
        protocol.dataReceived(SSL_REQUEST)
        assert lab.attempts == []
        assert transport.tls is not None
        transport.tls.handshake_done()
        assert len(lab.attempts) == 1
        _, _, server_transport = lab.h.complete()
        transport.tls.decrypted(STARTUP)
        assert server_transport.value() == STARTUP
        assert isinstance(protocol.client, ClientProtocol)
        assert protocol.client.session.bytes_from_client == len(STARTUP)

    def test_bytes_decrypted_before_connect_go_first(self) -> None:
        """Bytes the TLS layer delivers before the backend is connected reach it first, in order."""
        lab = Lab()
        protocol, transport = lab.accept()
        protocol.dataReceived(SSL_REQUEST)
        assert transport.tls is not None
        transport.tls.handshake_done()
        transport.tls.decrypted(STARTUP[:10])
        transport.tls.decrypted(STARTUP[10:])
        _, _, server_transport = lab.h.complete()
        assert server_transport.value() == STARTUP
        transport.tls.decrypted(b"Q...")
        assert server_transport.value() == STARTUP + b"Q..."

    def test_unencrypted_bytes_after_request_refused(self) -> None:
        """Bytes pipelined after an SSLRequest (sent in plaintext) close the connection."""
        lab = Lab()
        protocol, transport = lab.accept()
        with capture_logs() as logs:
            protocol.dataReceived(SSL_REQUEST + STARTUP)
            transport.lose()
        assert transport.value() == b"" and transport.tls is None
        assert transport.disconnected  # aborted
        (line,) = closed_lines(logs)
        assert line["reason"] == "bad startup packet"
        assert "unencrypted data after SSLRequest" in line["detail"]
        assert lab.attempts == []

    def test_handshake_failure_logged(self) -> None:
        """A failed handshake ends with one line naming OpenSSL's reason, no backend."""
        lab = Lab()
        protocol, transport = lab.accept()
        protocol.dataReceived(SSL_REQUEST)
        failure = Failure(SSL.Error([("SSL routines", "", "unsupported protocol")]))
        with capture_logs() as logs:
            transport.connected = False
            assert transport.tls is not None
            transport.tls.connectionLost(failure)
        (line,) = closed_lines(logs)
        assert (line["reason"], line["detail"]) == (
            "tls handshake failed",
            "unsupported protocol",
        )
        assert line["server"] is None and line["tls"] == "sslrequest"
        assert lab.attempts == []
        assert not lab.h.frontend.sessions and lab.h.cap.live == 0


class TestGSSENCRequest:
    def test_answers_n_then_ssl(self) -> None:
        """A GSSENCRequest gets ``N``; the SSLRequest that follows gets ``S``."""
        lab = Lab()
        protocol, transport = lab.accept()
        feed(transport, GSSENC_REQUEST, 1)
        assert transport.value() == b"N"
        feed(transport, SSL_REQUEST, 1)
        assert transport.plain == b"NS"
        assert transport.tls is not None

    def test_then_plaintext_startup_refused(self) -> None:
        """After ``N`` a plaintext StartupMessage meets the plaintext policy."""
        lab = Lab()
        protocol, transport = lab.accept()
        protocol.dataReceived(GSSENC_REQUEST)
        protocol.dataReceived(STARTUP)
        assert transport.value() == b"N" + error_response(REFUSAL_MESSAGE)

    def test_second_request_refused(self) -> None:
        """A second GSSENCRequest is a protocol violation: closed."""
        lab = Lab()
        protocol, transport = lab.accept()
        protocol.dataReceived(GSSENC_REQUEST)
        protocol.dataReceived(GSSENC_REQUEST)
        assert transport.value() == b"N"
        assert transport.disconnecting

    def test_direct_tls_after_it_refused(self) -> None:
        """A ClientHello after ``N`` is refused (direct TLS comes first or not at all)."""
        lab = Lab()
        protocol, transport = lab.accept()
        protocol.dataReceived(GSSENC_REQUEST)
        protocol.dataReceived(CLIENT_HELLO_START)
        assert transport.tls is None and transport.disconnecting


class TestPlaintext:
    @pytest.mark.parametrize(
        ("packet", "name"), [(STARTUP, "StartupMessage"), (CANCEL, "CancelRequest")]
    )
    def test_refused_with_error_response(self, packet: bytes, name: str) -> None:
        """With ``plaintext = "refuse"`` the client gets a FATAL ErrorResponse and is closed."""
        lab = Lab()
        protocol, transport = lab.accept()
        with capture_logs() as logs:
            feed(transport, packet, 1)
            assert transport.value() == error_response(REFUSAL_MESSAGE)
            assert (
                transport.disconnecting and not transport.disconnected
            )  # flushed, not aborted
            transport.lose()
        (line,) = closed_lines(logs)
        assert (line["reason"], line["detail"]) == (
            "plaintext refused",
            f"{name} without TLS",
        )
        assert lab.attempts == []
        assert not lab.h.frontend.sessions

    @pytest.mark.parametrize("step", [None, 1, 5])
    def test_allowed_bytes_reach_server_first(self, step: int | None) -> None:
        """With ``"allow"`` the bytes already read reach the server before the rest."""
        lab = Lab(plaintext="allow")
        protocol, transport = lab.accept()
        # The decision comes at the 8th byte; a paused transport reads no more.
        read = len(STARTUP) if step is None else 8
        feed(transport, STARTUP[:read], step)
        assert len(lab.attempts) == 1
        assert transport.value() == b""
        client = protocol.client
        assert client is not None and transport.protocol is client  # stepped out
        assert transport.producerState == "paused"
        _, _, server_transport = lab.h.complete()
        assert transport.producerState == "producing"
        assert server_transport.value() == STARTUP[:read]
        feed(transport, STARTUP[read:] + b"Q\0\0\0\x0dSELECT 1\0", step)
        assert server_transport.value() == STARTUP + b"Q\0\0\0\x0dSELECT 1\0"


class TestDirectTLS:
    @pytest.mark.parametrize("step", [None, 1])
    def test_starts_tls_and_replays_bytes(self, step: int | None) -> None:
        """A ClientHello starts TLS at once; every byte read is replayed into the TLS layer."""
        lab = Lab()
        protocol, transport = lab.accept()
        feed(transport, CLIENT_HELLO_START, step)
        assert transport.tls is not None
        assert transport.plain == b""
        assert transport.tls.received == CLIENT_HELLO_START
        transport.tls.handshake_done(b"postgresql")
        assert len(lab.attempts) == 1

    @pytest.mark.parametrize("alpn", [None, b"http/1.1"])
    def test_alpn_postgresql_required(self, alpn: bytes | None) -> None:
        """Direct TLS without ALPN ``postgresql`` is closed, never reaching a server."""
        lab = Lab()
        protocol, transport = lab.accept()
        protocol.dataReceived(CLIENT_HELLO_START)
        assert transport.tls is not None
        with capture_logs() as logs:
            transport.tls.handshake_done(alpn)
            transport.lose()
        (line,) = closed_lines(logs)
        assert line["reason"] == "tls handshake failed"
        assert "without ALPN postgresql" in line["detail"]
        assert lab.attempts == []

    def test_alpn_not_required_after_sslrequest(self) -> None:
        """Clients older than libpq 17 send no ALPN after an SSLRequest: accepted."""
        lab = Lab()
        protocol, transport = lab.accept()
        protocol.dataReceived(SSL_REQUEST)
        assert transport.tls is not None
        transport.tls.handshake_done(None)
        assert len(lab.attempts) == 1


class TestEnding:
    @pytest.mark.parametrize(
        "opening", [b"", SSL_REQUEST[:5], GSSENC_REQUEST, SSL_REQUEST]
    )
    def test_silence_times_out(self, opening: bytes) -> None:
        """Silence (or an unfinished handshake) past ``handshake_timeout`` aborts, logged once."""
        lab = Lab(handshake_timeout=5.0)
        protocol, transport = lab.accept()
        protocol.dataReceived(opening)
        with capture_logs() as logs:
            lab.h.clock.advance(4.9)
            assert not transport.disconnecting
            lab.h.clock.advance(0.2)
            assert transport.disconnected  # aborted
            transport.lose()
        (line,) = closed_lines(logs)
        assert line["reason"] == "handshake timeout"
        assert lab.h.clock.getDelayedCalls() == []
        assert lab.attempts == []

    def test_refused_client_that_never_closes_is_aborted(self) -> None:
        """After a refusal, a client that never reads or closes is aborted at the timeout."""
        lab = Lab(handshake_timeout=5.0)
        protocol, transport = lab.accept()
        lab.h.clock.advance(1)
        protocol.dataReceived(STARTUP)
        assert transport.disconnecting and not transport.disconnected
        lab.h.clock.advance(4.9)
        assert not transport.disconnected  # a full timeout from the refusal
        lab.h.clock.advance(0.2)
        assert transport.disconnected
        transport.lose()
        assert lab.h.clock.getDelayedCalls() == []

    def test_garbage_closed_and_logged(self) -> None:
        """Another protocol's bytes are closed at once with the reason."""
        lab = Lab()
        protocol, transport = lab.accept()
        with capture_logs() as logs:
            protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
            transport.lose()
        (line,) = closed_lines(logs)
        assert line["reason"] == "bad startup packet"
        assert line["detail"] == "not a PostgreSQL startup packet"
        assert line["client"] == "10.0.0.7:40000"
        assert transport.value() == b""
        assert lab.h.clock.getDelayedCalls() == []

    def test_client_leaving_logged(self) -> None:
        """A client that leaves mid-negotiation frees its slot and gets its line."""
        lab = Lab()
        protocol, transport = lab.accept()
        protocol.dataReceived(SSL_REQUEST[:3])
        with capture_logs() as logs:
            transport.lose(error.ConnectionLost)
        (line,) = closed_lines(logs)
        assert line["reason"] == "client closed"
        assert not lab.h.frontend.sessions and lab.h.cap.live == 0
        assert lab.h.clock.getDelayedCalls() == []

    def test_shutdown_closes_negotiating_client(self) -> None:
        """A negotiating client is a live connection that shutdown can close."""
        lab = Lab()
        protocol, transport = lab.accept()
        (live,) = lab.h.frontend.sessions
        assert live is protocol
        with capture_logs() as logs:
            live.close("shutdown", abort=True)
            transport.lose()
        assert transport.disconnected
        assert closed_lines(logs)[0]["reason"] == "shutdown"


class TestSlots:
    def test_slot_kept_across_hand_over(self) -> None:
        """The negotiating client holds a slot, which passes to its session unchanged."""
        lab = Lab()
        frontend, cap = lab.h.frontend, lab.h.cap
        protocol, transport = lab.accept()
        assert (len(frontend.sessions), cap.live, frontend.accepted) == (1, 1, 1)
        protocol.dataReceived(SSL_REQUEST)
        assert transport.tls is not None
        transport.tls.handshake_done()
        (session,) = frontend.sessions
        assert session is protocol.client.session  # type: ignore[union-attr]
        assert (cap.live, frontend.accepted) == (1, 1)

    def test_cap_counts_negotiating_clients(self) -> None:
        """At the frontend cap, negotiating clients stop further accepts."""
        lab = Lab()
        lab.h = Harness(1, frontend={"tls": tls_config(), "max_connections": 1})
        lab.h.frontend.tls = CREATOR
        lab.accept()
        assert lab.h.frontend.room() == 0


class TestTLSClientClose:
    def test_server_fin_closes_tls_client(self) -> None:
        """A TLS client cannot half-close: the server's FIN closes it (close_notify), not shuts a write half."""
        lab = Lab()
        protocol, transport = lab.accept()
        protocol.dataReceived(SSL_REQUEST)
        assert transport.tls is not None
        transport.tls.handshake_done()
        _, server, server_transport = lab.h.complete()
        server.readConnectionLost()
        assert transport.disconnecting
        assert not transport.write_closed


class TestProperties:
    @settings(max_examples=300, deadline=None)
    @given(
        data=st.tuples(
            st.sampled_from(
                [b"", SSL_REQUEST, GSSENC_REQUEST, STARTUP[:8], CANCEL[:8]]
            ),
            st.binary(max_size=40),
        ).map(b"".join),
        cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=6),
        allow=st.booleans(),
    )
    def test_random_bytes_never_raise(
        self, data: bytes, cuts: list[int], allow: bool
    ) -> None:
        """Any bytes in any chunks end negotiating, closed, TLS or handed over; never an exception."""
        lab = Lab(plaintext="allow" if allow else "refuse")
        protocol, transport = lab.accept()
        start = 0
        for cut in [*cuts, len(data)]:
            if transport.producerState == "paused" or transport.disconnecting:
                break  # a paused or closing transport reads no more
            transport.protocol.dataReceived(data[start : start + cut])
            start += cut
            if start >= len(data):
                break
        if transport.tls is not None:
            assert transport.plain in (b"", b"S", b"N", b"NS")
        if lab.attempts:
            # A backend only in plaintext "allow": the bytes read go first.
            assert allow and protocol.client is not None
            assert classify(data).kind in (Kind.STARTUP, Kind.CANCEL) or (
                data.startswith(GSSENC_REQUEST)
                and classify(data[8:]).kind in (Kind.STARTUP, Kind.CANCEL)
            )
        transport.lose()
        assert not lab.h.frontend.sessions
        assert lab.h.clock.getDelayedCalls() == []
