"""Health check types: each is a callable that probes one server once.

A check connects through the endpoint it is given (the pool's server-connection
seam, so backend TLS covers checks too), runs its exchange, closes the
connection cleanly, and fires a :class:`CheckResult`. It never errbacks for a
failing server: refused connects, bad replies and resets are results with a
reason in words. The caller applies the check timeout by cancelling the
Deferred; cancelling must abort the connect attempt or the connection and leave
no timer or socket behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as _TwistedProtocol
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

    from l4lb.config import HealthConfig


@attrs.frozen
class CheckResult:
    """The outcome of one probe; ``reason`` says why in words, for the log."""

    ok: bool
    reason: str


class Check(Protocol):
    """Probe a server once through ``endpoint``."""

    def __call__(self, endpoint: IStreamClientEndpoint) -> Deferred[CheckResult]: ...


CheckFactory = Callable[["HealthConfig", "IReactorTime"], Check]


def describe_connect_failure(failure: Failure) -> str:
    """A failed connect in the words of a state-change log line."""
    if failure.check(ConnectionRefusedError):
        return "connect refused"
    if failure.check(ConnectError):
        detail = failure.value.osError or failure.getErrorMessage()
        return f"connect failed: {detail}"
    return f"connect failed: {failure.getErrorMessage()}"


class _Connected(_TwistedProtocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


def tcp_check(config: HealthConfig, clock: IReactorTime) -> Check:
    """Success is an accepted TCP connection, closed again at once."""

    def check(endpoint: IStreamClientEndpoint) -> Deferred[CheckResult]:
        d = endpoint.connect(_ConnectedFactory())
        d.addCallbacks(
            lambda _: CheckResult(True, "connected"),
            lambda f: CheckResult(False, describe_connect_failure(f)),
        )
        return d

    return check


class _ConnectedFactory(Factory):
    """Builds connect-and-close probes, without Twisted's per-connect log lines."""

    protocol = _Connected
    noisy = False


CHECK_TYPES: dict[str, CheckFactory] = {
    "tcp": tcp_check,
    # Filled in by their modules: "send-expect", "tls", "http", "redis",
    # "postgres", "mysql".
}


def make_check(config: HealthConfig, clock: IReactorTime) -> Check:
    """The check function for a pool's health config."""
    return CHECK_TYPES[config.type](config, clock)
