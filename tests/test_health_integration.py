"""Health checking in-process over real sockets on 127.0.0.1: tcp probes take a
dead backend out of rotation, bring it back when it listens again, and stop
cleanly with the service (the `lab` fixture fails on any leftover)."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import reactor

from tests.loopback import Lab

HEALTH = (
    'health = { type = "tcp", interval = "100ms", fast_interval = "50ms",'
    ' down_interval = "100ms", timeout = "500ms", rise = 2, fall = 2 }'
)


def named(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event]


class TestTcpProbes:
    @pytest_twisted.ensureDeferred
    async def test_dead_backend_leaves_and_comes_back(self, lab: Lab) -> None:
        """A backend that stops listening goes down; listening again, it comes back."""
        a = lab.backend(lab.echo)
        b = lab.backend(lab.echo)
        port_b = b.port.getHost().port
        with capture_logs() as logs:
            lb = lab.l4lb(
                {"a": a.address, "b": b.address},
                pool='balance = "round-robin"\n' + HEALTH,
            )
            pool = lb.service.pools["p"]
            await b.port.stopListening()
            await lab.until(
                lambda: bool(named(logs, "server down")), 5, "b marked down"
            )
            (down,) = named(logs, "server down")
            assert (down["pool"], down["server"]) == ("p", "b")
            assert down["reason"] == "connect refused"
            assert not pool.server("b").usable
            for _ in range(4):  # every new client goes to a
                client = await lab.connect(lb.port, lab.peer())
                client.send(b"x")
                await lab.until(lambda c=client: c.received == 1, 5, "echo")
                client.transport.loseConnection()
                await lab.until(lambda c=client: not c.is_connected, 5, "closed")
            await lab.until(lambda: not lb.frontend.sessions, 5, "sessions done")
            servers = [e["server"] for e in named(logs, "connection closed")]
            assert servers == ["a"] * 4
            b.port = reactor.listenTCP(port_b, b, interface="127.0.0.1")
            await lab.until(lambda: bool(named(logs, "server up")), 5, "b up again")
            assert pool.server("b").usable
            (up,) = named(logs, "server up")
            assert up["server"] == "b" and up["reason"] == "connected"
            await lb.service.stopService()
        monitor = lb.service.monitors["p"]
        assert not monitor.running
        await lab.until(
            lambda: not a.live and not b.live, 5, "probe connections closed"
        )
