"""The TLS client protocol on the fake data-path harness: handshake gate, timeout,
and closing a side that cannot half-close. Deterministic (`MemoryReactorClock`)."""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs
from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure

from l4lb.config import CertificateConfig, FrontendTLSConfig
from l4lb.tls.termination import TLSClientProtocol
from tests.fakes import FakeTransport, Harness


class FakeHandle:
    """The parts of a finished ``SSL.Connection`` the log line reads."""

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_128_GCM_SHA256"

    def get_servername(self) -> bytes:
        return b"db.example.com"

    def get_alpn_proto_negotiated(self) -> bytes:
        return b""

    def get_peer_certificate(self, *, as_cryptography: bool = False) -> None:
        return None


class FakeTLSTransport(FakeTransport):
    """A FakeTransport that also hands out a TLS connection (like TLSMemoryBIOProtocol)."""

    def getHandle(self) -> FakeHandle:
        return FakeHandle()


def harness(**frontend: Any) -> Harness:
    tls = FrontendTLSConfig(
        certificates=(CertificateConfig("c.pem", "k.pem"),),
        handshake_timeout=frontend.pop("handshake_timeout", 10.0),
    )
    return Harness(frontend={"tls": tls, **frontend})


def accept(h: Harness) -> tuple[TLSClientProtocol, FakeTLSTransport]:
    address = IPv4Address("TCP", "10.0.0.7", 40000)
    protocol = TLSClientProtocol(h.frontend)
    transport = FakeTLSTransport(protocol, peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def closed_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "connection closed"]


class TestHandshakeGate:
    def test_no_server_before_the_handshake(self) -> None:
        """Accepted and counted, but no connect attempt until the handshake is done."""
        h = harness()
        client, transport = accept(h)
        assert h.pending_attempts() == []
        assert h.cap.live == 1 and len(h.frontend.sessions) == 1
        assert transport.producerState == "producing"  # reading the handshake
        client.handshakeCompleted()
        assert transport.producerState == "paused"
        assert len(h.pending_attempts()) == 1

    def test_bytes_with_the_handshake_go_first(self) -> None:
        """Bytes decrypted before the server is connected are sent first, in order."""
        h = harness()
        client, transport = accept(h)
        client.handshakeCompleted()
        client.dataReceived(b"early ")
        client.dataReceived(b"bytes")
        _, _, server_transport = h.complete()
        assert server_transport.value() == b"early bytes"
        client.dataReceived(b" later")
        assert server_transport.value() == b"early bytes later"
        assert transport.producerState == "producing"

    def test_failed_handshake_logs_and_never_connects(self) -> None:
        """A handshake that fails logs "handshake failed" and the reason."""
        from OpenSSL import SSL

        h = harness()
        client, transport = accept(h)
        error = SSL.Error([("SSL routines", "", "unsupported protocol")])
        with capture_logs() as logs:
            transport.connected = False
            client.connectionLost(Failure(error))
        (line,) = closed_lines(logs)
        assert (line["reason"], line["detail"]) == (
            "handshake failed",
            "unsupported protocol",
        )
        assert line["server"] is None
        assert h.pending_attempts() == [] and h.cap.live == 0

    def test_log_line_has_tls_fields(self) -> None:
        """Version, cipher and SNI of the handshake are in the connection's line."""
        h = harness()
        client, transport = accept(h)
        client.handshakeCompleted()
        _, _, server_transport = h.complete()
        with capture_logs() as logs:
            transport.lose()
            server_transport.lose()
        (line,) = closed_lines(logs)
        assert line["tls_version"] == "TLSv1.3"
        assert line["tls_cipher"] == "TLS_AES_128_GCM_SHA256"
        assert line["tls_sni"] == "db.example.com"
        assert "tls_alpn" not in line


class TestHandshakeTimeout:
    def test_timeout_aborts(self) -> None:
        """A client still in its handshake at handshake_timeout is aborted."""
        h = harness(handshake_timeout=5.0)
        _, transport = accept(h)
        h.clock.advance(4.9)
        assert not transport.disconnecting
        with capture_logs() as logs:
            h.clock.advance(0.1)
            assert transport.disconnected  # aborted
            transport.lose()
        (line,) = closed_lines(logs)
        assert line["reason"] == "handshake timeout"
        assert h.pending_attempts() == []
        assert h.clock.getDelayedCalls() == []

    def test_finished_handshake_cancels_the_timer(self) -> None:
        """After the handshake no handshake timer is left."""
        h = harness(handshake_timeout=5.0, idle_timeout=0.0)
        client, _ = accept(h)
        client.handshakeCompleted()
        assert [
            call
            for call in h.clock.getDelayedCalls()
            if call.func == client._handshake_timed_out
        ] == []

    def test_zero_means_no_limit(self) -> None:
        """handshake_timeout = 0 schedules nothing."""
        h = harness(handshake_timeout=0.0)
        accept(h)
        assert h.clock.getDelayedCalls() == []


class TestNoHalfClose:
    def test_server_fin_closes_the_tls_side(self) -> None:
        """A server FIN closes the TLS client (close_notify) instead of half-closing."""
        h = harness(half_closed_timeout=30.0)
        client, transport = accept(h)
        client.handshakeCompleted()
        _, _, server_transport = h.complete()
        server_transport.peer_sends_eof()
        assert transport.disconnecting and not transport.write_closed
        assert transport.producer is None

    def test_client_that_never_reads_is_aborted(self) -> None:
        """The TLS close of a client that does not read is aborted after the linger."""
        h = harness(half_closed_timeout=30.0)
        client, transport = accept(h)
        client.handshakeCompleted()
        _, _, server_transport = h.complete()
        server_transport.peer_sends_eof()
        h.clock.advance(29.0)
        assert not transport.disconnected
        h.clock.advance(1.0)
        assert transport.disconnected  # aborted

    def test_tls_client_close_is_a_server_fin(self) -> None:
        """When the TLS client goes, the server gets a flushing close (a FIN)."""
        h = harness()
        client, transport = accept(h)
        client.handshakeCompleted()
        _, _, server_transport = h.complete()
        client.dataReceived(b"last words")
        transport.lose()
        assert server_transport.value() == b"last words"
        assert server_transport.disconnecting


class TestShutdown:
    def test_shutdown_during_the_handshake(self) -> None:
        """A graceful stop closes a client still in its handshake, reason "shutdown"."""
        h = harness()
        _, transport = accept(h)
        (session,) = h.frontend.sessions
        with capture_logs() as logs:
            session.close("shutdown", abort=True)
            assert transport.disconnected
            transport.lose()
        (line,) = closed_lines(logs)
        assert line["reason"] == "shutdown"
        assert h.cap.live == 0
        assert h.clock.getDelayedCalls() == []
