"""The ``postgres`` check: the startup exchange, and with ``role`` a login and one query.

It sends a StartupMessage (``user``, default ``postgres``; ``database`` when
set, else the server's default, the user name; ``application_name =
l4lb-health`` so the check is recognisable in ``pg_stat_activity``) and reads
the reply:

- an ErrorResponse ("the database system is starting up", "too many
  clients", ...) fails the check with the server's message;
- with ``role = "any"`` and no password configured, an authentication request
  is success: the postmaster accepted the connection and forked a backend for
  it. The check closes there; PostgreSQL logs nothing for a client that leaves
  at the password prompt (``auth.c``: psql does this all the time), which is
  the quietest choice. Under ``trust`` it reads on to ReadyForQuery.
- with a password (``password_file``, read once when the check is built) it
  answers cleartext, MD5 or SCRAM-SHA-256 (via the ``scramp`` library, which
  also checks the server's signature) and waits for ReadyForQuery;
- with ``role`` primary/replica it runs ``SELECT pg_is_in_recovery()``:
  ``f`` is a primary, ``t`` a replica.

Once logged in it ends with Terminate, as libpq does, so the server logs no
"unexpected EOF".
"""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING

import scramp
from twisted.internet.defer import Deferred

from l4lb.health.checks.conversation import (
    LIMIT,
    BadReplyError,
    Check,
    CheckResult,
    Conversation,
    probe,
    read_secret,
    role_verdict,
    show,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

    from l4lb.config import HealthConfig

APPLICATION_NAME = "l4lb-health"
DEFAULT_USER = "postgres"
PROTOCOL_3_0 = 196608
TERMINATE = b"X\x00\x00\x00\x04"
SCRAM = "SCRAM-SHA-256"

AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5 = 0, 3, 5
AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 10, 11, 12
AUTH_NAMES = {
    2: "Kerberos",
    AUTH_CLEARTEXT: "a cleartext password",
    AUTH_MD5: "an MD5 password",
    7: "GSSAPI",
    9: "SSPI",
    AUTH_SASL: "SASL (SCRAM)",
}


def startup_message(user: str, database: str | None) -> bytes:
    """The StartupMessage of protocol 3.0."""
    params = {"user": user, "application_name": APPLICATION_NAME}
    if database is not None:
        params["database"] = database
    body = struct.pack("!I", PROTOCOL_3_0)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def message(kind: bytes, body: bytes) -> bytes:
    """A frontend message: type byte, length, body."""
    return kind + struct.pack("!I", len(body) + 4) + body


def md5_password(user: str, password: str, salt: bytes) -> str:
    """``"md5" + md5(md5(password + user).hex + salt).hex``, PostgreSQL's MD5 answer."""
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


class Scram:
    """The client side of a SCRAM exchange, by ``scramp``, in PostgreSQL's framing."""

    def __init__(
        self, mechanism: str, user: str, password: str, nonce: str | None = None
    ) -> None:
        self.mechanism = mechanism
        self._client = scramp.ScramClient([mechanism], user, password, c_nonce=nonce)

    def first(self) -> str:
        return self._client.get_client_first()

    def final(self, server_first: str) -> str:
        try:
            self._client.set_server_first(server_first)
            return self._client.get_client_final()
        except scramp.ScramException as error:
            raise BadReplyError(f"SCRAM exchange failed: {error}") from None

    def verify(self, server_final: str) -> None:
        try:
            self._client.set_server_final(server_final)
        except scramp.ScramException as error:
            raise BadReplyError(f"SCRAM exchange failed: {error}") from None


def read_message(buffer: bytearray) -> tuple[tuple[bytes, bytes], int] | None:
    """A parser: one backend message as (type byte, body)."""
    if buffer and not buffer[:1].isalpha():
        raise BadReplyError(f"not a PostgreSQL reply: {show(buffer)}")
    if len(buffer) < 5:
        return None
    kind = bytes(buffer[:1])
    (length,) = struct.unpack("!I", buffer[1:5])
    if length < 4 or length > LIMIT:
        raise BadReplyError(f"not a PostgreSQL reply: {show(buffer)}")
    if len(buffer) < 1 + length:
        return None
    return (kind, bytes(buffer[5 : 1 + length])), 1 + length


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse body by code letter."""
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def server_error(body: bytes) -> str:
    fields = error_fields(body)
    severity = fields.get("V") or fields.get("S") or "ERROR"
    code = f" ({fields['C']})" if "C" in fields else ""
    return f"server sent an error: {severity}: {fields.get('M', '?')}{code}"


def postgres_check(config: HealthConfig, clock: IReactorTime) -> Check:
    """Startup (and login when needed), then ``pg_is_in_recovery()`` for a role."""
    secret = read_secret(config.password_file)
    user = config.user or DEFAULT_USER
    want = config.role
    startup = startup_message(user, config.database)

    async def log_in(conv: Conversation) -> CheckResult | None:
        """Up to AuthenticationOk; a result when the check ends before it."""
        scram: Scram | None = None
        while True:
            kind, body = await conv.read(read_message, "the startup reply")
            if kind == b"E":
                return CheckResult(False, server_error(body))
            if kind != b"R":
                if kind in (b"N", b"v"):
                    continue
                return CheckResult(
                    False, f"unexpected {kind.decode()!r} message during startup"
                )
            (code,) = struct.unpack("!I", body[:4])
            if code == AUTH_OK:
                return None
            if (
                code not in (AUTH_SASL_CONTINUE, AUTH_SASL_FINAL)
                and secret.value is None
            ):
                method = AUTH_NAMES.get(code, f"authentication method {code}")
                if want == "any":
                    return CheckResult(
                        True, f"accepting connections (asks for {method})"
                    )
                return CheckResult(
                    False, f"server asks for {method}, no password_file configured"
                )
            password = secret.value or ""
            if code == AUTH_CLEARTEXT:
                conv.write(message(b"p", password.encode() + b"\0"))
            elif code == AUTH_MD5:
                conv.write(
                    message(
                        b"p", md5_password(user, password, body[4:8]).encode() + b"\0"
                    )
                )
            elif code == AUTH_SASL:
                offered = [m.decode() for m in body[4:].split(b"\0") if m]
                if SCRAM not in offered:
                    return CheckResult(
                        False,
                        f"server offers SASL {', '.join(offered)}, l4lb speaks {SCRAM}",
                    )
                scram = Scram(SCRAM, user, password)
                first = scram.first().encode()
                conv.write(
                    message(
                        b"p",
                        SCRAM.encode() + b"\0" + struct.pack("!i", len(first)) + first,
                    )
                )
            elif code == AUTH_SASL_CONTINUE and scram is not None:
                conv.write(message(b"p", scram.final(body[4:].decode()).encode()))
            elif code == AUTH_SASL_FINAL and scram is not None:
                scram.verify(body[4:].decode())
            else:
                method = AUTH_NAMES.get(code, f"authentication method {code}")
                return CheckResult(
                    False, f"server asks for {method}, which l4lb does not speak"
                )

    async def ready(conv: Conversation) -> CheckResult | None:
        """Up to ReadyForQuery; an ErrorResponse on the way is the result."""
        error = None
        while True:
            kind, body = await conv.read(read_message, "ReadyForQuery")
            if kind == b"E":
                error = server_error(body)
                if not conv.goodbye:  # before the first ReadyForQuery: fatal
                    return CheckResult(False, error)
            elif kind == b"Z":
                conv.goodbye = TERMINATE
                return CheckResult(False, error) if error else None

    async def exchange(conv: Conversation) -> CheckResult:
        if secret.problem is not None:
            return CheckResult(False, secret.problem)
        conv.write(startup)
        ended = await log_in(conv)
        if ended is not None:
            return ended
        failed = await ready(conv)
        if failed is not None:
            return failed
        if want == "any":
            return CheckResult(True, "ready for queries")
        conv.write(message(b"Q", b"SELECT pg_is_in_recovery()\0"))
        values: list[bytes | None] = []
        while True:
            kind, body = await conv.read(read_message, "the pg_is_in_recovery() reply")
            if kind == b"D":
                (columns,) = struct.unpack("!H", body[:2])
                (size,) = struct.unpack("!i", body[2:6]) if columns else (-1,)
                values.append(body[6 : 6 + size] if size >= 0 else None)
            elif kind == b"E":
                await ready(conv)  # the server still ends with ReadyForQuery
                return CheckResult(False, server_error(body))
            elif kind == b"Z":
                break
        if values == [b"f"]:
            role = "primary"
        elif values == [b"t"]:
            role = "replica"
        else:
            return CheckResult(False, f"pg_is_in_recovery() returned {values!r}")
        return role_verdict(want, role, True)

    def check(endpoint: IStreamClientEndpoint) -> Deferred[CheckResult]:
        return probe(endpoint, exchange)

    return check
