"""Test-only TLS material generated at test time with ``cryptography``.

TEST KEYS ONLY: every key here is made fresh in memory for one test run and
written to the test's temporary directory; nothing is committed.

`TLSMaterial(directory)` makes a small PKI: a server CA, a separate client CA,
and helpers to issue server certificates (SAN DNS names, wildcards, IP
addresses, chosen validity), client certificates, and to write any of them as
PEM files. Keys are ECDSA P-256 (fast to generate). Self-contained on purpose:
the other TLS test modules (PostgreSQL STARTTLS, SNI passthrough, backend TLS)
import it too.
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

__all__ = ["Issued", "TLSMaterial", "now"]


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l4lb tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@attrs.frozen
class Issued:
    """A certificate and its key, and where they were written (if they were)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path | None = None
    key_path: Path | None = None
    chain: tuple[x509.Certificate, ...] = ()  # issuer certificates written after it

    @property
    def cert_pem(self) -> bytes:
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.chain)
        )

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()

    def toml(self) -> str:
        """An inline table for a ``certificates`` array."""
        return f'{{ cert = "{self.cert_path}", key = "{self.key_path}" }}'


class TLSMaterial:
    """A throwaway PKI in ``directory``: ``ca`` signs servers, ``client_ca`` clients."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = self._authority("l4lb test server CA", "ca")
        self.client_ca = self._authority("l4lb test client CA", "client-ca")

    def _authority(self, common_name: str, stem: str) -> Issued:
        key = _key()
        start = now() - datetime.timedelta(days=1)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=3650))
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
            )
            .sign(key, hashes.SHA256())
        )
        return self.write(Issued(cert, key), stem)

    def _issue(
        self,
        issuer: Issued,
        common_name: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        san: bool = True,
        client: bool = False,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Issued:
        key = key or _key()
        start = not_before or now() - datetime.timedelta(days=1)
        end = not_after or now() + datetime.timedelta(days=365)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(issuer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        ExtendedKeyUsageOID.CLIENT_AUTH
                        if client
                        else ExtendedKeyUsageOID.SERVER_AUTH
                    ]
                ),
                False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    issuer.key.public_key()
                ),
                False,
            )
        )
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if san and names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        return Issued(builder.sign(issuer.key, hashes.SHA256()), key)

    def server(
        self,
        stem: str,
        *names: str,
        ips: tuple[str, ...] = ("127.0.0.1",),
        common_name: str | None = None,
        san: bool = True,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Issued:
        """A server certificate for DNS ``names`` (and ``ips``), written as ``stem``."""
        issued = self._issue(
            self.ca,
            common_name or (names[0] if names else stem),
            dns=names,
            ips=ips,
            san=san,
            not_before=not_before,
            not_after=not_after,
            key=key,
        )
        return self.write(issued, stem)

    def expired(self, stem: str, *names: str) -> Issued:
        """A server certificate that expired yesterday."""
        return self.server(
            stem,
            *names,
            not_before=now() - datetime.timedelta(days=30),
            not_after=now() - datetime.timedelta(days=1),
        )

    def expiring(self, stem: str, *names: str, days: float = 3) -> Issued:
        """A server certificate that expires in ``days`` days."""
        return self.server(
            stem, *names, not_after=now() + datetime.timedelta(days=days)
        )

    def client(self, stem: str, common_name: str) -> Issued:
        """A client certificate signed by ``client_ca``."""
        return self.write(self._issue(self.client_ca, common_name, client=True), stem)

    def rogue_client(self, stem: str, common_name: str) -> Issued:
        """A client certificate signed by the server CA (not trusted for clients)."""
        return self.write(self._issue(self.ca, common_name, client=True), stem)

    def write(self, issued: Issued, stem: str) -> Issued:
        """Write ``stem``.pem (the certificate) and ``stem``.key; return with paths."""
        cert_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}.key"
        cert_path.write_bytes(issued.cert_pem)
        key_path.write_bytes(issued.key_pem)
        key_path.chmod(0o600)
        return attrs.evolve(issued, cert_path=cert_path, key_path=key_path)
