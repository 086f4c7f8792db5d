"""The tls check against local TLS servers with certificates made at test time.

Also shows the rule for pools with backend TLS: the endpoint a check gets is
already TLS (``wrapClientTLS``), the tls check then waits for that handshake
instead of starting its own, and the other check types run their exchange
through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import wrapClientTLS

from l4lb.config import CheckStep, HealthConfig
from tests import tls_lab
from tests.checkpeers import Fake, endpoint, lab, run_check, run_on_fake
from tests.loopback import Backend, Lab
from tests.tls_material import CA, TLSMaterial

__all__ = ["lab"]

NAME = "db.l4lb.test"


class PKI:
    """A CA, a server certificate it signed, and an unrelated CA, as files."""

    def __init__(self, tmp_path: Path) -> None:
        material = TLSMaterial(tmp_path)
        self.ca_pem = material.ca.cert_pem
        self.ca_path = material.ca.cert_path
        self.server = material.server("server", NAME)
        self.other_ca_path = CA("some other CA").write(tmp_path, "other")

    def server_options(self) -> ssl.CertificateOptions:
        return self.server.private_certificate().options()


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path)


def tls_backend(lab: Lab, pki: PKI, script: Any = None) -> Backend:
    """A TLS server on 127.0.0.1 whose connections run ``script`` (or stay open)."""

    async def idle(fake: Fake) -> None:
        pass

    return tls_lab.tls_backend(lab, pki.server, lambda: Fake(script or idle, lab))


class TestHandshake:
    """A handshake, with and without certificate verification."""

    @pytest_twisted.ensureDeferred
    async def test_unverified(self, lab: Any, pki: PKI) -> None:
        """Without verify any certificate will do."""
        backend = tls_backend(lab, pki)
        result = await run_on_fake(lab, backend, HealthConfig(type="tls"))
        assert result.ok
        assert result.reason.startswith("TLS handshake completed (TLSv1.")

    @pytest_twisted.ensureDeferred
    async def test_verified(self, lab: Any, pki: PKI) -> None:
        """A chain to ``ca`` and a matching ``server_name`` pass."""
        backend = tls_backend(lab, pki)
        config = HealthConfig(
            type="tls", verify=True, ca=str(pki.ca_path), server_name=NAME
        )
        result = await run_on_fake(lab, backend, config)
        assert result.ok
        assert result.reason.endswith(f"certificate valid for {NAME}")

    @pytest_twisted.ensureDeferred
    async def test_verified_by_ip(self, lab: Any, pki: PKI) -> None:
        """Without server_name the certificate must name the server's IP address."""
        backend = tls_backend(lab, pki)
        config = HealthConfig(type="tls", verify=True, ca=str(pki.ca_path))
        result = await run_on_fake(lab, backend, config)
        assert result.ok, result.reason

    @pytest_twisted.ensureDeferred
    async def test_wrong_name(self, lab: Any, pki: PKI) -> None:
        """A certificate for another name fails, saying so."""
        backend = tls_backend(lab, pki)
        config = HealthConfig(
            type="tls", verify=True, ca=str(pki.ca_path), server_name="other.l4lb.test"
        )
        result = await run_on_fake(lab, backend, config)
        assert not result.ok
        assert result.reason.startswith(
            "TLS certificate does not match the server name"
        )
        assert "other.l4lb.test" in result.reason

    @pytest_twisted.ensureDeferred
    async def test_unknown_ca(self, lab: Any, pki: PKI) -> None:
        """A chain to a CA that is not trusted fails, saying so."""
        backend = tls_backend(lab, pki)
        config = HealthConfig(
            type="tls", verify=True, ca=str(pki.other_ca_path), server_name=NAME
        )
        result = await run_on_fake(lab, backend, config)
        assert not result.ok
        assert "certificate verify failed" in result.reason

    @pytest_twisted.ensureDeferred
    async def test_missing_ca_file(self, lab: Any, pki: PKI, tmp_path: Path) -> None:
        """An unreadable ca file fails the probes with the reason, not the service."""
        backend = tls_backend(lab, pki)
        config = HealthConfig(type="tls", verify=True, ca=str(tmp_path / "nope.pem"))
        result = await run_on_fake(lab, backend, config)
        assert not result.ok
        assert result.reason.startswith("cannot load ca ")

    @pytest_twisted.ensureDeferred
    async def test_plain_server(self, lab: Any) -> None:
        """A server that does not speak TLS fails the handshake."""
        from tests.checkpeers import fake_server

        async def script(fake: Fake) -> None:
            await fake.take(1)
            fake.write(b"-ERR wrong protocol\r\n")
            fake.transport.loseConnection()

        result = await run_on_fake(
            lab, fake_server(lab, script), HealthConfig(type="tls")
        )
        assert not result.ok
        assert result.reason.startswith("TLS handshake failed") or (
            "during the TLS handshake" in result.reason
        )


class TestBackendTLS:
    """With the pool's backend TLS the endpoint is TLS already."""

    def wrapped(self, pki: PKI, backend: Backend, name: str = NAME) -> Any:
        trust = ssl.Certificate.loadPEM(pki.ca_pem)
        options = ssl.optionsForClientTLS(name, trustRoot=trust)
        return wrapClientTLS(options, endpoint(backend.port.getHost().port))

    @pytest_twisted.ensureDeferred
    async def test_tls_check_uses_the_pool_layer(self, lab: Any, pki: PKI) -> None:
        """The tls check does not add a second layer; the pool's handshake is the check."""
        backend = tls_backend(lab, pki)
        result = await run_on_fake(
            lab, backend, HealthConfig(type="tls"), self.wrapped(pki, backend)
        )
        assert result.ok
        assert result.reason.startswith("backend TLS handshake completed")

    @pytest_twisted.ensureDeferred
    async def test_pool_verification_failure(self, lab: Any, pki: PKI) -> None:
        """The pool's own verification failing is the check's reason."""
        backend = tls_backend(lab, pki)
        ep = self.wrapped(pki, backend, name="wrong.l4lb.test")
        result = await run_on_fake(lab, backend, HealthConfig(type="tls"), ep)
        assert not result.ok
        assert result.reason.startswith("TLS certificate does not match")

    @pytest_twisted.ensureDeferred
    async def test_send_expect_over_backend_tls(self, lab: Any, pki: PKI) -> None:
        """Other check types run their exchange inside the pool's TLS."""

        async def pong(fake: Fake) -> None:
            assert await fake.take(6) == b"PING\r\n"
            fake.write(b"+PONG\r\n")

        backend = tls_backend(lab, pki, pong)
        config = HealthConfig(
            type="send-expect", steps=(CheckStep(send=b"PING\r\n", expect=b"+PONG"),)
        )
        result = await run_on_fake(lab, backend, config, self.wrapped(pki, backend))
        assert (result.ok, result.reason) == (True, "1 step(s) matched")

    @pytest_twisted.ensureDeferred
    async def test_http_over_backend_tls(self, lab: Any, pki: PKI) -> None:
        """The http check speaks HTTPS when the pool's endpoint is TLS."""
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        class Primary(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                request.setResponseCode(200 if request.path == b"/primary" else 503)
                return b"{}"

        site = Site(Primary())
        site.noisy = False
        port = reactor.listenSSL(0, site, pki.server_options(), interface="127.0.0.1")
        try:
            trust = ssl.Certificate.loadPEM(pki.ca_pem)
            ep = wrapClientTLS(
                ssl.optionsForClientTLS(NAME, trustRoot=trust),
                endpoint(port.getHost().port),
            )
            result = await run_check(HealthConfig(type="http", path="/primary"), ep)
            assert (result.ok, result.reason) == (True, "HTTP status 200")
            result = await run_check(HealthConfig(type="http", path="/replica"), ep)
            assert (result.ok, result.reason) == (
                False,
                "HTTP status 503, expected 200",
            )
            await lab.until(
                lambda: (
                    not any(type(r).__name__ == "Server" for r in reactor.getReaders())
                ),
                5,
                "server channels closed",
            )
        finally:
            await port.stopListening()
