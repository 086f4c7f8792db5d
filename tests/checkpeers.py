"""Helpers for the health check tests: scripted fake servers and a probe runner.

A `Fake` is a `tests.loopback.Peer` whose script can await the client's bytes
(`take`), so a test plays a server speaking a protocol step by step. A
`Recording` endpoint remembers the local port of each probe connection, which
is how a test finds the probe in a real server's session list (redis
``CLIENT LIST``, ``pg_stat_activity``, MariaDB's processlist) without counting
the sessions of anybody else using the machine's shared servers.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from l4lb.config import HealthConfig
from l4lb.health.checks import CheckResult, make_check
from tests.e2e import port_accepts, stop_process, wait_until
from tests.loopback import Backend, Lab, Peer


@pytest_twisted.async_yield_fixture
async def lab() -> Any:
    """The test's ports and connections; fails the test on anything left behind.

    Errors Twisted only logs (an exception in a callback) fail the test too.
    """
    errors: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            errors.append(failure.getTraceback())

    globalLogPublisher.addObserver(observe)
    lab = Lab(reactor)
    try:
        yield lab
        problems = await lab.teardown()
    finally:
        globalLogPublisher.removeObserver(observe)
    problems += [f"error logged by Twisted: {e}" for e in errors]
    assert not problems, "left behind by the test:\n" + "\n".join(problems)


class _GoneError(Exception):
    """The client closed while the fake server waited for bytes."""


class Fake(Peer):
    """A test server whose script awaits the client's bytes with `take`."""

    def __init__(self, script: Callable[[Fake], Awaitable[Any]], lab: Lab) -> None:
        super().__init__(
            self._run, keep=True, close_on_eof=True, on_error=lab.record_error
        )
        self._script = script
        self._want: tuple[Callable[[bytearray], Any], Deferred[Any]] | None = None

    async def _run(self, _: Peer) -> None:
        with contextlib.suppress(_GoneError):
            await self._script(self)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self._check()

    def _check(self) -> None:
        if self._want is None:
            return
        predicate, d = self._want
        got = predicate(self.data)
        if got is not None:
            self._want = None
            d.callback(got)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        if self._want is not None:
            _, d = self._want
            self._want = None
            d.errback(_GoneError())

    def take(self, n: int) -> Deferred[bytes]:
        """The client's next ``n`` bytes, once they have arrived."""

        def predicate(data: bytearray) -> bytes | None:
            if len(data) < n:
                return None
            taken = bytes(data[:n])
            del data[:n]
            return taken

        d: Deferred[bytes] = Deferred()
        if not self.is_connected:
            d.errback(_GoneError())
            return d
        self._want = (predicate, d)
        self._check()
        return d

    def write(self, data: bytes) -> None:
        self.transport.write(data)


def fake_server(
    lab: Lab, script: Callable[[Fake], Awaitable[Any]], host: str = "127.0.0.1"
) -> Backend:
    """A listening fake server running ``script`` for each connection."""
    return lab.backend(lambda: Fake(script, lab), host)


def endpoint(port: int, host: str = "127.0.0.1") -> TCP4ClientEndpoint:
    return TCP4ClientEndpoint(reactor, host, port, timeout=5)


class _Recorded(Factory):
    noisy = False

    def __init__(self, inner: Factory, ports: list[int]) -> None:
        self.inner = inner
        self.ports = ports

    def buildProtocol(self, addr: Any) -> Protocol | None:
        protocol = self.inner.buildProtocol(addr)
        original = protocol.makeConnection

        def make_connection(transport: Any) -> None:
            self.ports.append(transport.getHost().port)
            original(transport)

        protocol.makeConnection = make_connection  # type: ignore[method-assign]
        return protocol


class Recording:
    """A client endpoint that records the local port of every connection."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.inner = endpoint(port, host)
        self.ports: list[int] = []

    def connect(self, factory: Factory) -> Deferred[Any]:
        return self.inner.connect(_Recorded(factory, self.ports))


async def run_check(config: HealthConfig, ep: Any, timeout: float = 10) -> CheckResult:
    """One probe with ``config`` through ``ep``, failing the test if it hangs."""
    d = make_check(config, reactor)(ep)
    d.addTimeout(timeout, reactor)
    try:
        return await d
    except defer.TimeoutError:
        raise AssertionError(f"check did not finish in {timeout}s") from None


async def run_on_fake(
    lab: Lab, server: Backend, config: HealthConfig, ep: Any = None
) -> CheckResult:
    """One probe against a fake server; the probe must have closed its connection.

    ``ep`` replaces the plain TCP endpoint to the server (a TLS-wrapped one, say).
    """
    result = await run_check(config, ep or endpoint(server.port.getHost().port))
    await lab.until(lambda: not server.live, 5, "the probe's connection to close")
    return result


def password_file(tmp_path: Path, password: str) -> str:
    """A ``password_file`` holding ``password`` and a newline, as editors leave it."""
    path = tmp_path / "password"
    path.write_text(password + "\n")
    return str(path)


@contextlib.contextmanager
def redis_server(port: int, workdir: Path, *extra: str) -> Iterator[Any]:
    """A throwaway redis-server with extra arguments (``--replicaof``, ``--requirepass``)."""
    args = [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir
    )
    try:
        wait_until(
            lambda: process.poll() is not None or port_accepts("127.0.0.1", port),
            10,
            f"redis-server on port {port}",
        )
        assert process.poll() is None, f"redis-server exited: {process.returncode}"
        yield process
    finally:
        stop_process(process)
