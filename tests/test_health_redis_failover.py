"""A pool with `type = "redis"`, `role = "primary"` follows the master through a
role switch: real redis-servers (a master and a `--replicaof` replica) behind
an in-process l4lb on loopback; `REPLICAOF NO ONE` promotes the replica, the old
master is demoted, and new clients go to the new master by themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
import redis
from structlog.testing import capture_logs
from twisted.internet import threads

from tests.checkpeers import redis_server
from tests.e2e import free_port
from tests.loopback import Lab

HEALTH = (
    'health = { type = "redis", role = "primary", interval = "100ms",'
    ' fast_interval = "50ms", down_interval = "100ms", timeout = "1s",'
    " rise = 2, fall = 2 }"
)


def named(logs: list[dict[str, Any]], event: str, **fields: Any) -> list[dict]:
    return [
        e
        for e in logs
        if e["event"] == event and all(e.get(k) == v for k, v in fields.items())
    ]


async def ping_through(lab: Lab, port: int) -> None:
    """One client: PING through l4lb, read +PONG, close."""
    client = await lab.connect(port, lab.peer(keep=True))
    client.send(b"PING\r\n")
    await lab.until(lambda: bytes(client.data or b"") == b"+PONG\r\n", 5, "+PONG")
    client.transport.loseConnection()
    await lab.until(lambda: not client.is_connected, 5, "client closed")


def redis_command(port: int, *args: str) -> Any:
    """A blocking redis-py call; run it in a thread, never on the reactor."""
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as r:
        return r.execute_command(*args)


class TestRoleSwitch:
    @pytest_twisted.ensureDeferred
    async def test_pool_follows_the_new_master(self, lab: Lab, tmp_path: Path) -> None:
        """After REPLICAOF NO ONE on the replica, the pool's only up server is it."""
        port_a, port_b = free_port(), free_port()
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with (
            redis_server(port_a, tmp_path / "a"),
            redis_server(
                port_b, tmp_path / "b", "--replicaof", "127.0.0.1", str(port_a)
            ),
            capture_logs() as logs,
        ):
            lb = lab.l4lb(
                {"a": f"127.0.0.1:{port_a}", "b": f"127.0.0.1:{port_b}"}, pool=HEALTH
            )
            pool = lb.service.pools["p"]
            await lab.until(
                lambda: pool.server("a").usable and not pool.server("b").usable,
                10,
                "the replica b marked down",
            )
            (down_b,) = named(logs, "server down", server="b")
            assert down_b["reason"] == "role is replica, pool wants primary"
            for _ in range(3):
                await ping_through(lab, lb.port)

            # Fail over: promote b, demote a to a replica of b.
            await threads.deferToThread(redis_command, port_b, "REPLICAOF", "NO", "ONE")
            await threads.deferToThread(
                redis_command, port_a, "REPLICAOF", "127.0.0.1", str(port_b)
            )
            await lab.until(
                lambda: pool.server("b").usable and not pool.server("a").usable,
                10,
                "the pool to follow the new master b",
            )
            (up_b,) = named(logs, "server up", server="b")
            assert up_b["reason"] == "role is primary"
            (down_a,) = named(logs, "server down", server="a")
            assert down_a["reason"].startswith("role is replica")
            before = len(named(logs, "connection closed"))
            for _ in range(3):
                await ping_through(lab, lb.port)
            await lab.until(lambda: not lb.frontend.sessions, 5, "sessions done")
            after = named(logs, "connection closed")[before:]
            assert [e["server"] for e in after] == ["b"] * 3
            await lb.service.stopService()
