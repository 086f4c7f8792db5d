"""Test-only TLS material for the PostgreSQL STARTTLS tests, generated at test time.

A throwaway CA and a server certificate for ``localhost`` / ``127.0.0.1``
(what psql's ``sslmode=verify-full`` checks against the host it was given),
written as PEM files. No private key is committed; each test run makes new ones.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.ssl import CertificateOptions, TLSVersion

from tests.tls_material import _authority, _leaf, _name, now

ALPN = [b"postgresql"]


class PgTLSFiles(NamedTuple):
    """Paths of the generated PEM files."""

    ca: Path  # the CA certificate: sslrootcert / -CAfile
    cert: Path  # server certificate (leaf, then the CA: a chain file)
    key: Path  # server private key


def make_material(
    directory: Path,
    names: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1", "::1"),
) -> PgTLSFiles:
    """Write a CA and a server certificate whose SAN holds ``names`` and ``ips``."""
    start = now() - datetime.timedelta(hours=1)
    end = now() + datetime.timedelta(days=2)
    ca = _authority(_name("l4lb test CA"), start, end)
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    server = _leaf(
        ca, _name(names[0]), san, client=False, not_before=start, not_after=end
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = PgTLSFiles(
        ca=directory / "pg-test-ca.pem",
        cert=directory / "pg-test-server.pem",
        key=directory / "pg-test-server.key",
    )
    files.ca.write_bytes(ca.cert_pem)
    files.cert.write_bytes(server.cert_pem + ca.cert_pem)  # a chain file
    files.key.write_bytes(server.key_pem)
    files.key.chmod(0o600)  # libpq-style tools refuse group/world-readable keys
    return files


def server_creator(files: PgTLSFiles, alpn: list[bytes] | None = None) -> Any:
    """A server TLS context factory for ``transport.startTLS`` (Twisted's own options).

    Stands in for the creator the TLS termination module builds from
    ``[frontend.X.tls]``: TLS 1.2 minimum, ALPN ``postgresql`` offered.
    """
    return CertificateOptions(
        privateKey=serialization.load_pem_private_key(files.key.read_bytes(), None),
        certificate=x509.load_pem_x509_certificate(files.cert.read_bytes()),
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableProtocols=ALPN if alpn is None else alpn,
    )
