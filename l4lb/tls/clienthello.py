"""Read the server name (SNI) and ALPN list from a TLS ClientHello (pure).

Passthrough routing must pick a pool from the first bytes a client sends,
without decrypting anything: the ClientHello is sent in the clear (RFC 8446
section 4.1.2, RFC 5246 section 7.4.1.2), and its ``server_name`` extension
(RFC 6066 section 3) names the host the client wants. No library parses a
ClientHello from raw bytes without also running a handshake (OpenSSL and
pyOpenSSL only expose it from inside a server callback, which would terminate
TLS), so this is a small hand-written parser. It never raises on input:
every outcome is one of four results, and it looks at no more than
:data:`MAX_HELLO_BYTES`.

The handshake message may be split over several TLS records (and a record may
arrive in pieces); records are reassembled before the message is parsed.
"""

from __future__ import annotations

import attrs

__all__ = [
    "MAX_HELLO_BYTES",
    "ClientHello",
    "Malformed",
    "NeedMore",
    "NotTLS",
    "parse_client_hello",
]

MAX_HELLO_BYTES = 16 * 1024  # whole records, headers included

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_RECORD_MAX = 2**14 + 256  # TLSPlaintext.length limit, with slack for old stacks


@attrs.frozen
class ClientHello:
    """A complete ClientHello: ``server_name`` (normal form) or None, ALPN names."""

    server_name: str | None
    alpn: tuple[str, ...]
    size: int  # bytes of records consumed, up to the end of the hello's record


@attrs.frozen
class NeedMore:
    """The bytes so far are a valid beginning; read more."""


@attrs.frozen
class NotTLS:
    """The client speaks something else (plain text, SSLv2...)."""

    reason: str


@attrs.frozen
class Malformed:
    """A TLS record stream that is broken or too large; ``reason`` says how."""

    reason: str


Result = ClientHello | NeedMore | NotTLS | Malformed


class _BadHelloError(Exception):
    """Internal: the message is malformed (never leaves this module)."""


class _Reader:
    """Bounds-checked reads over a bytes object."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining():
            raise _BadHelloError(f"{what} runs past the end of its container")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def take_all(self) -> bytes:
        return self.take(self.remaining(), "value")

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> _Reader:
        return _Reader(self.take(self.uint(length_size, f"{what} length"), what))


def parse_client_hello(data: bytes) -> Result:
    """Parse the start of a client's byte stream as a TLS ClientHello.

    Returns NeedMore until the whole hello has arrived (callers enforce the
    time limit; the size limit is enforced here).
    """
    data = data[:MAX_HELLO_BYTES]
    if not data:
        return NeedMore()
    if data[0] != _HANDSHAKE:
        if data[0] & 0x80:
            return NotTLS("SSLv2-style hello (not supported)")
        return NotTLS(f"first byte 0x{data[0]:02x} is not a TLS handshake record")
    message = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return _more(data, pos)
        kind, major, length = (
            data[pos],
            data[pos + 1],
            data[pos + 3] << 8 | data[pos + 4],
        )
        if kind != _HANDSHAKE:
            return Malformed(
                f"record of type {kind} before the ClientHello was complete"
            )
        if major != 3:
            return Malformed(f"record version {major}.{data[pos + 2]} is not TLS")
        if length == 0:
            return Malformed("empty handshake record")
        if length > _RECORD_MAX:
            return Malformed(f"record length {length} exceeds the TLS limit")
        complete = len(data) - pos - 5 >= length
        message += data[pos + 5 : pos + 5 + length]
        if len(message) >= 4:  # the message header says how long the hello is
            if message[0] != _CLIENT_HELLO:
                return Malformed(
                    f"first handshake message has type {message[0]}, not ClientHello"
                )
            body_length = int.from_bytes(message[1:4], "big")
            if 4 + body_length > MAX_HELLO_BYTES:
                return Malformed(
                    f"ClientHello of {body_length} bytes is larger than"
                    f" {MAX_HELLO_BYTES // 1024} KiB"
                )
        if not complete:
            return _more(data, pos + 5 + length)
        pos += 5 + length
        if len(message) >= 4 and len(message) >= 4 + body_length:
            try:
                name, alpn = _parse_body(bytes(message[4 : 4 + body_length]))
            except _BadHelloError as e:
                return Malformed(str(e))
            return ClientHello(name, alpn, pos)


def _more(data: bytes, needed: int) -> NeedMore | Malformed:
    """NeedMore, unless what is still needed cannot fit under the size limit."""
    if needed > MAX_HELLO_BYTES or len(data) >= MAX_HELLO_BYTES:
        return Malformed(
            f"no complete ClientHello within {MAX_HELLO_BYTES // 1024} KiB"
        )
    return NeedMore()


def _parse_body(body: bytes) -> tuple[str | None, tuple[str, ...]]:
    reader = _Reader(body)
    version = reader.uint(2, "client version")
    if version >> 8 != 3:
        raise _BadHelloError(f"client version 0x{version:04x} is not TLS")
    reader.take(32, "random")
    session_id = reader.vector(1, "session id")
    if session_id.remaining() > 32:
        raise _BadHelloError("session id longer than 32 bytes")
    suites = reader.vector(2, "cipher suites")
    if suites.remaining() == 0 or suites.remaining() % 2:
        raise _BadHelloError("cipher suite list is empty or of odd length")
    if reader.vector(1, "compression methods").remaining() == 0:
        raise _BadHelloError("compression method list is empty")
    if reader.remaining() == 0:
        return None, ()  # no extensions at all (old clients)
    extensions = reader.vector(2, "extensions")
    if reader.remaining():
        raise _BadHelloError("bytes after the extensions")
    seen: set[int] = set()
    name: str | None = None
    alpn: tuple[str, ...] = ()
    while extensions.remaining():
        kind = extensions.uint(2, "extension type")
        ext = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise _BadHelloError(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            name = _server_name(ext)
        elif kind == _EXT_ALPN:
            alpn = _alpn(ext)
    return name, alpn


def _server_name(ext: _Reader) -> str | None:
    names = ext.vector(2, "server name list")
    if ext.remaining():
        raise _BadHelloError("bytes after the server name list")
    host: str | None = None
    while names.remaining():
        name_type = names.uint(1, "server name type")
        value = names.vector(2, "server name").take_all()
        if name_type != 0:
            continue  # unknown name types are skipped, per RFC 6066
        if host is not None:
            raise _BadHelloError("more than one host name in server_name")
        if not value:
            raise _BadHelloError("empty host name in server_name")
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            raise _BadHelloError("host name in server_name is not ASCII") from None
        if not text.isprintable() or " " in text:
            raise _BadHelloError(
                "host name in server_name has control characters or spaces"
            )
        host = text.rstrip(".").lower() or text
    return host


def _alpn(ext: _Reader) -> tuple[str, ...]:
    names = ext.vector(2, "ALPN list")
    if ext.remaining():
        raise _BadHelloError("bytes after the ALPN list")
    protocols = []
    while names.remaining():
        value = names.vector(1, "ALPN protocol name").take_all()
        if not value:
            raise _BadHelloError("empty ALPN protocol name")
        protocols.append(value.decode("ascii", "backslashreplace"))
    return tuple(protocols)
