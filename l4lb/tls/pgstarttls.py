"""PostgreSQL TLS termination: the negotiation that runs before the session.

libpq clients do not open with a TLS ClientHello. They send an 8-byte
SSLRequest and wait for one byte, ``S``, before starting the handshake (or
``N`` to go on in plaintext). HAProxy's and nginx's TLS termination expect the
ClientHello first, so they cannot terminate TLS for PostgreSQL. A frontend with
``starttls = "postgres"`` accepts clients with `PostgresNegotiation` instead of
`ClientProtocol`; it owns the client transport until one of:

- **SSLRequest** → write ``S``, ``transport.startTLS(creator)``, wait for the
  handshake (`IHandshakeListener`), hand over: the decrypted stream (the
  client's StartupMessage onwards) is spliced to the plaintext server exactly
  like plain TCP.
- **GSSENCRequest** → write ``N`` (no GSSAPI encryption here) and read again.
- **Direct TLS** (libpq 17 ``sslnegotiation=direct``): the first byte is a TLS
  handshake record (0x16); TLS starts at once, replaying the bytes already
  read. The client must negotiate ALPN ``postgresql``, as the PostgreSQL
  protocol requires for direct TLS; the creator must offer it.
- **StartupMessage / CancelRequest** in plaintext: ``plaintext = "refuse"``
  answers with a PostgreSQL ErrorResponse (FATAL, SQLSTATE 28000) and closes;
  ``"allow"`` hands over, and the bytes already read reach the server first.
- Anything else (garbage, bad lengths, unencrypted bytes pipelined after a
  request, silence past ``handshake_timeout``): close and log the reason.

No backend connection is opened before the hand-over, so a refused or
unfinished handshake never reaches a server. The classification of the
opening bytes (`classify`) is a pure function; the protocol is thin glue.

While negotiating, the client holds a slot of the frontend (it counts towards
``max_connections`` and is closed at shutdown like a session), and a client
that never gets a session still gets the one "connection closed" log line.
"""

from __future__ import annotations

import contextlib
import enum
import struct
from typing import TYPE_CHECKING, Any

import attrs
import structlog
from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from l4lb.proxy import ClientProtocol, format_address
from l4lb.tls.termination import connection_fields

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from l4lb.config import FrontendTLSConfig
    from l4lb.frontend import Frontend

log = structlog.get_logger("l4lb.tls.pgstarttls")

# Request codes of the PostgreSQL frontend/backend protocol ("Message Formats").
SSL_REQUEST_CODE = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE = 80877104  # 1234 << 16 | 5680
CANCEL_REQUEST_CODE = 80877102  # 1234 << 16 | 5678
PROTOCOL_MAJOR = 3  # StartupMessage: protocol 3.x (3.0 is 196608)
# The server's limit on a startup packet (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_LENGTH = 10000
TLS_HANDSHAKE_RECORD = 0x16  # first byte of a TLS ClientHello record
ALPN_POSTGRESQL = b"postgresql"

SSL_REQUEST = struct.pack("!ii", 8, SSL_REQUEST_CODE)
GSSENC_REQUEST = struct.pack("!ii", 8, GSSENC_REQUEST_CODE)

REFUSAL_MESSAGE = "TLS required: connect with sslmode=require"


class Kind(enum.Enum):
    """What the opening bytes of a PostgreSQL client are."""

    NEED_MORE = "need more"
    SSL_REQUEST = "SSLRequest"
    GSSENC_REQUEST = "GSSENCRequest"
    DIRECT_TLS = "direct TLS"
    STARTUP = "StartupMessage"
    CANCEL = "CancelRequest"
    INVALID = "invalid"


@attrs.frozen
class Opening:
    """The classification of a client's first bytes; ``problem`` says why INVALID."""

    kind: Kind
    problem: str | None = None


def classify(data: bytes) -> Opening:
    """Classify what a client sent first (pure: bytes in, decision out).

    A decision needs at most 8 bytes (length and code of the first packet),
    except direct TLS, which one byte shows: a valid length is below 2**24,
    so a packet's first byte is 0, never 0x16.
    """
    if not data:
        return Opening(Kind.NEED_MORE)
    if data[0] == TLS_HANDSHAKE_RECORD:
        return Opening(Kind.DIRECT_TLS)
    if data[0] != 0:
        return Opening(Kind.INVALID, "not a PostgreSQL startup packet")
    if len(data) < 8:
        return Opening(Kind.NEED_MORE)
    length, code = struct.unpack_from("!ii", data)
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        kind = Kind.SSL_REQUEST if code == SSL_REQUEST_CODE else Kind.GSSENC_REQUEST
        if length != 8:
            return Opening(Kind.INVALID, f"{kind.value} with length {length}, not 8")
        return Opening(kind)
    if code == CANCEL_REQUEST_CODE:
        if length != 16:
            return Opening(Kind.INVALID, f"CancelRequest with length {length}, not 16")
        return Opening(Kind.CANCEL)
    if code >> 16 == PROTOCOL_MAJOR:
        if not 8 <= length <= MAX_STARTUP_LENGTH:
            return Opening(Kind.INVALID, f"StartupMessage with invalid length {length}")
        return Opening(Kind.STARTUP)
    return Opening(
        Kind.INVALID,
        f"unsupported protocol or request code {code >> 16}.{code & 0xFFFF}",
    )


def error_response(message: str, sqlstate: str = "28000") -> bytes:
    """A PostgreSQL ErrorResponse ('E') with severity FATAL, as the server sends it.

    psql prints it as ``FATAL:  <message>``: the client learns why it was
    refused instead of seeing a bare "server closed the connection".
    """
    fields = b"".join(
        tag + value.encode("utf-8") + b"\0"
        for tag, value in (
            (b"S", "FATAL"),
            (b"V", "FATAL"),  # non-localised severity (protocol 3.0, PG ≥ 9.6)
            (b"C", sqlstate),
            (b"M", message),
        )
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


def describe_tls_failure(failure: Failure) -> str:
    """OpenSSL's reasons ("no shared cipher", "unsupported protocol"), not its tuples."""
    value = failure.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        reasons = [str(entry[-1]) for entry in value.args[0] if entry]
        if reasons:
            return "; ".join(reasons)
    return failure.getErrorMessage() or type(value).__name__


class _State(enum.Enum):
    FIRST = "first packet"
    AFTER_GSSENC = "after GSSENCRequest"
    HANDSHAKE = "TLS handshake"
    HANDED_OVER = "handed over"
    CLOSING = "closing"


@implementer(IHandshakeListener)
class PostgresNegotiation(Protocol):
    """Owns a client of a ``starttls = "postgres"`` frontend until TLS is up.

    Then it hands the transport to a `ClientProtocol` (and so to a normal
    `Session`). Over TLS it stays the TLS layer's application protocol and
    passes the decrypted bytes on; in plaintext ("allow") it steps out of the
    transport altogether.
    """

    def __init__(
        self, frontend: Frontend, creator: Any, config: FrontendTLSConfig
    ) -> None:
        self.frontend = frontend
        self.creator = creator  # server TLS connection creator (or context factory)
        self.config = config
        self.clock = frontend.clock
        self.client: ClientProtocol | None = None
        self.mode: str | None = None  # "sslrequest" | "direct" | "plaintext"
        self._state = _State.FIRST
        self._buffer = b""
        self._tls: Any = None  # the TLS layer startTLS put above the transport
        self._timer: IDelayedCall | None = None
        self._reason: str | None = None
        self._detail: str | None = None
        self._started = 0.0
        self._lost = False

    # -- the frontend's view: a slot holder it can close at shutdown --------

    def connectionMade(self) -> None:
        self._started = self.clock.seconds()
        if ITCPTransport.providedBy(self.transport):
            with contextlib.suppress(OSError):  # the peer may be gone already
                self.transport.setTcpNoDelay(True)  # handshake flights go out at once
        self.frontend.session_started(self)  # type: ignore[arg-type]
        timeout = self.config.handshake_timeout
        if timeout > 0:
            self._timer = self.clock.callLater(timeout, self._timed_out)

    def close(self, reason: str, abort: bool = False) -> None:
        """Close from our side (shutdown); the same contract as `Session.close`."""
        self._refuse(reason, abort=abort)

    # -- reading the opening ------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state is _State.HANDED_OVER:
            self._pass_on(data)
            return
        if state is not _State.FIRST and state is not _State.AFTER_GSSENC:
            return  # closing, or TLS bytes before the handshake is done (not ours)
        self._buffer += data
        opening = classify(self._buffer)
        kind = opening.kind
        if kind is Kind.NEED_MORE:
            return
        if kind is Kind.INVALID:
            self._refuse("bad startup packet", opening.problem, abort=True)
        elif kind is Kind.DIRECT_TLS:
            if state is _State.AFTER_GSSENC:
                self._refuse(
                    "bad startup packet", "direct TLS after GSSENCRequest", abort=True
                )
            else:
                self._start_tls("direct", replay=self._take_buffer())
        elif len(self._buffer) > 8 and kind in (Kind.SSL_REQUEST, Kind.GSSENC_REQUEST):
            # A client waits for our one-byte answer before sending more; bytes
            # already here were sent in plaintext before any encryption was
            # agreed, possibly injected by a man in the middle (PostgreSQL
            # refuses them too, CVE-2021-23214).
            self._refuse(
                "bad startup packet",
                f"received unencrypted data after {kind.value}",
                abort=True,
            )
        elif kind is Kind.SSL_REQUEST:
            self._buffer = b""
            self._write(b"S")
            self._start_tls("sslrequest", replay=b"")
        elif kind is Kind.GSSENC_REQUEST:
            if state is _State.AFTER_GSSENC:
                self._refuse("bad startup packet", "second GSSENCRequest", abort=True)
                return
            self._buffer = b""
            self._state = _State.AFTER_GSSENC
            self._write(b"N")  # GSSAPI encryption is not offered; the client goes on
        else:  # a StartupMessage or CancelRequest in plaintext
            self._plaintext(kind)

    def _take_buffer(self) -> bytes:
        data, self._buffer = self._buffer, b""
        return data

    def _write(self, data: bytes) -> None:
        self.transport.write(data)

    def _plaintext(self, kind: Kind) -> None:
        if self.config.plaintext == "allow":
            self.mode = "plaintext"
            self._hand_over(self._take_buffer(), tls=False)
            return
        self._buffer = b""
        self._write(error_response(REFUSAL_MESSAGE))
        self._refuse("plaintext refused", f"{kind.value} without TLS")

    # -- TLS ----------------------------------------------------------------

    def _start_tls(self, mode: str, replay: bytes) -> None:
        self.mode = mode
        self._state = _State.HANDSHAKE
        transport = self.transport
        transport.startTLS(self.creator)
        # startTLS put a TLS layer between the transport and us: bytes read
        # from now on go through it, and so must those already read.
        self._tls = transport.protocol
        if replay:
            self._tls.dataReceived(replay)

    def handshakeCompleted(self) -> None:
        """The client's TLS handshake succeeded: check ALPN, then hand over."""
        if self._state is not _State.HANDSHAKE:
            return
        alpn = getattr(self._tls, "negotiatedProtocol", None)
        if self.mode == "direct" and alpn != ALPN_POSTGRESQL:
            # The PostgreSQL protocol requires ALPN "postgresql" with direct
            # TLS, so a TLS client of some other protocol is not taken for one.
            self._refuse(
                "tls handshake failed",
                "direct TLS without ALPN postgresql"
                + (f" (offered {alpn.decode(errors='replace')})" if alpn else ""),
            )
            return
        self._hand_over(b"", tls=True)

    # -- hand-over to the session --------------------------------------------

    def _hand_over(self, early: bytes, tls: bool) -> None:
        self._cancel_timer()
        self._state = _State.HANDED_OVER
        frontend = self.frontend
        tls_fields = self._tls_details()
        log.debug(
            "postgres negotiation done",
            frontend=frontend.name,
            client=format_address(self.transport.getPeer()),
            mode=self.mode,
            **tls_fields,
        )
        # The slot passes to the session without being freed in between.
        frontend.session_handing_over(self)  # type: ignore[arg-type]
        client = ClientProtocol(frontend)
        client.factory = frontend
        client.early = early
        # No half-close over TLS: the data path's server_eof closes instead.
        client.can_half_close = not tls  # type: ignore[attr-defined]
        self.client = client
        if not tls:
            # Plain TCP: step out, the transport delivers to the session directly.
            self.transport.protocol = client
        client.makeConnection(self.transport)
        # The same TLS fields as a TLS frontend's connection line.
        client.session.log_fields.update(tls_fields)

    def _tls_details(self) -> dict[str, str]:
        get_handle = getattr(self._tls, "getHandle", None)  # None: plaintext
        connection = get_handle() if get_handle is not None else None
        if not isinstance(connection, SSL.Connection):
            return {}
        return connection_fields(connection)

    def _pass_on(self, data: bytes) -> None:
        """Decrypted client bytes, after the hand-over.

        The TLS layer delivers everything it has decrypted even while the
        transport is paused, so bytes that arrived with the handshake's last
        flight (the StartupMessage, in TLS 1.3) can come before the backend is
        connected. They are held on the `ClientProtocol` and passed on first
        at the splice; at most one socket read's worth, as the session pauses
        the transport at once.
        """
        client = self.client
        assert client is not None
        session = getattr(client, "session", None)
        if session is None or session.server is None:
            client.early += data
        else:
            client.dataReceived(data)

    # -- ending without a session ------------------------------------------

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse(
            "handshake timeout",
            f"no TLS session after {self.config.handshake_timeout:g}s "
            f"(at: {self._state.value})",
            abort=True,
        )

    def _refuse(
        self, reason: str, detail: str | None = None, abort: bool = False
    ) -> None:
        if self._state is _State.HANDED_OVER:
            return  # the session has it now
        if self._reason is None:
            self._reason, self._detail = reason, detail
        self._state = _State.CLOSING
        self._cancel_timer()
        if abort:
            self.transport.abortConnection()
            return
        # Flush (the ErrorResponse, TLS close_notify), but a peer that never
        # reads or never answers close_notify is aborted after the timeout.
        self.transport.loseConnection()
        if not self._lost and self.config.handshake_timeout > 0:
            self._timer = self.clock.callLater(
                self.config.handshake_timeout, self.transport.abortConnection
            )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            timer, self._timer = self._timer, None
            if timer.active():
                timer.cancel()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._state is _State.HANDED_OVER:
            assert self.client is not None
            self.client.connectionLost(reason)
            return
        self._lost = True
        self._cancel_timer()
        if self._reason is None:
            if reason is not None and reason.check(SSL.Error):
                self._reason, self._detail = (
                    "tls handshake failed",
                    describe_tls_failure(reason),
                )
            else:
                self._reason = "client closed"
                if self._state is _State.HANDSHAKE:
                    self._detail = "during the TLS handshake"
        self._state = _State.CLOSING
        fields: dict[str, Any] = {
            "frontend": self.frontend.name,
            "pool": getattr(self.frontend.pool, "name", None),
            "server": None,
            "client": format_address(self.transport.getPeer()),
            "connect_time": None,
            "duration": round(self.clock.seconds() - self._started, 6),
            "bytes_from_client": 0,
            "bytes_from_server": 0,
            "retries": 0,
            "reason": self._reason,
            "tls": self.mode,
        }
        if self._detail:
            fields["detail"] = self._detail
        log.info("connection closed", **fields)
        self.frontend.session_finished(self)  # type: ignore[arg-type]
