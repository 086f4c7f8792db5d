"""Unit tests of the data path on a fake clock, with fake transports and endpoints."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs
from twisted.internet import error

from tests.fakes import Harness


def closed_lines(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] == "connection closed"]


class TestConnect:
    def test_client_paused_until_backend_connected(self) -> None:
        """Nothing is read from the client before a backend is connected."""
        h = Harness()
        _, client_transport = h.accept()
        assert client_transport.producerState == "paused"
        h.complete()
        assert client_transport.producerState == "producing"

    def test_producer_wiring(self) -> None:
        """Each transport is registered as the other's streaming producer."""
        h = Harness()
        _, client_transport, _, server_transport = h.connected_pair()
        assert server_transport.producer is client_transport
        assert server_transport.streaming is True
        assert client_transport.producer is server_transport
        assert client_transport.streaming is True

    def test_both_sides_tuned(self) -> None:
        """TCP_NODELAY and keepalive are set on both sides."""
        h = Harness()
        _, client_transport, _, server_transport = h.connected_pair()
        for transport in (client_transport, server_transport):
            assert transport.nodelay and transport.keepalive

    def test_bytes_flow_both_ways_and_are_counted(self) -> None:
        """Client bytes reach the server and server bytes reach the client."""
        h = Harness()
        client, client_transport, server, server_transport = h.connected_pair()
        client.dataReceived(b"PING\r\n")
        server.dataReceived(b"+PONG\r\n")
        assert server_transport.value() == b"PING\r\n"
        assert client_transport.value() == b"+PONG\r\n"
        assert (client.session.bytes_from_client, client.session.bytes_from_server) == (
            6,
            7,
        )

    def test_server_speaking_first_reaches_client(self) -> None:
        """A greeting sent right after connect (MySQL-style) reaches the client."""
        h = Harness()
        _, client_transport, server, _ = h.connected_pair()
        server.dataReceived(b"\x0a5.5.5-greeting")
        assert client_transport.value() == b"\x0a5.5.5-greeting"

    def test_connect_cancelled_when_client_leaves(self) -> None:
        """A client that leaves while the connect is in flight cancels it."""
        h = Harness()
        _, client_transport = h.accept()
        name, _, attempt = h.only_attempt()
        with capture_logs() as logs:
            client_transport.lose(error.ConnectionLost)
        assert h.endpoints[name].cancelled == 1
        assert attempt.called
        assert all(s.live == 0 for s in h.pool.servers)
        (line,) = closed_lines(logs)
        assert line["reason"] == "client closed"
        assert line["server"] is None
        assert h.cap.live == 0

    def test_refused_connect_retried_on_another_server(self) -> None:
        """A refused connect is retried on a server not yet tried, invisibly."""
        h = Harness(servers=3, pool={"retries": 3})
        client, client_transport = h.accept()
        first = h.refuse()
        second = h.refuse()
        third, _, server_transport = h.complete()
        assert len({first, second, third}) == 3
        assert client_transport.value() == b""
        assert not client_transport.disconnecting
        assert client.session.retries == 2
        assert client.session.server_state.name == third
        assert [s.live for s in h.pool.servers if s.name != third] == [0, 0]

    def test_retries_exhausted_closes_client(self) -> None:
        """After ``retries`` further failures the client is closed and the reason logged."""
        h = Harness(servers=2, pool={"retries": 2})
        client, client_transport = h.accept()
        tried = [h.refuse() for _ in range(3)]
        assert h.pending_attempts() == []
        assert tried[0] != tried[1]  # the second attempt avoids the first server
        assert client_transport.disconnecting
        with capture_logs() as logs:
            client_transport.lose()
        (line,) = closed_lines(logs)
        assert line["reason"] == "connect failed"
        assert line["retries"] == 2
        assert all(s.live == 0 for s in h.pool.servers)

    def test_connect_timeout_is_a_failed_attempt(self) -> None:
        """A server that never answers costs ``connect_timeout``, then the next is tried."""
        h = Harness(servers=2, pool={"connect_timeout": 3.0})
        h.accept()
        first, _, attempt = h.only_attempt()
        h.clock.advance(2.9)
        assert not attempt.called
        h.clock.advance(0.2)
        assert attempt.called
        assert h.endpoints[first].cancelled == 1
        second, _, _ = h.only_attempt()
        assert second != first

    def test_no_usable_server(self) -> None:
        """With every server at weight 0 the client is closed with reason "no server"."""
        h = Harness(servers=[{"weight": 0}, {"weight": 0}])
        with capture_logs() as logs:
            _, client_transport = h.accept()
            assert client_transport.disconnecting
            client_transport.lose()
        (line,) = closed_lines(logs)
        assert line["reason"] == "no server"


class TestHalfClose:
    def test_client_fin_becomes_server_fin(self) -> None:
        """The client's FIN is passed on and the reply still flows back."""
        h = Harness()
        client, client_transport, server, server_transport = h.connected_pair()
        client.dataReceived(b"request")
        client_transport.peer_sends_eof()
        assert server_transport.write_closed
        assert server_transport.producer is None  # unregistered before the FIN
        assert not client_transport.disconnecting
        server.dataReceived(b"reply")
        assert client_transport.value() == b"reply"
        server_transport.peer_sends_eof()
        assert client_transport.disconnecting and server_transport.disconnecting

    def test_server_fin_becomes_client_fin(self) -> None:
        """The server's FIN is passed on and the client may keep sending."""
        h = Harness()
        client, client_transport, server, server_transport = h.connected_pair()
        server_transport.peer_sends_eof()
        assert client_transport.write_closed
        assert client_transport.producer is None
        client.dataReceived(b"more")
        assert server_transport.value() == b"more"
        client_transport.peer_sends_eof()
        assert client_transport.disconnecting and server_transport.disconnecting

    def test_full_close_of_one_side_closes_the_other(self) -> None:
        """A reset server closes the client (after flushing) and logs one line."""
        h = Harness()
        _, client_transport, _, server_transport = h.connected_pair()
        with capture_logs() as logs:
            server_transport.lose(error.ConnectionLost)
            assert client_transport.disconnecting
            assert client_transport.producer is None
            client_transport.lose()
        (line,) = closed_lines(logs)
        assert line["reason"] == "server closed"
        assert h.pool.servers[0].live + h.pool.servers[1].live == 0

    def test_lingering_close_is_aborted(self) -> None:
        """A side that never finishes closing is aborted after half_closed_timeout."""
        h = Harness(frontend={"half_closed_timeout": 60.0})
        _, client_transport, _, server_transport = h.connected_pair()
        server_transport.lose()
        assert client_transport.disconnecting and not client_transport.disconnected
        h.clock.advance(60.0)
        assert client_transport.disconnected  # aborted


class TestTimeouts:
    def test_idle_timeout_closes_both(self) -> None:
        """No byte either way for idle_timeout closes both sides."""
        h = Harness(frontend={"idle_timeout": 10.0})
        client, client_transport, server, server_transport = h.connected_pair()
        h.clock.advance(6)
        client.dataReceived(b"x")  # activity pushes the deadline
        h.clock.advance(6)
        assert not client_transport.disconnecting
        with capture_logs() as logs:
            h.clock.advance(4)
            assert client_transport.disconnecting and server_transport.disconnecting
            client_transport.lose()
            server_transport.lose()
        (line,) = closed_lines(logs)
        assert line["reason"] == "idle timeout"

    def test_half_closed_timeout(self) -> None:
        """After one direction ended, silence for half_closed_timeout closes both."""
        h = Harness(frontend={"idle_timeout": 3600.0, "half_closed_timeout": 60.0})
        _, client_transport, _, server_transport = h.connected_pair()
        client_transport.peer_sends_eof()
        h.clock.advance(59)
        assert not server_transport.disconnecting
        with capture_logs() as logs:
            h.clock.advance(1)
            assert server_transport.disconnecting and client_transport.disconnecting
            client_transport.lose()
            server_transport.lose()
        assert closed_lines(logs)[0]["reason"] == "half-closed timeout"

    def test_no_timer_left_after_close(self) -> None:
        """A finished session leaves no pending call on the clock."""
        h = Harness()
        _, client_transport, _, server_transport = h.connected_pair()
        client_transport.peer_sends_eof()
        server_transport.peer_sends_eof()
        client_transport.lose()
        server_transport.lose()
        assert h.clock.getDelayedCalls() == []


class TestQueue:
    def test_full_servers_queue_then_serve(self) -> None:
        """When every server is full the client waits, then gets the freed slot."""
        h = Harness(servers=[{"max_connections": 1}], pool={"queue_timeout": 5.0})
        _, first_client, _, first_server = h.connected_pair()
        _, waiting = h.accept()
        assert h.pending_attempts() == []
        assert h.pool.queued == 1
        first_server.lose()
        first_client.lose()
        h.only_attempt()
        assert h.pool.queued == 0
        h.complete()
        assert waiting.producerState == "producing"

    def test_queue_timeout(self) -> None:
        """A queued client is closed after queue_timeout with that reason."""
        h = Harness(servers=[{"max_connections": 1}], pool={"queue_timeout": 5.0})
        h.connected_pair()
        _, waiting = h.accept()
        h.clock.advance(4.9)
        assert not waiting.disconnecting
        with capture_logs() as logs:
            h.clock.advance(0.1)
            assert waiting.disconnecting
            waiting.lose()
        assert closed_lines(logs)[0]["reason"] == "queue timeout"

    def test_queue_limit_refuses_at_once(self) -> None:
        """Beyond max_queue a client is refused immediately."""
        h = Harness(servers=[{"max_connections": 1}], pool={"max_queue": 1})
        h.connected_pair()
        h.accept()
        with capture_logs() as logs:
            _, refused = h.accept()
            assert refused.disconnecting
            refused.lose()
        assert closed_lines(logs)[0]["reason"] == "queue full"

    def test_queued_client_leaving_is_forgotten(self) -> None:
        """A client that leaves while queued leaves the queue and no timer."""
        h = Harness(servers=[{"max_connections": 1}])
        _, c1, _, s1 = h.connected_pair()
        _, waiting = h.accept()
        waiting.lose(error.ConnectionLost)
        assert h.pool.queued == 0
        s1.lose()
        c1.lose()
        assert h.pending_attempts() == []
        assert h.clock.getDelayedCalls() == []


class TestLogLine:
    def test_one_line_with_every_field(self) -> None:
        """A finished connection logs exactly one line with the documented fields."""
        h = Harness()
        with capture_logs() as logs:
            client, client_transport, server, server_transport = h.connected_pair(
                "10.1.2.3"
            )
            client.dataReceived(b"abc")
            server.dataReceived(b"defgh")
            h.clock.advance(2)
            client_transport.peer_sends_eof()
            server_transport.peer_sends_eof()
            client_transport.lose()
            server_transport.lose()
        (line,) = closed_lines(logs)
        assert line["frontend"] == "fe"
        assert line["pool"] == "p"
        assert line["server"] in ("s0", "s1")
        assert line["client"] == "10.1.2.3:40000"
        assert line["bytes_from_client"] == 3
        assert line["bytes_from_server"] == 5
        assert line["duration"] == pytest.approx(2.0)
        assert line["connect_time"] == pytest.approx(0.0)
        assert line["retries"] == 0
        assert line["reason"] == "client closed"
        assert line["log_level"] == "info"


class TestLimits:
    class FakePort:
        def __init__(self) -> None:
            self.reading = True
            self.numberAccepts = 100

        def startReading(self) -> None:
            self.reading = True

        def stopReading(self) -> None:
            self.reading = False

        def doRead(self) -> None:
            pass

    @pytest.mark.parametrize(
        ("frontend_limit", "process_limit"),
        [(2, 1000), (1000, 2)],
        ids=["frontend", "process"],
    )
    def test_accepting_pauses_at_cap_and_resumes(
        self, frontend_limit: int, process_limit: int
    ) -> None:
        """At a connection cap the listener stops reading; it resumes when a slot frees."""
        h = Harness(
            frontend={"max_connections": frontend_limit}, process_limit=process_limit
        )
        port = self.FakePort()
        h.frontend.listening(port)
        _, c1, _, s1 = h.connected_pair()
        assert port.reading
        h.connected_pair()
        assert not port.reading
        s1.lose()
        c1.lose()
        assert port.reading

    def test_pause_warnings_are_rate_limited(self) -> None:
        """At a sustained cap, "accepting paused" is warned once per interval with a count."""
        h = Harness(frontend={"max_connections": 1})
        h.frontend.listening(self.FakePort())
        with capture_logs() as logs:
            for _ in range(3):  # pause, resume, pause, resume, ...
                _, c, _, s = h.connected_pair()
                s.lose()
                c.lose()
            h.clock.advance(10)
            h.connected_pair()
        warnings = [
            e for e in logs if e["event"].startswith("connection limit reached")
        ]
        assert [w["pauses"] for w in warnings] == [1, 3]

    def test_zero_caps_mean_no_cap(self) -> None:
        """A cap of 0 (frontend and process) never pauses accepting."""
        h = Harness(frontend={"max_connections": 0}, process_limit=0)
        port = self.FakePort()
        h.frontend.listening(port)
        for _ in range(5):
            h.connected_pair()
        assert port.reading
        port.doRead()
        assert port.numberAccepts == 100

    def test_accept_batch_clamped_to_room(self) -> None:
        """One accept round never takes more clients than there is room for."""
        h = Harness(frontend={"max_connections": 3})
        port = self.FakePort()
        h.frontend.listening(port)
        h.connected_pair()
        port.doRead()
        assert port.numberAccepts == 2


class TestSynchronousEndpoint:
    def test_endpoint_that_connects_at_once(self) -> None:
        """An endpoint whose connect has already fired still yields a normal session."""
        from twisted.internet.defer import succeed

        from tests.fakes import FakeTransport

        h = Harness(servers=1)

        class Immediate:
            def connect(self, factory):
                protocol = factory.buildProtocol(None)
                protocol.makeConnection(FakeTransport(protocol))
                return succeed(protocol)

        h.endpoints["s0"] = Immediate()
        with capture_logs() as logs:
            client, client_transport = h.accept()
            server_transport = client.session.server.transport
            client_transport.peer_sends_eof()
            server_transport.peer_sends_eof()
            client_transport.lose()
            server_transport.lose()
        assert [e["reason"] for e in closed_lines(logs)] == ["client closed"]
        assert h.cap.live == 0
