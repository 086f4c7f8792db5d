"""Health check types: each is a callable that probes one server once.

A check connects through the endpoint it is given (the pool's server-connection
seam, so backend TLS covers checks too), runs its exchange, closes the
connection cleanly, and fires a :class:`CheckResult`. It never errbacks for a
failing server: refused connects, bad replies and resets are results with a
reason in words. The caller applies the check timeout by cancelling the
Deferred; cancelling aborts the connect attempt or the connection, leaves no
timer or socket behind, and fails the Deferred with ``CancelledError``.

The shared machinery (bounded buffer, clean close, cancellation) is in
`conversation`; each type is one module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

from l4lb.health.checks.conversation import (
    Check,
    CheckFactory,
    CheckResult,
    Conversation,
    describe_connect_failure,
    probe,
)
from l4lb.health.checks.http import http_check
from l4lb.health.checks.mysql import mysql_check
from l4lb.health.checks.postgres import postgres_check
from l4lb.health.checks.redis import redis_check
from l4lb.health.checks.sendexpect import send_expect_check
from l4lb.health.checks.tls import tls_check

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

    from l4lb.config import HealthConfig

__all__ = [
    "CHECK_TYPES",
    "Check",
    "CheckFactory",
    "CheckResult",
    "describe_connect_failure",
    "make_check",
    "tcp_check",
]


async def _connected(conversation: Conversation) -> CheckResult:
    return CheckResult(True, "connected")


def tcp_check(config: HealthConfig, clock: IReactorTime) -> Check:
    """Success is an accepted TCP connection, closed again at once."""

    def check(endpoint: IStreamClientEndpoint) -> Deferred[CheckResult]:
        return probe(endpoint, _connected)

    return check


CHECK_TYPES: dict[str, CheckFactory] = {
    "tcp": tcp_check,
    "send-expect": send_expect_check,
    "tls": tls_check,
    "http": http_check,
    "redis": redis_check,
    "postgres": postgres_check,
    "mysql": mysql_check,
}


def make_check(config: HealthConfig, clock: IReactorTime) -> Check:
    """The check function for a pool's health config."""
    return CHECK_TYPES[config.type](config, clock)
