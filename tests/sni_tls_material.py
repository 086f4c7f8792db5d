"""Test-only TLS material for SNI routing and backend TLS, made at test time.

A small CA issues server certificates (SAN names, wildcards, IP addresses) and
client certificates with `cryptography`; nothing here is ever committed. EC
P-256 keys keep generation fast. `Issued.write` puts PEM files where a config
can name them; `server_options` makes Twisted server TLS options from them.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl

_PEM = serialization.Encoding.PEM


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@attrs.frozen
class Issued:
    """A certificate and its key, as PEM bytes (the CA's cert appended as chain)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def cert_pem(self) -> bytes:
        return b"".join(c.public_bytes(_PEM) for c in (self.cert, *self.chain))

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            _PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, name: str) -> tuple[str, str]:
        """Write ``name``.pem and ``name``.key; returns their paths."""
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return str(cert), str(key)

    def private_certificate(self) -> ssl.PrivateCertificate:
        return ssl.PrivateCertificate.loadPEM(self.cert_pem + self.key_pem)


class CA:
    """A throwaway certificate authority."""

    def __init__(self, name: str = "l4lb test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
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
                True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(_PEM)

    def write(self, directory: Path, name: str = "ca") -> str:
        path = directory / f"{name}.pem"
        path.write_bytes(self.cert_pem)
        return str(path)

    def issue(self, *names: str, client: bool = False) -> Issued:
        """A leaf for DNS names / IP literals (server) or a client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        common = names[0] if names else "l4lb test client"
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        usage = (
            ExtendedKeyUsageOID.CLIENT_AUTH
            if client
            else ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(x509.ExtendedKeyUsage([usage]), False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key, (self.cert,))

    def twisted_cert(self) -> ssl.Certificate:
        return ssl.Certificate.loadPEM(self.cert_pem)


def server_options(
    issued: Issued, client_ca: CA | None = None
) -> ssl.CertificateOptions:
    """Twisted server TLS options; with ``client_ca``, a client cert is required."""
    private = issued.private_certificate()
    extra: dict[str, object] = {}
    if client_ca is not None:
        extra.update(
            verify=True,
            caCerts=[client_ca.twisted_cert().original],
            requireCertificate=True,
        )
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        **extra,  # type: ignore[arg-type]
    )


def peer_common_name(transport: object) -> str:
    """The common name of the certificate the other end of a TLS transport showed."""
    cert = transport.getPeerCertificate()  # type: ignore[attr-defined]
    assert cert is not None
    subject = cert.to_cryptography().subject
    return subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


__all__ = ["CA", "Issued", "peer_common_name", "server_options"]
