"""The redis check against real redis-server masters and replicas, and fakes.

Role checks run against a real master and a real ``--replicaof`` replica,
including the switch of a replica to master (``REPLICAOF NO ONE``); fakes play
a server that is loading, one that refuses ``ROLE`` (so ``INFO replication``
is asked) and one that sends what is not RESP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import redis

from l4lb.config import HealthConfig
from l4lb.health.checks.conversation import BadReplyError, CheckResult
from l4lb.health.checks.redis import Error, Simple, command, info_role, parse_reply
from tests.checkpeers import (
    Fake,
    Recording,
    endpoint,
    fake_server,
    lab,
    redis_server,
    run_check,
    run_on_fake,
)
from tests.e2e import free_port, wait_until

__all__ = ["lab"]

PRIMARY = HealthConfig(type="redis", role="primary")
REPLICA = HealthConfig(type="redis", role="replica")
ANY = HealthConfig(type="redis")


def link_up(port: int) -> bool:
    with redis.Redis(port=port) as client:
        return client.info("replication").get("master_link_status") == "up"


def probe_sessions(port: int, probe_ports: list[int]) -> list[str]:
    with redis.Redis(port=port) as client:
        return [
            c["addr"]
            for c in client.client_list()
            if int(c["addr"].rsplit(":", 1)[1]) in probe_ports
        ]


@pytest.fixture
def master(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    (tmp_path / "master").mkdir()
    with redis_server(port, tmp_path / "master"):
        yield port


@pytest.fixture
def replica(tmp_path: Path, master: int) -> Iterator[int]:
    port = free_port()
    (tmp_path / "replica").mkdir()
    with redis_server(
        port, tmp_path / "replica", "--replicaof", "127.0.0.1", str(master)
    ):
        wait_until(lambda: link_up(port), 10, "replication link up")
        yield port


class TestParser:
    """RESP2 replies are parsed within bounds."""

    @pytest.mark.parametrize(
        ("data", "value"),
        [
            (b"+PONG\r\n", Simple("PONG")),
            (b"-LOADING busy\r\n", Error("LOADING busy")),
            (b":42\r\n", 42),
            (b"$3\r\nabc\r\n", b"abc"),
            (b"$-1\r\n", None),
            (
                b"*3\r\n$6\r\nmaster\r\n:0\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n$1\r\n0\r\n",
                [b"master", 0, [[b"127.0.0.1", b"6380", b"0"]]],
            ),
        ],
    )
    def test_values(self, data: bytes, value: Any) -> None:
        """Each RESP2 type parses to its value, using every byte."""
        assert parse_reply(data) == (value, len(data))

    @pytest.mark.parametrize("data", [b"", b"+PON", b"$3\r\nab", b"*2\r\n:1\r\n"])
    def test_incomplete(self, data: bytes) -> None:
        """An incomplete reply asks for more bytes."""
        assert parse_reply(data) is None

    @pytest.mark.parametrize(
        "data",
        [b"HTTP/1.1 400\r\n", b"$999999999\r\n", b"*1\r\n" * 10 + b":1\r\n", b":x\r\n"],
    )
    def test_refused(self, data: bytes) -> None:
        """Garbage, huge bulk strings and deep nesting fail instead of buffering."""
        with pytest.raises(BadReplyError):
            parse_reply(data)

    def test_command(self) -> None:
        """Commands go out as RESP arrays of bulk strings."""
        assert (
            command("AUTH", "u", "p w")
            == b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$3\r\np w\r\n"
        )

    def test_info(self) -> None:
        """INFO replication tells a replica with its link down."""
        text = b"# Replication\r\nrole:slave\r\nmaster_link_status:down\r\n"
        assert info_role(text) == ("replica", False)


class TestRealRedis:
    """Role checks against real redis-server processes."""

    @pytest_twisted.ensureDeferred
    async def test_master(self, lab: Any, master: int) -> None:
        """A master passes PING, passes role=primary and fails role=replica."""
        ep = Recording(master)
        assert await run_check(ANY, ep) == CheckResult(True, "PONG")
        result = await run_check(PRIMARY, ep)
        assert (result.ok, result.reason) == (True, "role is primary")
        result = await run_check(REPLICA, ep)
        assert (result.ok, result.reason) == (
            False,
            "role is primary, pool wants replica",
        )
        await lab.until(
            lambda: not probe_sessions(master, ep.ports), 5, "no probe session"
        )

    @pytest_twisted.ensureDeferred
    async def test_replica_and_switch(
        self, lab: Any, master: int, replica: int
    ) -> None:
        """A linked replica passes role=replica; after REPLICAOF NO ONE it is primary."""
        ep = Recording(replica)
        result = await run_check(REPLICA, ep)
        assert (result.ok, result.reason) == (True, "role is replica")
        result = await run_check(PRIMARY, ep)
        assert (result.ok, result.reason) == (
            False,
            "role is replica, pool wants primary",
        )

        with redis.Redis(port=replica) as client:
            client.execute_command("REPLICAOF", "NO", "ONE")
        result = await run_check(PRIMARY, ep)
        assert (result.ok, result.reason) == (True, "role is primary")
        result = await run_check(REPLICA, ep)
        assert not result.ok
        await lab.until(
            lambda: not probe_sessions(replica, ep.ports), 5, "no probe session"
        )

    @pytest_twisted.ensureDeferred
    async def test_replica_with_link_down(self, lab: Any, tmp_path: Path) -> None:
        """A replica whose master is unreachable is not a usable replica."""
        port = free_port()
        with redis_server(port, tmp_path, "--replicaof", "127.0.0.1", str(free_port())):
            result = await run_check(REPLICA, endpoint(port))
        assert (result.ok, result.reason) == (
            False,
            "role is replica with its link to the master down",
        )

    @pytest_twisted.ensureDeferred
    async def test_password(self, lab: Any, tmp_path: Path) -> None:
        """With requirepass: no password fails on NOAUTH, the right one passes, a wrong one fails."""
        port = free_port()
        good, bad = tmp_path / "good", tmp_path / "bad"
        good.write_text("s3cret\n")
        bad.write_text("nope\n")
        with redis_server(port, tmp_path, "--requirepass", "s3cret"):
            result = await run_check(PRIMARY, endpoint(port))
            assert (result.ok, result.reason) == (
                False,
                'expected "+PONG", got "-NOAUTH Authentication required."',
            )
            config = HealthConfig(type="redis", role="primary", password_file=str(good))
            result = await run_check(config, endpoint(port))
            assert (result.ok, result.reason) == (True, "role is primary")
            config = HealthConfig(type="redis", password_file=str(bad))
            result = await run_check(config, endpoint(port))
            assert not result.ok
            assert result.reason.startswith('AUTH failed: "-WRONGPASS')

    @pytest_twisted.ensureDeferred
    async def test_unreadable_password_file(
        self, lab: Any, master: int, tmp_path: Path
    ) -> None:
        """A password file that cannot be read fails every probe with the reason."""
        config = HealthConfig(type="redis", password_file=str(tmp_path / "missing"))
        result = await run_check(config, endpoint(master))
        assert not result.ok
        assert result.reason.startswith(
            f"cannot read password_file {tmp_path / 'missing'}"
        )


def redis_fake(replies: dict[bytes, bytes]) -> Any:
    """A fake redis: answers each command (by its first word) from ``replies``."""

    async def script(fake: Fake) -> None:
        while True:
            header = await fake.take(1)
            assert header == b"*"
            count = int(await _line(fake))
            words = []
            for _ in range(count):
                size = int((await _line(fake))[1:])
                words.append((await fake.take(size + 2))[:-2])
            if words[0] == b"QUIT":
                fake.write(b"+OK\r\n")
                fake.transport.loseConnection()
                return
            fake.write(replies[words[0]])

    return script


async def _line(fake: Fake) -> bytes:
    line = b""
    while not line.endswith(b"\r\n"):
        line += await fake.take(1)
    return line[:-2]


class TestFakes:
    """Server behaviours that are hard to get from a real redis on demand."""

    @pytest_twisted.ensureDeferred
    async def test_loading(self, lab: Any) -> None:
        """-LOADING is a failure with the reply in the reason."""
        server = fake_server(
            lab,
            redis_fake(
                {b"PING": b"-LOADING Redis is loading the dataset in memory\r\n"}
            ),
        )
        result = await run_on_fake(lab, server, ANY)
        assert (result.ok, result.reason) == (
            False,
            'expected "+PONG", got "-LOADING Redis is loading the dataset in memory"',
        )

    @pytest_twisted.ensureDeferred
    async def test_role_refused_falls_back_to_info(self, lab: Any) -> None:
        """A server refusing ROLE is asked INFO replication instead."""
        info = b"# Replication\r\nrole:slave\r\nmaster_link_status:up\r\n"
        server = fake_server(
            lab,
            redis_fake(
                {
                    b"PING": b"+PONG\r\n",
                    b"ROLE": b"-NOPERM this user has no permissions to run the 'role' command\r\n",
                    b"INFO": b"$%d\r\n%s\r\n" % (len(info), info),
                }
            ),
        )
        result = await run_on_fake(lab, server, REPLICA)
        assert (result.ok, result.reason) == (True, "role is replica")

    @pytest_twisted.ensureDeferred
    async def test_sentinel(self, lab: Any) -> None:
        """A sentinel is neither primary nor replica."""
        server = fake_server(
            lab,
            redis_fake(
                {b"PING": b"+PONG\r\n", b"ROLE": b"*2\r\n$8\r\nsentinel\r\n*0\r\n"}
            ),
        )
        result = await run_on_fake(lab, server, PRIMARY)
        assert (result.ok, result.reason) == (
            False,
            "role is sentinel, pool wants primary",
        )

    @pytest_twisted.ensureDeferred
    async def test_not_redis(self, lab: Any) -> None:
        """A server that does not speak RESP fails with its bytes quoted."""
        server = fake_server(
            lab, redis_fake({b"PING": b"HTTP/1.1 400 Bad Request\r\n\r\n"})
        )
        result = await run_on_fake(lab, server, ANY)
        assert (result.ok, result.reason) == (
            False,
            'not a Redis reply: "HTTP/1.1 400 Bad Request"',
        )
