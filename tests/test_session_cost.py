"""What one connection costs the process: timers and Deferreds (on a fake clock).

These lock in the per-connection cuts described in docs/performance.md: one
timer per session for its whole life, and no Deferred to hand out a server
that has room.
"""

from __future__ import annotations

import io
import socket
from typing import Any

import pytest
import pytest_twisted
import structlog
from twisted.internet import defer, reactor

from l4lb import connector
from l4lb.config import PoolConfig, ServerAddress, ServerConfig
from l4lb.logs import configure_logging
from l4lb.pool import Pool
from l4lb.proxy import Session
from l4lb.timers import queue_for
from tests.fakes import Harness
from tests.loopback import Lab


class _CountingClock:
    """Wraps a Harness clock, counting timers created (callLater)."""

    def __init__(self, harness: Harness) -> None:
        self.created = 0
        clock = harness.clock
        call_later = clock.callLater

        def counting(delay: float, f: Any, *args: Any, **kw: Any) -> Any:
            self.created += 1
            return call_later(delay, f, *args, **kw)

        clock.callLater = counting  # type: ignore[method-assign]


class TestOneTimerPerSession:
    @pytest.mark.parametrize(
        "first_fin", ["client", "server"], ids=["client-fin", "server-fin"]
    )
    def test_whole_life_uses_one_timer(self, first_fin: str) -> None:
        """Connect, traffic, half-close and close arm a single timer."""
        h = Harness(frontend={"idle_timeout": 3600.0, "half_closed_timeout": 60.0})
        counter = _CountingClock(h)
        client, client_transport, server, server_transport = h.connected_pair()
        for _ in range(3):
            client.dataReceived(b"ping")
            server.dataReceived(b"pong")
            h.clock.advance(1)
        assert len(h.clock.getDelayedCalls()) == 1
        first, second = (
            (client_transport, server_transport)
            if first_fin == "client"
            else (server_transport, client_transport)
        )
        first.peer_sends_eof()
        assert len(h.clock.getDelayedCalls()) == 1
        second.peer_sends_eof()  # both done: close both, linger
        client_transport.lose()
        server_transport.lose()
        assert counter.created == 1
        assert h.clock.getDelayedCalls() == []

    def test_half_close_still_shortens_the_limit(self) -> None:
        """No new timer at the half-close, yet the shorter limit applies."""
        h = Harness(frontend={"idle_timeout": 3600.0, "half_closed_timeout": 60.0})
        _, client_transport, _, server_transport = h.connected_pair()
        h.clock.advance(3000)  # the timer has re-armed itself for the idle limit
        client_transport.peer_sends_eof()
        h.clock.advance(59)
        assert not server_transport.disconnecting
        h.clock.advance(1)
        assert server_transport.disconnecting and client_transport.disconnecting
        client_transport.lose()
        server_transport.lose()
        assert h.clock.getDelayedCalls() == []

    def test_second_close_does_not_restart_lingering(self) -> None:
        """The abort of a lingering close counts from the first close."""
        h = Harness(frontend={"half_closed_timeout": 60.0})
        _, client_transport, _, server_transport = h.connected_pair()
        client_transport.peer_sends_eof()
        server_transport.peer_sends_eof()  # close both: linger from now
        h.clock.advance(30)
        server_transport.lose()  # the server side finishes; the client lingers
        h.clock.advance(30)
        assert client_transport.disconnected  # aborted 60 s after the first close


class TestQuietLogLevel:
    @pytest.fixture(autouse=True)
    def _restore_structlog(self) -> Any:
        yield
        structlog.reset_defaults()

    @pytest.mark.parametrize("level, built", [("warning", 0), ("info", 1)])
    def test_closed_line_built_only_when_kept(
        self, level: str, built: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Below ``info`` the per-connection line is not even built."""
        configure_logging("json", level, stream=io.StringIO())
        calls: list[Session] = []
        original = Session._log_closed
        monkeypatch.setattr(
            Session, "_log_closed", lambda s: (calls.append(s), original(s))[1]
        )
        h = Harness()
        _, client_transport, _, server_transport = h.connected_pair()
        client_transport.peer_sends_eof()
        server_transport.peer_sends_eof()
        client_transport.lose()
        server_transport.lose()
        assert len(calls) == built
        assert not h.frontend.sessions  # finished all the same


class TestAcquireNow:
    def _pool(self, queue_timeout: float = 5.0) -> Pool:
        from twisted.internet.task import Clock

        servers = (
            ServerConfig(
                name="a",
                address=ServerAddress(host="127.0.0.1", port=1),
                max_connections=1,
            ),
        )
        return Pool(
            PoolConfig(name="p", servers=servers, queue_timeout=queue_timeout), Clock()
        )

    def test_free_server_without_deferred(self) -> None:
        """A server with room is returned directly, its slot reserved."""
        pool = self._pool()
        server = pool.acquire_now("c")
        assert server is not None and not isinstance(server, defer.Deferred)
        assert (server.live, server.total) == (1, 1)

    def test_full_or_queued_defers_to_acquire(self) -> None:
        """Full servers, or clients already waiting, mean None: `acquire` queues."""
        pool = self._pool()
        pool.acquire_now("c1")
        assert pool.acquire_now("c2") is None
        waiting = pool.acquire("c2")
        assert pool.queued == 1 and not waiting.called
        pool.release(pool.server("a"))  # serves the queue first
        assert waiting.called
        assert pool.acquire_now("c3") is None  # the slot went to the waiter


@pytest_twisted.async_yield_fixture
async def lab() -> Any:
    """The test's ports, services and connections; fails the test on leftovers."""
    lab = Lab(reactor)
    yield lab
    problems = await lab.teardown()
    assert not problems, "left behind by the test:\n" + "\n".join(problems)


class TestTunedListener:
    @pytest_twisted.ensureDeferred
    async def test_accepted_sockets_inherit_nodelay_and_keepalive(
        self, lab: Lab
    ) -> None:
        """Set once on the listener, the options reach each accepted client socket."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address})
        assert lb.frontend.listener_tuned
        client = await lab.connect(lb.port)
        await lab.until(lambda: lb.frontend.sessions, what="session")
        (session,) = lb.frontend.sessions
        sock = session.client.transport.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        client.transport.loseConnection()
        await lab.until(lambda: not lb.frontend.sessions, what="session over")


class TestIdleFootprint:
    """What an idle proxied connection keeps alive (docs/perf-notes/memory.md)."""

    @pytest_twisted.ensureDeferred
    async def test_idle_session_keeps_no_extras(self, lab: Lab) -> None:
        """No connect attempt, no DelayedCall of its own, no protocol dicts, no
        log-field dict; backend transports share one log prefix string."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address})
        timers = queue_for(reactor)
        live_before = timers.live
        clients = [await lab.connect(lb.port) for _ in range(2)]
        await lab.until(
            lambda: (
                len(lb.frontend.sessions) == 2
                and all(s.server is not None for s in lb.frontend.sessions)
            ),
            what="two sessions connected",
        )
        sessions = list(lb.frontend.sessions)
        assert timers.live == live_before + 2  # entries, not DelayedCalls
        for session in sessions:
            assert not hasattr(session.client, "__dict__")
            assert not hasattr(session.server, "__dict__")
            assert session._log_fields is None
            assert session.server.transport.connector is connector._CONNECTED
        first, second = (s.server.transport for s in sessions)
        assert first.logstr == "ServerProtocol,client"
        assert first.logstr is second.logstr
        assert sessions[0].client_address == sessions[0].client.transport.getPeer()
        for client in clients:
            client.transport.loseConnection()
        await lab.until(lambda: not lb.frontend.sessions, what="sessions over")
        assert timers.live == live_before
