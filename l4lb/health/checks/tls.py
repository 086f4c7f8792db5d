"""The ``tls`` check: a full TLS handshake, optionally verifying the certificate.

With ``verify = true`` the chain must lead to ``ca`` (a PEM file of one or more
certificates, read when the check is built) or, without ``ca``, to the system
trust store, and the certificate must match ``server_name`` (or, without it,
the server's IP address); Twisted's ``optionsForClientTLS`` does both, with
``service_identity`` for the name. Without ``verify`` any certificate will do
(SNI is still sent when ``server_name`` is set): the check proves the server
completes a handshake.

When the pool has backend TLS (``[pool.X.tls]``), the endpoint the check gets
already speaks TLS: the check then does not start a second layer, it waits for
that handshake, so the pool's own verification settings decide. The check
closes with a TLS ``close_notify`` and a normal TCP close.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    ISSLTransport,
    ITLSTransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from l4lb.health.checks.conversation import (
    BadReplyError,
    Check,
    CheckResult,
    Conversation,
    describe_lost,
    probe,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from l4lb.config import HealthConfig


def load_trust_root(path: str) -> ssl.IOpenSSLTrustRoot:
    """The certificates of a PEM bundle as a Twisted trust root."""
    with open(path, "rb") as file:
        certificates = x509.load_pem_x509_certificates(file.read())
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]
    )


@implementer(IOpenSSLClientConnectionCreator)
@attrs.frozen
class _Unverified:
    """A client TLS connection that accepts any certificate, sending SNI if named.

    Twisted's ``optionsForClientTLS`` always verifies; this is the small rest.
    """

    server_name: str | None
    context: SSL.Context = attrs.field(
        factory=lambda: ssl.CertificateOptions().getContext()
    )

    def clientConnectionForTLS(self, tls: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tls)
        if self.server_name:
            connection.set_tlsext_host_name(self.server_name.encode("idna"))
        connection.set_connect_state()
        return connection


@implementer(IHandshakeListener)
class _Handshake(Conversation):
    """Starts TLS on a plain connection (or waits on an already-TLS one)."""

    def __init__(
        self, options_for: Callable[[str], IOpenSSLClientConnectionCreator]
    ) -> None:
        super().__init__()
        self._options_for = options_for
        self.started_tls = False
        self.done = False
        self._waiter: Deferred[None] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if ISSLTransport.providedBy(self.transport):
            return  # the pool's backend TLS is the layer under test
        if not ITLSTransport.providedBy(self.transport):
            self._break("this connection cannot start TLS")
            return
        self.started_tls = True
        self.transport.startTLS(self._options_for(self.transport.getPeer().host))

    def handshakeCompleted(self) -> None:
        self.done = True
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.callback(None)

    def handshake(self) -> Deferred[None]:
        """Fires when the handshake completes; fails with why it did not."""
        d: Deferred[None] = Deferred(self._cancel_handshake_wait)
        if self.done:
            d.callback(None)
        elif self.lost is not None:
            d.errback(BadReplyError(self._lost_in_handshake(self.lost)))
        else:
            self._waiter = d
        return d

    def _cancel_handshake_wait(self, d: Deferred[None]) -> None:
        if self._waiter is d:
            self._waiter = None
        self.abort()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(BadReplyError(self._lost_in_handshake(reason)))

    def _lost_in_handshake(self, reason: Failure) -> str:
        words = describe_lost(reason)
        if words.startswith("TLS"):
            return words
        return f"{words} during the TLS handshake"


def tls_check(config: HealthConfig, clock: IReactorTime) -> Check:
    """Success is a completed TLS handshake (verified when ``verify`` is set)."""
    trust_root, problem = None, None
    if config.verify and config.ca:
        try:
            trust_root = load_trust_root(config.ca)
        except (OSError, ValueError) as error:
            problem = f"cannot load ca {config.ca}: {error}"
    cache: dict[str, IOpenSSLClientConnectionCreator] = {}

    def options_for(peer_host: str) -> IOpenSSLClientConnectionCreator:
        name = config.server_name or peer_host
        if name not in cache:
            if config.verify:
                cache[name] = ssl.optionsForClientTLS(name, trustRoot=trust_root)
            else:
                cache[name] = _Unverified(config.server_name)
        return cache[name]

    async def exchange(conv: Conversation) -> CheckResult:
        assert isinstance(conv, _Handshake)
        if problem is not None:
            return CheckResult(False, problem)
        await conv.handshake()
        version = conv.transport.getHandle().get_protocol_version_name()
        if not conv.started_tls:
            return CheckResult(True, f"backend TLS handshake completed ({version})")
        if config.verify:
            name = config.server_name or conv.transport.getPeer().host
            return CheckResult(
                True,
                f"TLS handshake completed ({version}), certificate valid for {name}",
            )
        return CheckResult(True, f"TLS handshake completed ({version})")

    def check(endpoint: IStreamClientEndpoint) -> Deferred[CheckResult]:
        return probe(endpoint, exchange, _Handshake(options_for))

    return check
