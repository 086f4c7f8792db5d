"""TLS termination on a frontend: contexts, SNI certificates, handshake gate, reload.

`ServerTLS` is built from a ``[frontend.X.tls]`` table. It is an
``IOpenSSLServerConnectionCreator``, so it works both with
``TLSMemoryBIOFactory(server_tls, False, factory)`` (a TLS-only listener, see
`wrap`) and with ``transport.startTLS(server_tls)`` (TLS negotiated inside
another protocol, e.g. PostgreSQL's SSLRequest). ``reload()`` re-reads the
certificate files; new handshakes use the new certificates, connections already
made keep the context they were made with.

We build ``SSL.Context`` objects ourselves instead of using Twisted's
``CertificateOptions`` because we need things it does not expose: the same
session id context on every certificate's context (so SNI switching and reload
do not break resumption), ``OP_NO_RENEGOTIATION``, session tickets together
with a server session cache, and a context set that is swapped whole on reload.

`TLSClientProtocol` is the data path's client protocol for a TLS frontend: the
session is counted (caps) from the TCP accept, but the backend connection is
opened only once the handshake has succeeded (`IHandshakeListener`), so a
refused or unfinished handshake never reaches a server or takes a pool slot;
``handshake_timeout`` closes clients that never finish. TLS has no half-close:
when the server sends its FIN, the TLS side is flushed and closed with
close_notify (`Session.server_eof`), and the linger timer aborts it if the
client does not read.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from l4lb.config import FrontendTLSConfig
from l4lb.proxy import ClientProtocol, Session, _tune
from l4lb.tls.certificates import (
    MOZILLA_INTERMEDIATE,
    CertificateError,
    LoadedCertificate,
    expiry_warning,
    load_ca_certificates,
    load_certificate,
    select_certificate,
)
from l4lb.tls.fastbio import TerminatingTLSFactory, TerminatingTLSProtocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall
    from twisted.protocols.tls import TLSMemoryBIOProtocol

__all__ = [
    "ServerTLS",
    "TLSClientProtocol",
    "client_subject",
    "connection_fields",
]

log = structlog.get_logger("l4lb.tls")

_MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

_OPTIONS = (
    SSL.OP_NO_COMPRESSION  # CRIME
    | SSL.OP_NO_RENEGOTIATION  # no client-initiated renegotiation (TLS 1.2)
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_SINGLE_DH_USE
    | SSL.OP_SINGLE_ECDH_USE
)


class _Generation:
    """One load of the certificate files: a context per certificate, SNI-linked."""

    def __init__(
        self,
        config: FrontendTLSConfig,
        where: str,
        session_id: bytes,
        now: datetime.datetime | None = None,
    ) -> None:
        self.certificates: tuple[LoadedCertificate, ...] = tuple(
            load_certificate(entry, f"{where}.certificates[{index}]", now)
            for index, entry in enumerate(config.certificates)
        )
        if config.client_ca is not None:
            load_ca_certificates(config.client_ca, f"{where}.client_ca")
        self.contexts: tuple[SSL.Context, ...] = tuple(
            self._context(config, certificate, session_id)
            for certificate in self.certificates
        )
        self._names = [certificate.names for certificate in self.certificates]

    def _context(
        self,
        config: FrontendTLSConfig,
        certificate: LoadedCertificate,
        session_id: bytes,
    ) -> SSL.Context:
        try:
            ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
            ctx.set_min_proto_version(_MIN_VERSIONS[config.min_version])
            ctx.set_options(_OPTIONS)
            ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
            ctx.use_certificate(certificate.leaf)
            for extra in certificate.chain[1:]:
                ctx.add_extra_chain_cert(extra)
            ctx.use_privatekey(certificate.key)  # type: ignore[arg-type]
            ctx.check_privatekey()
            ctx.set_cipher_list((config.ciphers or MOZILLA_INTERMEDIATE).encode())
            # Resumption: a server-side session cache (TLS 1.2 session ids) and
            # tickets (OpenSSL's default); one id context for every certificate.
            ctx.set_session_id(session_id)
            ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
            if config.client_ca is not None:
                # Files already parsed by load_ca_certificates (clear errors);
                # OpenSSL reads them again for the trust store and the list of
                # CA names sent in the CertificateRequest.
                ctx.load_verify_locations(config.client_ca)
                ctx.load_client_ca(config.client_ca.encode())
                mode = SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE
                if config.client_auth == "required":
                    mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
                ctx.set_verify(mode)
            if config.alpn:
                ctx.set_alpn_select_callback(_alpn_selector(config.alpn))
            if len(self.certificates) > 1:  # one certificate: nothing to choose
                ctx.set_tlsext_servername_callback(self._server_name)
        except SSL.Error as error:
            raise CertificateError(
                certificate.where, f"OpenSSL refused it: {_ssl_reasons(error)}"
            ) from None
        return ctx

    @property
    def default(self) -> SSL.Context:
        return self.contexts[0]

    def _server_name(self, connection: SSL.Connection) -> None:
        """OpenSSL's SNI callback: switch to the matching certificate's context."""
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        index = select_certificate(self._names, name)
        if index:
            connection.set_context(self.contexts[index])


def _alpn_selector(offers: Sequence[str]) -> Any:
    """Our preference order; no overlap continues without ALPN (as HAProxy does)."""
    wanted = [name.encode() for name in offers]

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        for name in wanted:
            if name in offered:
                return name
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def _ssl_reasons(error: BaseException) -> str:
    """The reason strings of an OpenSSL error queue, or the error's text."""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        reasons = [
            str(entry[2]) for entry in args[0] if isinstance(entry, tuple) and entry
        ]
        if reasons:
            return "; ".join(reasons)
    return str(error) or type(error).__name__


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The TLS server side of one frontend; raises CertificateError on bad files."""

    def __init__(
        self,
        config: FrontendTLSConfig,
        where: str,
        now: datetime.datetime | None = None,
    ) -> None:
        self.config = config
        self.where = where  # key path of the table, e.g. frontend.pg.tls
        # Stable across reloads and processes, different per frontend.
        self._session_id = hashlib.sha256(where.encode()).hexdigest()[:32].encode()
        self._generation = _Generation(config, where, self._session_id, now)

    @property
    def certificates(self) -> tuple[LoadedCertificate, ...]:
        """The certificates new handshakes use (the first is the default)."""
        return self._generation.certificates

    def serverConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        """A connection on the current default context; SNI may switch it."""
        connection = SSL.Connection(self._generation.default, None)
        connection.set_app_data(tlsProtocol)
        return connection

    def wrap(self, factory: IProtocolFactory) -> TerminatingTLSFactory:
        """``factory`` behind TLS, for a listener that speaks TLS from the first byte."""
        return TerminatingTLSFactory(self, False, factory)

    def reload(self) -> bool:
        """Re-read the files; on any problem keep the old ones and log why."""
        try:
            generation = _Generation(self.config, self.where, self._session_id)
        except CertificateError as error:
            log.error(
                "tls reload failed, keeping the old certificates",
                tls=self.where,
                key=error.key,
                error=error.message,
            )
            return False
        self._generation = generation
        log.info(
            "tls certificates reloaded",
            tls=self.where,
            certificates=[
                {"cert": c.config.cert, "names": list(c.names), "expires": _iso(c)}
                for c in generation.certificates
            ],
        )
        for certificate in generation.certificates:
            warning = expiry_warning(certificate)
            if warning is not None:
                log.warning(
                    "certificate expires soon",
                    key=f"{certificate.where}.cert",
                    error=warning,
                )
        return True


def _iso(certificate: LoadedCertificate) -> str:
    return certificate.not_after.isoformat()


def client_subject(connection: SSL.Connection) -> str | None:
    """The verified client certificate's subject (RFC 4514), or None without one."""
    cert = connection.get_peer_certificate(as_cryptography=True)
    return cert.subject.rfc4514_string() if cert is not None else None


def connection_fields(connection: SSL.Connection) -> dict[str, str]:
    """Log fields of a finished handshake: version, cipher, SNI, ALPN, client subject."""
    fields: dict[str, str] = {}
    version = connection.get_protocol_version_name()
    cipher = connection.get_cipher_name()
    if version:
        fields["tls_version"] = version
    if cipher:
        fields["tls_cipher"] = cipher
    sni = connection.get_servername()
    if sni:
        fields["tls_sni"] = sni.decode("ascii", "replace")
    alpn = connection.get_alpn_proto_negotiated()
    if alpn:
        fields["tls_alpn"] = alpn.decode("ascii", "replace")
    subject = client_subject(connection)
    if subject is not None:
        fields["tls_client_subject"] = subject
    return fields


def describe_handshake_failure(reason: Failure | None) -> str:
    """Why a handshake did not finish, for the connection's log line."""
    if reason is not None and isinstance(reason.value, SSL.Error):
        return _ssl_reasons(reason.value)
    return "client closed the connection"


@implementer(IHandshakeListener)
class TLSClientProtocol(ClientProtocol):
    """A client of a TLS frontend: connect to a server only after the handshake."""

    can_half_close = False  # TLS: close with close_notify instead of a FIN
    _handshake_timer: IDelayedCall | None = None
    _handshake_done = False

    def connectionMade(self) -> None:
        # Not paused: the handshake must be read. Counted at once (caps).
        if not self.frontend.listener_tuned:  # else inherited from the listener
            _tune(self.transport)
        self.session = Session(self.frontend, self)
        self.session.start(connect=False)
        timeout = self.frontend.config.tls.handshake_timeout  # type: ignore[union-attr]
        if timeout > 0:
            self._handshake_timer = self.frontend.clock.callLater(
                timeout, self._handshake_timed_out
            )

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        self._cancel_timer()
        self.session.log_fields.update(
            connection_fields(self.transport.getHandle())  # type: ignore[attr-defined]
        )
        if not isinstance(self.transport, TerminatingTLSProtocol):
            self.handshakeSettled()
        # else: TerminatingTLSProtocol reads once more, then handshakeSettled
        # (in this same call: nothing else reads in between).

    def handshakeSettled(self) -> None:
        """The rest of the client's handshake flight is read: connect, unless it left.

        A client that closed straight after its handshake (close_notify,
        FIN or reset with the Finished or in the next read) never reaches a
        server: TerminatingTLSProtocol does not call this then, and the
        session ends in ``connectionLost``. Pausing only here spares such a
        client two ``epoll_ctl`` calls.
        """
        if not self.session._client_gone:
            self.transport.pauseProducing()  # read no more until a server is connected
            self.session.connect_now()

    def dataReceived(self, data: bytes) -> None:
        if self.session.server is None:
            # Application bytes decrypted from the same read as the client's
            # last handshake flight (TLS 1.3 clients send both at once). The
            # transport is paused, so this is at most one socket read; the
            # splice passes it on first (counted then).
            self.early += data
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_timer()
        if not self._handshake_done:
            self.session._set_reason(
                "handshake failed", describe_handshake_failure(reason)
            )
        super().connectionLost(reason)

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        self.session.close("handshake timeout", abort=True)

    def _cancel_timer(self) -> None:
        if self._handshake_timer is not None:
            timer, self._handshake_timer = self._handshake_timer, None
            if timer.active():
                timer.cancel()
