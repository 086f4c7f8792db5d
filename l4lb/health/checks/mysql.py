"""The ``mysql`` check: the server greeting; with a ``user``, a login and ``COM_QUIT``.

The server speaks first. An error packet instead of the v10 greeting ("Host
... is blocked", "Too many connections") fails the check with its message.

What happens next decides how much the server logs. A client that leaves
during the handshake is an *aborted connect* to MySQL and MariaDB (counted in
``Aborted_connects``, logged at higher ``log_warnings``, and from remote
hosts counted toward ``max_connect_errors``, which ends with the host
blocked). So:

- with ``user`` set (always the case with a ``role``; the default user for a
  role check is ``root``), the check logs in (``mysql_native_password``, an
  auth-switch request, or the ``caching_sha2_password`` fast path), and ends
  with ``COM_QUIT``, a normal disconnect that also resets the host's error
  count;
- without a ``user`` and ``role = "any"`` it closes after the greeting: the
  cheapest probe, at the price above. Configure a user for MySQL pools.

With ``role`` it asks ``SELECT @@read_only, @@super_read_only`` (MariaDB has
no ``super_read_only``: on that error it asks ``SELECT @@read_only``); 0 is a
primary, 1 a replica.
"""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING

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

DEFAULT_USER = "root"
NATIVE = "mysql_native_password"
CACHING_SHA2 = "caching_sha2_password"

CLIENT_LONG_PASSWORD = 0x1
CLIENT_CONNECT_WITH_DB = 0x8
CLIENT_PROTOCOL_41 = 0x200
CLIENT_TRANSACTIONS = 0x2000
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_PLUGIN_AUTH = 0x80000
CLIENT_CONNECT_ATTRS = 0x100000

COM_QUIT = b"\x01"
COM_QUERY = b"\x03"
UTF8MB4 = 45


def packet(sequence: int, payload: bytes) -> bytes:
    """One client packet: 3-byte length, sequence id, payload."""
    return struct.pack("<I", len(payload))[:3] + bytes([sequence & 0xFF]) + payload


def read_packet(buffer: bytearray) -> tuple[tuple[int, bytes], int] | None:
    """A parser: one server packet as (sequence id, payload)."""
    if len(buffer) < 4:
        return None
    length = int.from_bytes(buffer[:3], "little")
    if length > LIMIT:
        raise BadReplyError(f"not a MySQL reply: {show(buffer)}")
    if len(buffer) < 4 + length:
        return None
    return (buffer[3], bytes(buffer[4 : 4 + length])), 4 + length


def scramble_native(password: str, nonce: bytes) -> bytes:
    """``SHA1(password) XOR SHA1(nonce + SHA1(SHA1(password)))``; empty for no password."""
    if not password:
        return b""
    stage1 = hashlib.sha1(password.encode()).digest()
    stage2 = hashlib.sha1(stage1).digest()
    mask = hashlib.sha1(nonce + stage2).digest()
    return bytes(a ^ b for a, b in zip(stage1, mask, strict=True))


def scramble_sha256(password: str, nonce: bytes) -> bytes:
    """``SHA256(password) XOR SHA256(SHA256(SHA256(password)) + nonce)``."""
    if not password:
        return b""
    stage1 = hashlib.sha256(password.encode()).digest()
    stage2 = hashlib.sha256(stage1).digest()
    mask = hashlib.sha256(stage2 + nonce).digest()
    return bytes(a ^ b for a, b in zip(stage1, mask, strict=True))


SCRAMBLES = {NATIVE: scramble_native, CACHING_SHA2: scramble_sha256}


def error_message(payload: bytes) -> str:
    """The words of an ERR packet (0xff, code, optional #SQLSTATE, message)."""
    code = int.from_bytes(payload[1:3], "little") if len(payload) >= 3 else 0
    text = payload[3:]
    if text[:1] == b"#":
        text = text[6:]
    return f"server sent an error: {code} {text.decode('utf-8', 'replace')}"


def cstring(data: bytes, start: int) -> tuple[bytes, int]:
    end = data.find(b"\0", start)
    if end < 0:
        return data[start:], len(data)
    return data[start:end], end + 1


def parse_greeting(payload: bytes) -> tuple[str, bytes, str]:
    """(server version, auth nonce, auth plugin) of a v10 greeting."""
    if payload[:1] != b"\x0a":
        raise BadReplyError(f"not a MySQL greeting: {show(payload)}")
    version, pos = cstring(payload, 1)
    try:
        nonce = payload[pos + 4 : pos + 12]
        pos += 13
        capabilities = int.from_bytes(payload[pos : pos + 2], "little")
        capabilities |= int.from_bytes(payload[pos + 5 : pos + 7], "little") << 16
        nonce_length = payload[pos + 7]
        pos += 18
    except IndexError:
        raise BadReplyError("MySQL greeting cut short") from None
    if capabilities & CLIENT_SECURE_CONNECTION:
        more = max(13, nonce_length - 8)
        nonce += payload[pos : pos + more].rstrip(b"\0")
        pos += more
    plugin = NATIVE
    if capabilities & CLIENT_PLUGIN_AUTH:
        name, _ = cstring(payload, pos)
        plugin = name.decode("ascii", "replace") or NATIVE
    text = version.decode("utf-8", "replace")
    if text.startswith("5.5.5-") and "MariaDB" in text:
        text = text[len("5.5.5-") :]  # MariaDB's prefix for old replication clients
    return text, nonce, plugin


def handshake_response(
    user: str, auth: bytes, database: str | None, plugin: str
) -> bytes:
    """HandshakeResponse41 with the client attribute ``program_name=l4lb-health``."""
    flags = (
        CLIENT_LONG_PASSWORD
        | CLIENT_PROTOCOL_41
        | CLIENT_TRANSACTIONS
        | CLIENT_SECURE_CONNECTION
        | CLIENT_PLUGIN_AUTH
        | CLIENT_CONNECT_ATTRS
    )
    if database:
        flags |= CLIENT_CONNECT_WITH_DB
    body = struct.pack("<IIB", flags, 1 << 24, UTF8MB4) + b"\0" * 23
    body += user.encode() + b"\0" + bytes([len(auth)]) + auth
    if database:
        body += database.encode() + b"\0"
    body += plugin.encode() + b"\0"
    attrs = b"".join(
        bytes([len(k)]) + k + bytes([len(v)]) + v
        for k, v in [(b"program_name", b"l4lb-health")]
    )
    return body + bytes([len(attrs)]) + attrs


def lenenc_int(data: bytes, pos: int) -> tuple[int | None, int]:
    first = data[pos]
    if first < 0xFB:
        return first, pos + 1
    if first == 0xFB:
        return None, pos + 1
    if first == 0xFF:
        raise BadReplyError(f"malformed MySQL reply: {show(data)}")
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}[first]
    return int.from_bytes(data[pos + 1 : pos + 1 + size], "little"), pos + 1 + size


def row_values(payload: bytes) -> list[bytes | None]:
    """The columns of a text-protocol result row."""
    values: list[bytes | None] = []
    pos = 0
    while pos < len(payload):
        length, pos = lenenc_int(payload, pos)
        if length is None:
            values.append(None)
        else:
            values.append(payload[pos : pos + length])
            pos += length
    return values


def mysql_check(config: HealthConfig, clock: IReactorTime) -> Check:
    """Greeting; with a user (or a role), login, the read_only query, COM_QUIT."""
    secret = read_secret(config.password_file)
    want = config.role
    user = config.user or (DEFAULT_USER if want != "any" else None)

    async def log_in(
        conv: Conversation, nonce: bytes, plugin: str
    ) -> CheckResult | None:
        assert user is not None
        password = secret.value or ""
        if plugin not in SCRAMBLES:
            plugin = NATIVE
        response = handshake_response(
            user, SCRAMBLES[plugin](password, nonce), config.database, plugin
        )
        conv.write(packet(1, response))
        while True:
            sequence, payload = await conv.read(read_packet, "the login reply")
            if payload[:1] == b"\x00":
                return None
            if payload[:1] == b"\xff":
                return CheckResult(False, error_message(payload))
            if payload[:1] == b"\xfe":  # auth switch: plugin name, new nonce
                name, pos = cstring(payload, 1)
                plugin = name.decode("ascii", "replace")
                if plugin not in SCRAMBLES:
                    return CheckResult(
                        False,
                        f"server wants {plugin} authentication, which l4lb does not speak",
                    )
                nonce = payload[pos:].rstrip(b"\0")
                conv.write(packet(sequence + 1, SCRAMBLES[plugin](password, nonce)))
            elif payload[:2] == b"\x01\x03":  # caching_sha2 fast path: OK follows
                continue
            elif payload[:2] == b"\x01\x04":
                return CheckResult(
                    False,
                    f"{CACHING_SHA2} needs a full login (TLS or RSA), which l4lb does not speak",
                )
            else:
                return CheckResult(False, f"unexpected login reply: {show(payload)}")

    async def query(conv: Conversation, sql: str) -> list[bytes | None] | str:
        """The first row of ``sql``, or the server's error message."""
        conv.write(packet(0, COM_QUERY + sql.encode()))
        _, payload = await conv.read(read_packet, "the query reply")
        if payload[:1] == b"\xff":
            return error_message(payload)
        columns, _ = lenenc_int(payload, 0)
        for _ in range(columns or 0):
            await conv.read(read_packet, "a column definition")
        _, payload = await conv.read(read_packet, "the end of the column definitions")
        first: list[bytes | None] | None = None
        while True:
            _, payload = await conv.read(read_packet, "a result row")
            if payload[:1] == b"\xfe" and len(payload) < 9:
                break
            if payload[:1] == b"\xff":
                return error_message(payload)
            if first is None:
                first = row_values(payload)
        return first if first is not None else "the query returned no row"

    async def exchange(conv: Conversation) -> CheckResult:
        if secret.problem is not None:
            return CheckResult(False, secret.problem)
        _, payload = await conv.read(read_packet, "the server greeting")
        if payload[:1] == b"\xff":
            return CheckResult(False, error_message(payload))
        version, nonce, plugin = parse_greeting(payload)
        if user is None:
            return CheckResult(True, f"greeting from {version}")
        failed = await log_in(conv, nonce, plugin)
        if failed is not None:
            return failed
        conv.goodbye = packet(0, COM_QUIT)
        if want == "any":
            return CheckResult(True, f"logged in to {version}")
        row = await query(conv, "SELECT @@read_only, @@super_read_only")
        if isinstance(row, str) and "super_read_only" in row:
            row = await query(conv, "SELECT @@read_only")
        if isinstance(row, str):
            return CheckResult(False, row)
        if any(v not in (b"0", b"1") for v in row):
            return CheckResult(False, f"read_only query returned {row!r}")
        role = "replica" if b"1" in row else "primary"
        return role_verdict(want, role, True)

    def check(endpoint: IStreamClientEndpoint) -> Deferred[CheckResult]:
        return probe(endpoint, exchange)

    return check
