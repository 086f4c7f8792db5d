"""SNI routing in the data path, on a fake clock with fake transports."""

from __future__ import annotations

import attrs
from structlog.testing import capture_logs

from l4lb.timers import queue_for
from l4lb.tls.passthrough import SniRouter
from tests.fakes import Harness
from tests.test_clienthello import python_hello, record

HELLO = python_hello("a.example.com")


def routed(default: bool = True, timeout: float = 10.0) -> Harness:
    """A harness whose frontend routes a.example.com to its pool."""
    h = Harness()
    h.frontend.config = attrs.evolve(
        h.frontend_config,
        route_by_sni=(("a.example.com", "p"),),
        handshake_timeout=timeout,
        pool="p" if default else None,
    )
    default_pool = h.pool if default else None
    h.frontend.pool = default_pool
    h.frontend.router = SniRouter(
        h.frontend.config, {"p": h.pool}, default_pool, h.clock
    )
    return h


def closed_lines(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] == "connection closed"]


class TestReading:
    def test_client_read_but_no_connect_until_the_hello(self) -> None:
        """The client is read for its hello; no server connect starts before it is whole."""
        h = routed()
        client, transport = h.accept()
        assert transport.producerState == "producing"
        assert h.cap.live == 1  # counted against the caps from accept on
        client.dataReceived(HELLO[:100])
        assert h.pending_attempts() == []
        client.dataReceived(HELLO[100:])
        assert transport.producerState == "paused"  # until the server is connected
        assert len(h.pending_attempts()) == 1

    def test_hello_and_what_follows_go_first_in_order(self) -> None:
        """The kept bytes, including any after the hello, reach the server before later ones."""
        h = routed()
        client, transport = h.accept()
        after = record(b"\x01", kind=20)
        client.dataReceived(HELLO + after)
        _, _, server_transport = h.complete()
        assert transport.producerState == "producing"
        client.dataReceived(b"later")
        assert server_transport.value() == HELLO + after + b"later"
        assert client.session.bytes_from_client == len(HELLO + after) + 5

    def test_no_timer_left_after_routing(self) -> None:
        """Once the hello is in, its timer is gone."""
        h = routed()
        client, _ = h.accept()
        client.dataReceived(HELLO)
        h.complete()
        # Only the session's own timer (idle / half-closed checks) is left.
        # (Session timers share one DelayedCall per clock: l4lb.timers.)
        [timer] = h.clock.getDelayedCalls()
        timers = queue_for(h.clock)
        assert timer.func == timers._fire
        assert timers.live == 1 and client.session._timer is not None


class TestTimeout:
    def test_handshake_timeout_closes_the_client(self) -> None:
        """A hello not complete within handshake_timeout closes the client."""
        h = routed(timeout=2.0)
        client, transport = h.accept()
        client.dataReceived(HELLO[:10])
        h.clock.advance(1.9)
        assert not transport.disconnecting
        with capture_logs() as logs:
            h.clock.advance(0.1)
            assert transport.disconnecting
            transport.lose()
        [line] = closed_lines(logs)
        assert (line["reason"], line["duration"]) == ("client hello timeout", 2.0)
        assert h.pending_attempts() == []
        assert h.clock.getDelayedCalls() == []
        assert h.cap.live == 0

    def test_client_leaving_cancels_the_timer(self) -> None:
        """A client that resets during its hello leaves no timer and no session."""
        h = routed()
        client, transport = h.accept()
        client.dataReceived(HELLO[:10])
        with capture_logs() as logs:
            transport.lose()
        assert closed_lines(logs)[0]["reason"] == "client closed"
        assert h.clock.getDelayedCalls() == []
        assert not h.frontend.sessions


class TestRefusal:
    def test_unrouted_name_without_default(self) -> None:
        """An SNI matching nothing, with no default pool, is refused without a connect."""
        h = routed(default=False)
        client, transport = h.accept()
        with capture_logs() as logs:
            client.dataReceived(python_hello("z.example.com"))
            assert transport.disconnecting
            transport.lose()
        [line] = closed_lines(logs)
        assert line["reason"] == "no route"
        assert line["sni"] == "z.example.com"
        assert h.pending_attempts() == []

    def test_oversized_hello(self) -> None:
        """More than 16 KiB without a complete hello is refused as malformed."""
        h = routed()
        client, transport = h.accept()
        with capture_logs() as logs:
            client.dataReceived(b"\x16\x03\x01\x40\x00\x01\x00\xff\xff")
            assert transport.disconnecting
            transport.lose()
        [line] = closed_lines(logs)
        assert line["reason"] == "malformed client hello"
        assert "larger than 16 KiB" in line["detail"]
