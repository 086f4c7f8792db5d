"""Test-only TLS material generated at test time with ``cryptography``.

TEST KEYS ONLY: every key here is made fresh in memory for one test run and
written to the test's temporary directory; nothing is committed.

`TLSMaterial(directory)` makes a small PKI: a server CA, a separate client CA,
and helpers to issue server certificates (SAN DNS names, wildcards, IP
addresses, chosen validity), client certificates, and to write any of them as
PEM files. Keys are ECDSA P-256 (fast to generate).

`CA(name)` is the smaller interface the SNI-routing and backend-TLS tests use:
one authority whose `issue(*names)` makes leaves carrying the CA as their
chain, `Issued.write(directory, name)` to put them where a config can name
them, and `server_options`/`peer_common_name` for Twisted TLS peers. Both
build certificates with the same `_authority` and `_leaf`, so every TLS test
module (termination, SNI passthrough, backend TLS, the tls check) shares one
implementation.
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

__all__ = ["CA", "Issued", "TLSMaterial", "now", "peer_common_name", "server_options"]


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

    def write(self, directory: Path, name: str) -> tuple[str, str]:
        """Write ``name``.pem and ``name``.key; returns their paths."""
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return str(cert), str(key)

    def private_certificate(self) -> ssl.PrivateCertificate:
        return ssl.PrivateCertificate.loadPEM(self.cert_pem + self.key_pem)


def _authority(
    subject: x509.Name, not_before: datetime.datetime, not_after: datetime.datetime
) -> Issued:
    """A self-signed CA certificate that may sign certificates and CRLs."""
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
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
    return Issued(cert, key)


def _leaf(
    issuer: Issued,
    subject: x509.Name,
    names: list[x509.GeneralName],
    *,
    client: bool,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> Issued:
    """A server (or ``client``) certificate signed by ``issuer``; SAN = ``names``."""
    key = key or _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
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
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return Issued(builder.sign(issuer.key, hashes.SHA256()), key)


class TLSMaterial:
    """A throwaway PKI in ``directory``: ``ca`` signs servers, ``client_ca`` clients."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = self._authority("l4lb test server CA", "ca")
        self.client_ca = self._authority("l4lb test client CA", "client-ca")

    def _authority(self, common_name: str, stem: str) -> Issued:
        start = now() - datetime.timedelta(days=1)
        issued = _authority(
            _name(common_name), start, start + datetime.timedelta(days=3650)
        )
        return self.write(issued, stem)

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
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        return _leaf(
            issuer,
            _name(common_name),
            names if san else [],
            client=client,
            not_before=not_before or now() - datetime.timedelta(days=1),
            not_after=not_after or now() + datetime.timedelta(days=365),
            key=key,
        )

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
        cert_path, key_path = map(Path, issued.write(self.directory, stem))
        key_path.chmod(0o600)
        return attrs.evolve(issued, cert_path=cert_path, key_path=key_path)


class CA:
    """A throwaway certificate authority whose leaves carry it as their chain."""

    def __init__(self, name: str = "l4lb test CA") -> None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.authority = _authority(
            subject,
            now() - datetime.timedelta(days=1),
            now() + datetime.timedelta(days=30),
        )
        self.key = self.authority.key
        self.cert = self.authority.cert

    @property
    def cert_pem(self) -> bytes:
        return self.authority.cert_pem

    def write(self, directory: Path, name: str = "ca") -> str:
        path = directory / f"{name}.pem"
        path.write_bytes(self.cert_pem)
        return str(path)

    def issue(self, *names: str, client: bool = False) -> Issued:
        """A leaf for DNS names / IP literals (server) or a client certificate."""
        common = names[0] if names else "l4lb test client"
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        leaf = _leaf(
            self.authority,
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]),
            alt,
            client=client,
            not_before=now() - datetime.timedelta(days=1),
            not_after=now() + datetime.timedelta(days=7),
        )
        return attrs.evolve(leaf, chain=(self.cert,))

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
