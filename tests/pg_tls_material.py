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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.ssl import CertificateOptions, TLSVersion

ALPN = [b"postgresql"]


class PgTLSFiles(NamedTuple):
    """Paths of the generated PEM files."""

    ca: Path  # the CA certificate: sslrootcert / -CAfile
    cert: Path  # server certificate (leaf, then the CA: a chain file)
    key: Path  # server private key


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l4lb tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_material(
    directory: Path,
    names: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1", "::1"),
) -> PgTLSFiles:
    """Write a CA and a server certificate whose SAN holds ``names`` and ``ips``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("l4lb test CA"))
        .issuer_name(_name("l4lb test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(n) for n in names] + [
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = PgTLSFiles(
        ca=directory / "pg-test-ca.pem",
        cert=directory / "pg-test-server.pem",
        key=directory / "pg-test-server.key",
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    files.key.write_bytes(_pem_key(key))
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
