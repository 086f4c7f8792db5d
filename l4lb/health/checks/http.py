"""The ``http`` check: ``GET path HTTP/1.1``; success when the status is in ``expect_status``.

This is how Patroni tells roles apart: on its REST port (8008) ``/primary``
answers 200 on the leader and 503 elsewhere, ``/replica`` the other way round.
The request is written and the response parsed by Twisted's own HTTP/1.1
client protocol (``twisted.web._newclient.HTTP11ClientProtocol``), which runs
over any connected transport, so the pool's endpoint (TLS included) is used as
it is. The request carries ``Host`` (``server_name`` or the peer address) and
``Connection: close``; the body is read and discarded, and the server closes.
Everything the server sends is counted against `LIMIT`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol, Request, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from l4lb.health.checks.conversation import (
    LIMIT,
    Check,
    CheckResult,
    connect,
    describe_lost,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

    from l4lb.config import HealthConfig


class _Client(HTTP11ClientProtocol):
    """Twisted's HTTP/1.1 client with a byte budget and a "closed" signal."""

    def __init__(self) -> None:
        super().__init__()
        self.received = 0
        self.too_long = False
        self.is_connected = False
        self._closed: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self.is_connected = True

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > LIMIT:
            self.too_long = True
            self.transport.abortConnection()
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.is_connected = False
        super().connectionLost(reason)
        waiters, self._closed = self._closed, []
        for waiter in waiters:
            waiter.callback(None)

    def abort(self) -> None:
        if self.is_connected:
            self.transport.abortConnection()

    def closed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred(lambda _: self.abort())
        if self.is_connected:
            self._closed.append(d)
        else:
            d.callback(None)
        return d


class _Discard(Protocol):
    """Reads a response body to its end and drops it."""

    def __init__(self, client: _Client) -> None:
        self.done: Deferred[None] = Deferred(lambda _: client.abort())

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def _cancelled(failure: Failure) -> bool:
    reasons = getattr(failure.value, "reasons", None) or []
    return failure.check(CancelledError) is not None or any(
        r.check(CancelledError) for r in reasons
    )


def _describe_http_failure(failure: Failure, client: _Client) -> str:
    if client.too_long:
        return f"HTTP response longer than {LIMIT} bytes"
    reasons = getattr(failure.value, "reasons", None) or [failure]
    first = reasons[0]
    lost = describe_lost(first)
    if not lost.startswith("connection lost:"):
        return f"{lost} while waiting for the HTTP response"
    return f"not an HTTP response: {first.getErrorMessage()}"


def http_check(config: HealthConfig, clock: IReactorTime) -> Check:
    """GET ``config.path``; success when the status is in ``config.expect_status``."""
    path = config.path.encode("ascii")

    def host_header(peer: Any) -> bytes:
        """``server_name``, else the address connected to (IPv6 in brackets)."""
        if config.server_name:
            return config.server_name.encode("idna")
        host = getattr(peer, "host", None)
        if host is None:  # a unix socket
            return b"localhost"
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{peer.port}".encode("ascii")

    wanted = " or ".join(str(s) for s in config.expect_status)

    async def run(endpoint: IStreamClientEndpoint) -> CheckResult:
        client = _Client()
        failed_connect = await connect(endpoint, client)
        if failed_connect is not None:
            return failed_connect
        headers = Headers(
            {
                b"host": [host_header(client.transport.getPeer())],
                b"user-agent": [b"l4lb-health"],
            }
        )
        request = Request(b"GET", path, headers, None, persistent=False)
        result: CheckResult
        try:
            response: Any = await client.request(request)
            body = _Discard(client)
            response.deliverBody(body)
            await body.done
        except Exception as error:
            failure = Failure(error)
            if _cancelled(failure):
                raise CancelledError() from None
            result = CheckResult(False, _describe_http_failure(failure, client))
        else:
            if response.code in config.expect_status:
                result = CheckResult(True, f"HTTP status {response.code}")
            else:
                result = CheckResult(
                    False, f"HTTP status {response.code}, expected {wanted}"
                )
        if client.is_connected:
            client.transport.loseConnection()
        await client.closed()
        return result

    def check(endpoint: IStreamClientEndpoint) -> Deferred[CheckResult]:
        return Deferred.fromCoroutine(run(endpoint))

    return check
