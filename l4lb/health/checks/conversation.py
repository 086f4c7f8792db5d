"""The shape every probe shares: connect, converse, say goodbye, close.

A check type is an ``async def exchange(conversation) -> CheckResult`` that
writes requests and awaits parsed replies; `probe` runs it against an endpoint.
The rules that make checks safe to run forever live here, once:

- bytes arrive as callbacks into one bounded buffer (`LIMIT`): a server that
  streams garbage fails the check instead of growing memory;
- a parser turns the buffer into a value when enough has arrived, or raises
  `BadReplyError` when it never will, so ``dataReceived`` creates no Deferreds;
- a refused connect, a reset, an early close or a bad reply is a failed
  `CheckResult` with the reason in words, never an errback;
- whatever the verdict, the exchange's ``goodbye`` bytes (Redis ``QUIT``,
  PostgreSQL Terminate, MySQL ``COM_QUIT``) are written and the connection is
  closed, and the result fires only once the socket is gone;
- cancelling the result (the caller's timeout) aborts the connect attempt or
  the connection and the Deferred fails with `CancelledError`.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs
import structlog
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as _TwistedProtocol
from twisted.python.failure import Failure

from l4lb.health.checks.tlswords import describe_tls_failure

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IAddress,
        IReactorTime,
        IStreamClientEndpoint,
    )

    from l4lb.config import HealthConfig

log = structlog.get_logger("l4lb.health")

T = TypeVar("T")

LIMIT = 64 * 1024
"""The most unparsed bytes a probe holds; every reply a check reads is far smaller."""


@attrs.frozen
class CheckResult:
    """The outcome of one probe; ``reason`` says why in words, for the log."""

    ok: bool
    reason: str


class Check(Protocol):
    """Probe a server once through ``endpoint``."""

    def __call__(self, endpoint: IStreamClientEndpoint) -> Deferred[CheckResult]: ...


CheckFactory = Callable[["HealthConfig", "IReactorTime"], Check]


class BadReplyError(Exception):
    """The server answered, but not as a healthy one would; ``reason`` is for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Parser = Callable[[bytearray], "tuple[T, int] | None"]
"""Reads one reply from the start of the buffer: (value, bytes used), or None
while more bytes are needed; raises `BadReplyError` when the bytes can never be a
good reply."""


def show(data: bytes, limit: int = 80) -> str:
    """Server bytes quoted for a log line: the first line, escaped, cut at ``limit``."""
    line = bytes(data).split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    cut = len(line) > limit
    text = line[:limit].decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return '"' + text.replace('"', '\\"') + ("..." if cut else "") + '"'


def describe_connect_failure(failure: Failure) -> str:
    """A failed connect in the words of a state-change log line."""
    if failure.check(ConnectionRefusedError):
        return "connect refused"
    if failure.check(ConnectError):
        detail = failure.value.osError or failure.getErrorMessage()
        return f"connect failed: {detail}"
    return f"connect failed: {failure.getErrorMessage()}"


def describe_lost(reason: Failure) -> str:
    """Why a connection ended, in words (TLS failures included)."""
    tls = describe_tls_failure(reason)
    if tls is not None:
        return tls
    if reason.check(ConnectionDone):
        return "server closed the connection"
    if reason.check(ConnectionLost):
        # Twisted reports every failed read (ECONNRESET in practice) this way.
        return "connection reset by server"
    return f"connection lost: {reason.getErrorMessage()}"


# Errors of a parser or exchange reading a field the framing promised but the
# server did not send correctly: the server's fault, so a result, not a crash.
_MALFORMED = (struct.error, IndexError, ValueError, UnicodeDecodeError)


class Conversation(_TwistedProtocol):
    """One probe connection: a bounded read buffer and one pending read at a time."""

    limit = LIMIT

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.goodbye = b""  # written before closing, set once the server expects it
        self.received = 0
        self.is_connected = False
        self.lost: Failure | None = None
        self._broken: str | None = None  # why we gave up on the connection
        self._reader: tuple[Parser[Any], str, Deferred[Any]] | None = None
        self._close_waiters: list[Deferred[None]] = []

    # -- bytes in (callbacks) ----------------------------------------------

    def connectionMade(self) -> None:
        self.is_connected = True

    def dataReceived(self, data: bytes) -> None:
        if self._broken is not None:
            return
        self.received += len(data)
        self.buffer += data
        self._parse()
        if len(self.buffer) > self.limit and self._broken is None:
            self._break(f"reply longer than {self.limit} bytes")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.is_connected = False
        self.lost = reason
        if self._reader is not None:
            self._parse()
        if self._reader is not None:
            _, what, d = self._reader
            self._reader = None
            d.errback(BadReplyError(self._why_unreadable(what)))
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _parse(self) -> None:
        if self._reader is None:
            return
        parse, _, d = self._reader
        try:
            got = parse(self.buffer)
        except BadReplyError as failed:
            self._reader = None
            d.errback(failed)
            return
        except _MALFORMED as error:
            self._reader = None
            d.errback(BadReplyError(f"malformed reply ({error})"))
            return
        if got is None:
            return
        value, used = got
        del self.buffer[:used]
        self._reader = None
        d.callback(value)

    def _break(self, why: str) -> None:
        self._broken = why
        self.buffer.clear()
        if self._reader is not None:
            _, _, d = self._reader
            self._reader = None
            d.errback(BadReplyError(why))
        self.abort()

    def _why_unreadable(self, what: str) -> str:
        if self._broken is not None:
            return self._broken
        assert self.lost is not None
        return f"{describe_lost(self.lost)} while waiting for {what}"

    # -- the exchange's side (awaited) ---------------------------------------

    def write(self, data: bytes) -> None:
        """Send bytes to the server (dropped once the connection is gone)."""
        if self.is_connected:
            self.transport.write(data)

    def read(self, parse: Parser[T], what: str) -> Deferred[T]:
        """The next reply as ``parse`` reads it; ``what`` names it in failure reasons."""
        assert self._reader is None, "one read at a time"
        d: Deferred[T] = Deferred(self._cancel_read)
        if self._broken is not None:
            d.errback(BadReplyError(self._broken))
            return d
        self._reader = (parse, what, d)
        self._parse()
        if self._reader is not None and self.lost is not None:
            self._reader = None
            d.errback(BadReplyError(self._why_unreadable(what)))
        return d

    def _cancel_read(self, d: Deferred[Any]) -> None:
        if self._reader is not None and self._reader[2] is d:
            self._reader = None
        self.abort()

    def finish(self) -> None:
        """Say goodbye and close: after flushing, so the server sees a clean end."""
        if self.is_connected:
            if self.goodbye:
                self.transport.write(self.goodbye)
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once (timeouts, broken servers)."""
        if self.is_connected:
            self.transport.abortConnection()

    def closed(self) -> Deferred[None]:
        """Fires once the connection is gone; cancelling it aborts the connection."""
        d: Deferred[None] = Deferred(self._cancel_close_wait)
        if self.lost is None:
            self._close_waiters.append(d)
        else:
            d.callback(None)
        return d

    def _cancel_close_wait(self, d: Deferred[None]) -> None:
        if d in self._close_waiters:
            self._close_waiters.remove(d)
        self.abort()


Exchange = Callable[[Conversation], Awaitable[CheckResult]]


class OneShotFactory(Factory):
    """Hands the endpoint one prepared protocol, without Twisted's per-connect logs."""

    noisy = False

    def __init__(self, protocol: _TwistedProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress) -> _TwistedProtocol:
        return self._protocol


def probe(
    endpoint: IStreamClientEndpoint,
    exchange: Exchange,
    conversation: Conversation | None = None,
) -> Deferred[CheckResult]:
    """Connect through ``endpoint``, run ``exchange``, close; the verdict.

    Cancelling the result aborts whatever is in progress (the connect attempt
    or the connection) and fails it with `CancelledError`.
    """
    conv = conversation if conversation is not None else Conversation()
    return Deferred.fromCoroutine(_probe(endpoint, exchange, conv))


async def connect(
    endpoint: IStreamClientEndpoint, protocol: _TwistedProtocol
) -> CheckResult | None:
    """Connect ``protocol``; a failed result when that fails, None when connected.

    A cancelled connect stays a `CancelledError` (the endpoint may report it as
    ``ConnectingCancelledError``), so the caller's timeout is not a "result".
    """
    try:
        await endpoint.connect(OneShotFactory(protocol))
    except (CancelledError, ConnectingCancelledError):
        raise CancelledError() from None
    except Exception:
        return CheckResult(False, describe_connect_failure(Failure()))
    return None


async def _probe(
    endpoint: IStreamClientEndpoint, exchange: Exchange, conv: Conversation
) -> CheckResult:
    failed_connect = await connect(endpoint, conv)
    if failed_connect is not None:
        return failed_connect
    try:
        result = await exchange(conv)
    except BadReplyError as failed:
        result = CheckResult(False, failed.reason)
    except CancelledError:
        raise
    except _MALFORMED as error:
        # Framing was right but a field inside was not: the server's fault.
        result = CheckResult(False, f"malformed reply ({error})")
    except Exception as error:  # a bug in a check must not stop health checking
        log.exception("health check crashed")
        conv.abort()
        result = CheckResult(False, f"check error: {error!r}")
    conv.finish()
    await conv.closed()
    return result


def role_verdict(want: str, role: str, link_up: bool) -> CheckResult:
    """Whether a server in ``role`` is what a pool that wants ``want`` needs."""
    if role != want:
        return CheckResult(False, f"role is {role}, pool wants {want}")
    if role == "replica" and not link_up:
        return CheckResult(False, "role is replica with its link to the master down")
    return CheckResult(True, f"role is {role}")


@attrs.frozen
class Secret:
    """A password read once when the check is built (no file I/O per probe).

    ``problem`` says why it could not be read; a check with a problem fails
    every probe with that reason instead of stopping the service.
    """

    value: str | None
    problem: str | None = None


def read_secret(path: str | None) -> Secret:
    """The password in ``path`` (one trailing newline dropped); None without a path."""
    if path is None:
        return Secret(None)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        return Secret(None, f"cannot read password_file {path}: {error}")
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return Secret(text)
