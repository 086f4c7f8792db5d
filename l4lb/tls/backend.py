"""TLS from l4lb to a pool's servers ([pool.X.tls]): verified re-encryption.

The pool's endpoint seam (`l4lb.service`) wraps each server's TCP endpoint in a
:class:`TLSClientEndpoint`. Twisted's ``wrapClientTLS`` would do the wrapping,
but its connect Deferred fires when TCP connects, before the handshake: a
server with a bad certificate would look connected, the session would splice
and the client would just see a close. Here connect fires only after the
handshake has succeeded (and the certificate has been verified), so a bad
certificate is a failed connect like a refused one: the session retries
another server and logs why, and it counts for health ``observe``.

Certificate and key files are read once, when the pool's :class:`BackendTLS`
is built at start; `check_backend_tls` runs the same loading for ``--check``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from l4lb.config import ConfigError, Problem
from l4lb.tls.certificates import (
    CertificateError,
    check_key_matches,
    load_chain,
    read_file,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime

    from l4lb.config import Config, PoolConfig, PoolTLSConfig
    from l4lb.pool import ServerState

log = structlog.get_logger("l4lb.tls")

# After a full close, how long the server gets to take our close_notify and
# the last bytes before the connection is aborted.
CLOSE_LINGER = 5.0


class TLSConnectError(error.ConnectError):
    """The TCP connection was made but the TLS handshake failed; says why in words."""

    def __init__(self, why: str) -> None:
        super().__init__(string=why)
        self.why = why

    def __str__(self) -> str:
        return self.why


# --------------------------------------------------------------------------
# Files, read once
# --------------------------------------------------------------------------


class _Material:
    """What a pool's [pool.X.tls] files hold, parsed; ``problems`` says what failed."""

    def __init__(self, tls: PoolTLSConfig, where: str) -> None:
        self.trust: Any = None
        self.client: PrivateCertificate | None = None
        self.chain: list[Any] = []
        self.problems: list[CertificateError] = []
        if tls.ca is not None:
            try:
                cas = load_chain(tls.ca, f"{where}.ca")
                self.trust = trustRootFromCertificates([_twisted_cert(c) for c in cas])
            except CertificateError as e:
                self.problems.append(e)
        if tls.cert is not None and tls.key is not None:
            try:
                self._client_certificate(tls.cert, tls.key, where)
            except CertificateError as e:
                self.problems.append(e)

    def _client_certificate(self, cert_path: str, key_path: str, where: str) -> None:
        certs: list[x509.Certificate] = []
        key_data: bytes | None = None
        try:
            certs = list(load_chain(cert_path, f"{where}.cert"))
        except CertificateError as e:
            self.problems.append(e)
        try:
            key_data = read_file(key_path, f"{where}.key")
        except CertificateError as e:
            self.problems.append(e)
        if not certs or key_data is None:
            return
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except TypeError:  # a password is needed
            raise CertificateError(
                f"{where}.key",
                f"{key_path!r} is encrypted; l4lb needs an unencrypted key",
            ) from None
        except ValueError:
            raise CertificateError(
                f"{where}.key", f"{key_path!r} holds no usable PEM private key"
            ) from None
        check_key_matches(certs[0], key, cert_path, key_path, f"{where}.key")
        self.client = PrivateCertificate.fromCertificateAndKeyPair(
            _twisted_cert(certs[0]), KeyPair(crypto.PKey.from_cryptography_key(key))
        )
        self.chain = [_twisted_cert(c).original for c in certs[1:]]


def _twisted_cert(cert: x509.Certificate) -> Certificate:
    return Certificate.loadPEM(cert.public_bytes(serialization.Encoding.PEM))


def _load(pool: PoolConfig) -> _Material:
    assert pool.tls is not None
    return _Material(pool.tls, f"pool.{pool.name}.tls")


def _problems(source: str, material: _Material) -> tuple[Problem, ...]:
    return tuple(Problem(source, e.key, e.message) for e in material.problems)


def check_backend_tls(config: Config) -> None:
    """Read every [pool.X.tls] file as start would; ConfigError lists what is wrong."""
    problems: list[Problem] = []
    for pool in config.pools:
        if pool.tls is not None:
            problems += _problems(config.source, _load(pool))
    if problems:
        raise ConfigError(tuple(problems))


# --------------------------------------------------------------------------
# Per pool: one connection creator per server name
# --------------------------------------------------------------------------


class BackendTLS:
    """A pool's TLS settings at run time: wraps its servers' endpoints."""

    def __init__(self, pool: PoolConfig, clock: IReactorTime) -> None:
        assert pool.tls is not None
        self.tls = pool.tls
        self.pool_name = pool.name
        self.clock = clock
        self.material = _load(pool)
        if self.material.problems:  # the files changed since --check or start
            raise ConfigError(_problems("<start>", self.material))
        self._creators: dict[str, Any] = {}
        if not self.tls.verify:
            log.warning(
                "TLS to the servers is not verified",
                pool=pool.name,
                effect="traffic is encrypted, but anyone on the path can"
                " impersonate the servers",
                fix=f"set verify = true (and ca) in [pool.{pool.name}.tls]",
            )

    def server_name(self, server: ServerState) -> str:
        """The name verified and sent as SNI: ``server_name``, else the host."""
        address = server.config.address
        name = self.tls.server_name or address.host
        return name or "localhost"  # unix socket without verify: any name

    def creator(self, server: ServerState) -> Any:
        name = self.server_name(server)
        if name not in self._creators:
            self._creators[name] = self._make_creator(name)
        return self._creators[name]

    def _make_creator(self, name: str) -> Any:
        material = self.material
        extra: dict[str, Any] = {}
        if material.chain:
            extra["extraCertChain"] = material.chain
        if self.tls.verify:
            return optionsForClientTLS(
                name,
                trustRoot=material.trust or platformTrust(),
                clientCertificate=material.client,
                extraCertificateOptions=extra,
            )
        if material.client is not None:
            extra["privateKey"] = material.client.privateKey.original
            extra["certificate"] = material.client.original
        return _UnverifiedCreator(name, CertificateOptions(verify=False, **extra))

    def wrap(
        self, server: ServerState, endpoint: IStreamClientEndpoint
    ) -> IStreamClientEndpoint:
        """``endpoint`` with TLS on top; connect fires after the handshake."""
        return TLSClientEndpoint(endpoint, self.creator(server), self.clock)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    """Encrypts without checking the server (verify = false); still sends SNI.

    ``optionsForClientTLS`` always verifies, and a bare ``CertificateOptions``
    sends no server name, which some servers need to pick a certificate.
    """

    def __init__(self, name: str, options: CertificateOptions) -> None:
        self._name = name
        self._context = options.getContext()  # made once, shared

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if not _is_ip(self._name):
            connection.set_tlsext_host_name(self._name.encode("idna"))
        connection.set_connect_state()
        return connection


def _is_ip(name: str) -> bool:
    from ipaddress import ip_address

    try:
        ip_address(name)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------
# The endpoint: connect = TCP connect + TLS handshake
# --------------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """Connects through ``endpoint``, then runs the TLS handshake before firing."""

    def __init__(
        self, endpoint: IStreamClientEndpoint, creator: Any, clock: IReactorTime
    ) -> None:
        self.endpoint = endpoint
        self.creator = creator
        self.clock = clock

    def connect(self, factory: Any) -> Deferred[Any]:
        tcp: list[Deferred[Any]] = []
        tls: list[Any] = []

        def cancel(_: Deferred[Any]) -> None:
            if tcp and not tcp[0].called:
                tcp[0].cancel()
            for protocol in tls:
                protocol.abortConnection()

        handshake: Deferred[Any] = Deferred(cancel)
        gate_factory = _GateFactory(factory, handshake)
        tls_factory = _BackendTLSFactory(self.creator, gate_factory, self.clock)
        connecting = self.endpoint.connect(tls_factory)
        tcp.append(connecting)

        def connected(protocol: Any) -> None:
            # The endpoint fires with the TLS protocol the factory built.
            tls.append(protocol)

        def failed(failure: Failure) -> None:
            if not handshake.called:
                handshake.errback(failure)

        connecting.addCallbacks(connected, failed)
        return handshake


class _GateFactory(Factory):
    noisy = False

    def __init__(self, factory: Any, handshake: Deferred[Any]) -> None:
        self.factory = factory
        self.handshake = handshake

    def buildProtocol(self, addr: IAddress) -> _HandshakeGate:
        return _HandshakeGate(self.factory, addr, self.handshake)


@implementer(IHandshakeListener)
class _HandshakeGate(Protocol):
    """Stands in for the real protocol until the handshake is done.

    Then it hands the TLS transport to a protocol built by the caller's
    factory and steps out of the data path (``wrappedProtocol`` is swapped),
    so it costs nothing per byte.
    """

    def __init__(self, factory: Any, addr: IAddress, handshake: Deferred[Any]) -> None:
        self.inner_factory = factory
        self.addr = addr
        self.handshake = handshake

    def handshakeCompleted(self) -> None:
        tls = self.transport
        # A failed name check aborts the connection and still reports the
        # handshake done; connectionLost follows with the reason.
        if tls.disconnecting or self.handshake.called:
            return
        inner = self.inner_factory.buildProtocol(self.addr)
        tls.wrappedProtocol = inner
        inner.makeConnection(tls)
        self.handshake.callback(inner)

    def dataReceived(self, data: bytes) -> None:
        """Nothing arrives before the handshake is done."""

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.handshake.called:
            self.handshake.errback(
                Failure(TLSConnectError(describe_tls_failure(reason)))
            )


def describe_tls_failure(reason: Failure | None) -> str:
    """Why a TLS handshake with a server failed, in words for the log."""
    if reason is None:
        return "TLS handshake failed"
    value = reason.value
    name = type(value).__name__
    if name in ("VerificationError", "CertificateError"):
        wanted = [
            getattr(mismatch.mismatched_id, "hostname", None)
            or getattr(mismatch.mismatched_id, "ip", None)
            for mismatch in getattr(value, "errors", ())
            if hasattr(mismatch, "mismatched_id")
        ]
        names = ", ".join(
            repr(w.decode() if isinstance(w, bytes) else str(w)) for w in wanted
        )
        what = f"the certificate is not valid for {names}" if names else str(value)
        return f"TLS certificate verification failed: {what}"
    if isinstance(value, SSL.Error):
        texts = []
        for item in (
            value.args[0] if value.args and isinstance(value.args[0], list) else []
        ):
            if isinstance(item, tuple) and item:
                texts.append(str(item[-1]))
        detail = "; ".join(texts) or str(value)
        if "certificate verify failed" in detail:
            detail += (
                " (the server certificate is not signed by a trusted CA,"
                " or is expired or not yet valid)"
            )
        return f"TLS handshake failed: {detail}"
    if isinstance(value, error.ConnectionDone | error.ConnectionLost):
        return "TLS handshake failed: the server closed the connection"
    return f"TLS handshake failed: {value}"


class _BackendTLSProtocol(BufferingTLSTransport):
    """The TLS transport of a server connection, with TLS's closing rules.

    TLS has no half-close. When the client half-closes, the session calls
    ``loseWriteConnection``: we send close_notify and keep reading, so a
    server that answers before closing is still heard (the session's
    half-closed timeout bounds the wait). A full close sends close_notify,
    closes TCP without waiting for the server's own close_notify, and aborts
    after :data:`CLOSE_LINGER` if even that does not finish.
    """

    _linger: IDelayedCall | None = None

    def loseWriteConnection(self) -> None:
        # Without this, ProtocolWrapper would hand the call to the TCP
        # transport and send a bare FIN under TLS.
        super().loseConnection()

    def loseConnection(self) -> None:
        super().loseConnection()
        # With a producer still registered, TLS sends close_notify only once
        # it is unregistered (the session unregisters before closing).
        if self.connected and self._producer is None:
            self.transport.loseConnection()
            if self._linger is None:
                self._linger = self.factory.clock.callLater(
                    CLOSE_LINGER, self._abort_lingering
                )

    def _abort_lingering(self) -> None:
        self._linger = None
        self.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._linger is not None:
            if self._linger.active():
                self._linger.cancel()
            self._linger = None
        super().connectionLost(reason)


class _BackendTLSFactory(TLSMemoryBIOFactory):
    protocol = _BackendTLSProtocol  # type: ignore[assignment]

    def __init__(self, creator: Any, wrapped: Factory, clock: IReactorTime) -> None:
        super().__init__(creator, True, wrapped, clock)
        self.clock = clock
