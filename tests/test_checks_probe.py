"""The probe machinery every check shares, shown with the tcp and send-expect types.

Real peers are a `redis-server` started for the test and scripted fake servers
on 127.0.0.1; the `lab` fixture fails a test that leaves a connection, reader,
writer or delayed call behind, which is how cancellation is shown to clean up.
"""

from __future__ import annotations

import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import redis
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater

from l4lb.config import CheckStep, HealthConfig
from l4lb.health.checks import make_check
from l4lb.health.checks.conversation import LIMIT, show
from tests.checkpeers import (
    Fake,
    Recording,
    endpoint,
    fake_server,
    lab,
    run_check,
    run_on_fake,
)
from tests.e2e import free_port, start_redis

__all__ = ["lab"]  # the fixture, imported for pytest

PING = HealthConfig(
    type="send-expect", steps=(CheckStep(send=b"PING\r\n", expect=b"+PONG"),)
)


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    with start_redis(port, tmp_path_factory.mktemp("redis")):
        yield port


def other_clients(port: int, probe_ports: list[int]) -> list[str]:
    """The CLIENT LIST entries of the probe's connections still on the server."""
    with redis.Redis(port=port) as client:
        return [
            c["addr"]
            for c in client.client_list()
            if int(c["addr"].rsplit(":", 1)[1]) in probe_ports
        ]


def reply_with(*chunks: bytes, then_close: bool = False) -> Any:
    """A fake server script: wait for the request, send ``chunks``."""

    async def script(fake: Fake) -> None:
        await fake.take(1)
        for chunk in chunks:
            fake.write(chunk)
        if then_close:
            fake.transport.loseConnection()

    return script


async def silent(fake: Fake) -> None:
    """A server that accepts and never answers."""


class TestShow:
    """Server bytes are quoted for log lines."""

    @pytest.mark.parametrize(
        ("data", "shown"),
        [
            (b"-LOADING Redis is loading\r\nmore", '"-LOADING Redis is loading"'),
            (b"\x00\xffab", '"\\x00\\xffab"'),
            (b'say "hi"', '"say \\"hi\\""'),
            (b"x" * 100, '"' + "x" * 80 + '..."'),
        ],
    )
    def test_quoting(self, data: bytes, shown: str) -> None:
        """The first line is shown escaped, quoted and cut at 80 characters."""
        assert show(data) == shown


class TestTCP:
    """The tcp check connects and closes."""

    @pytest_twisted.ensureDeferred
    async def test_real_redis(self, lab: Any, redis_port: int) -> None:
        """An accepting server passes, and keeps no client entry afterwards."""
        ep = Recording(redis_port)
        result = await run_check(HealthConfig(type="tcp"), ep)
        assert (result.ok, result.reason) == (True, "connected")
        await lab.until(lambda: not other_clients(redis_port, ep.ports), 5)

    @pytest_twisted.ensureDeferred
    async def test_refused(self, lab: Any) -> None:
        """Nothing listening is a failed result, not an error."""
        result = await run_check(HealthConfig(type="tcp"), endpoint(free_port()))
        assert (result.ok, result.reason) == (False, "connect refused")


class TestSendExpect:
    """send-expect runs its steps in order and matches each reply's start."""

    @pytest_twisted.ensureDeferred
    async def test_real_redis_ping(self, lab: Any, redis_port: int) -> None:
        """PING answered by +PONG passes; the probe leaves no session on the server."""
        ep = Recording(redis_port)
        result = await run_check(PING, ep)
        assert result.ok, result.reason
        await lab.until(lambda: not other_clients(redis_port, ep.ports), 5)

    @pytest_twisted.ensureDeferred
    async def test_real_redis_steps(self, lab: Any, redis_port: int) -> None:
        """Several steps, prefix and regex, each match the reply to their own send."""
        config = HealthConfig(
            type="send-expect",
            steps=(
                CheckStep(send=b"PING\r\n", expect=b"+PONG"),
                CheckStep(send=b"ECHO hello\r\n", expect_regex=r"\$5\r\nhel+o\r\n"),
                CheckStep(send=b"QUIT\r\n", expect=b"+OK"),
            ),
        )
        result = await run_check(config, endpoint(redis_port))
        assert (result.ok, result.reason) == (True, "3 step(s) matched")

    @pytest_twisted.ensureDeferred
    async def test_step_failure_names_the_reply(
        self, lab: Any, redis_port: int
    ) -> None:
        """A later step that fails says what came back instead."""
        config = HealthConfig(
            type="send-expect",
            steps=(
                CheckStep(send=b"PING\r\n", expect=b"+PONG"),
                CheckStep(send=b"NOSUCHCOMMAND\r\n", expect=b"+OK"),
            ),
        )
        result = await run_check(config, endpoint(redis_port))
        assert not result.ok
        assert result.reason.startswith('expected "+OK", got "-ERR unknown command')

    @pytest_twisted.ensureDeferred
    async def test_wrong_reply(self, lab: Any) -> None:
        """A reply that does not start with ``expect`` fails with both in the reason."""
        server = fake_server(
            lab,
            reply_with(b"-LOADING Redis is loading the dataset in memory\r\n"),
        )
        result = await run_on_fake(lab, server, PING)
        assert result.reason == (
            'expected "+PONG", got "-LOADING Redis is loading the dataset in memory"'
        )
        assert not result.ok

    @pytest_twisted.ensureDeferred
    async def test_reply_in_pieces(self, lab: Any) -> None:
        """A reply that arrives a byte at a time still matches."""

        async def script(fake: Fake) -> None:
            await fake.take(6)
            for byte in b"+PONG\r\n":
                fake.write(bytes([byte]))
                await deferLater(reactor, 0.001, lambda: None)

        server = fake_server(lab, script)
        for step in (
            CheckStep(send=b"PING\r\n", expect=b"+PONG"),
            CheckStep(send=b"PING\r\n", expect_regex=r"\+PONG\r\n"),
        ):
            config = HealthConfig(type="send-expect", steps=(step,))
            result = await run_on_fake(lab, server, config)
            assert result.ok, result.reason

    @pytest_twisted.ensureDeferred
    async def test_regex_fails_as_soon_as_it_cannot_match(self, lab: Any) -> None:
        """A regex that can no longer match fails at once, without waiting for more."""
        server = fake_server(lab, reply_with(b"-ERR"))  # and then stays open
        config = HealthConfig(
            type="send-expect",
            steps=(CheckStep(send=b"PING\r\n", expect_regex=r"\+PONG\r\n"),),
        )
        result = await run_on_fake(lab, server, config)
        assert (result.ok, result.reason) == (
            False,
            'expected /\\+PONG\\r\\n/, got "-ERR"',
        )

    @pytest_twisted.ensureDeferred
    async def test_close_before_reply(self, lab: Any) -> None:
        """A server that closes without answering is a failure in words."""
        server = fake_server(lab, reply_with(then_close=True))
        result = await run_on_fake(lab, server, PING)
        assert (result.ok, result.reason) == (
            False,
            "server closed the connection while waiting for the reply",
        )

    @pytest_twisted.ensureDeferred
    async def test_short_reply_then_close(self, lab: Any) -> None:
        """Part of the expected reply, then a close, is a failure."""
        server = fake_server(lab, reply_with(b"+PO", then_close=True))
        result = await run_on_fake(lab, server, PING)
        assert not result.ok
        assert result.reason.startswith("server closed the connection")

    @pytest_twisted.ensureDeferred
    async def test_reset(self, lab: Any) -> None:
        """A reset is a failure in words."""

        async def script(fake: Fake) -> None:
            await fake.take(1)
            fake.transport.getHandle().setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            fake.transport.abortConnection()

        server = fake_server(lab, script)
        result = await run_on_fake(lab, server, PING)
        assert (result.ok, result.reason) == (
            False,
            "connection reset by server while waiting for the reply",
        )

    @pytest_twisted.ensureDeferred
    async def test_garbage_flood_is_bounded(self, lab: Any) -> None:
        """Megabytes that might still match fail at the buffer limit, not at the timeout."""
        flood = b"a" * (1 << 20)

        async def script(fake: Fake) -> None:
            await fake.take(1)
            for _ in range(4):
                if not fake.is_connected:
                    return
                fake.write(flood)

        server = fake_server(lab, script)
        config = HealthConfig(
            type="send-expect",
            steps=(CheckStep(send=b"GET\r\n", expect_regex=r"a*\r\n"),),
        )
        result = await run_on_fake(lab, server, config)
        assert (result.ok, result.reason) == (False, f"reply longer than {LIMIT} bytes")


class TestCancel:
    """Cancelling a probe (the caller's timeout) leaves nothing behind."""

    @pytest_twisted.ensureDeferred
    async def test_cancel_while_waiting_for_a_reply(self, lab: Any) -> None:
        """A silent server: cancel aborts the connection and fails with CancelledError."""
        server = fake_server(lab, silent)
        d = make_check(PING, reactor)(endpoint(server.port.getHost().port))
        await lab.until(lambda: bool(server.live), 5, "probe connected")
        d.cancel()
        with pytest.raises(CancelledError):
            await d
        await lab.until(lambda: not server.live, 5, "probe connection closed")

    @pytest_twisted.ensureDeferred
    async def test_cancel_while_connecting(self, lab: Any) -> None:
        """Cancelled before the connect completes: the attempt is stopped."""
        server = fake_server(lab, silent)
        d = make_check(PING, reactor)(endpoint(server.port.getHost().port))
        d.cancel()
        with pytest.raises(CancelledError):
            await d

    @pytest.mark.parametrize("kind", ["tcp", "send-expect"])
    def test_cancel_reaches_the_endpoint(self, kind: str) -> None:
        """A connect that never completes is cancelled through the endpoint."""
        cancelled = []

        class Hanging:
            def connect(self, factory: Any) -> Deferred[Any]:
                return Deferred(cancelled.append)

        d = make_check(HealthConfig(type=kind, steps=PING.steps), reactor)(Hanging())
        d.cancel()
        failures: list[Any] = []
        d.addErrback(failures.append)
        assert len(cancelled) == 1
        assert failures[0].check(CancelledError)

    @pytest_twisted.ensureDeferred
    async def test_timeout_on_a_stopped_redis(self, lab: Any, tmp_path: Path) -> None:
        """A real redis paused by SIGSTOP is silence: the caller's timeout cleans up."""
        port = free_port()
        with start_redis(port, tmp_path) as process:
            process.send_signal(signal.SIGSTOP)
            try:
                d = make_check(PING, reactor)(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", port)
                )
                d.addTimeout(0.3, reactor)
                with pytest.raises(DeferredTimeout):
                    await d
            finally:
                process.send_signal(signal.SIGCONT)


def test_every_type_is_registered() -> None:
    """Each check type of the configuration has its module in the registry."""
    from l4lb.health.checks import CHECK_TYPES

    assert set(CHECK_TYPES) == {
        "tcp", "send-expect", "tls", "http", "redis", "postgres", "mysql",
    }  # fmt: skip


SILENT_SERVER_CONFIGS = [
    PING,
    HealthConfig(type="redis", role="primary"),
    HealthConfig(type="postgres", role="primary"),
    HealthConfig(type="mysql", role="primary"),
    HealthConfig(type="http", path="/primary"),
    HealthConfig(type="tls"),
]


@pytest.mark.parametrize("config", SILENT_SERVER_CONFIGS, ids=lambda c: c.type)
@pytest_twisted.ensureDeferred
async def test_cancel_every_type_on_a_silent_server(
    lab: Any, config: HealthConfig
) -> None:
    """Every type, cancelled mid-exchange, fails with CancelledError and leaves nothing."""
    server = fake_server(lab, silent)
    d = make_check(config, reactor)(endpoint(server.port.getHost().port))
    await lab.until(lambda: bool(server.live), 5, "probe connected")
    await deferLater(reactor, 0.01, lambda: None)  # let the request go out
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await lab.until(lambda: not server.live, 5, "probe connection closed")
