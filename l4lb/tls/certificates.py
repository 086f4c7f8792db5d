"""Certificate files for TLS termination: loading, start-up checks, SNI selection.

`load_certificate` reads one ``cert``/``key`` pair of a ``[frontend.X.tls]``
table and refuses what would fail later, or fail clients: a missing or
unreadable file, text that is not PEM, a key that does not belong to the
certificate, an expired certificate. `check_config` runs those checks for every
TLS frontend (``--check`` and start-up share it) and also warns about
certificates that expire within `EXPIRY_WARNING`. Problems name the file and the
key path (``frontend.pg.tls.certificates[0].cert``), like config problems.

`select_certificate` is the SNI rule: the certificate whose names (SAN DNS
names; the subject CN only when there is no SAN) match the client's server
name, an exact name before a wildcard; ``*.`` matches exactly one label; no
match, or no SNI at all, picks the first certificate.

This module reads files but imports nothing from ``twisted.internet``.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID, NameOID
from OpenSSL import SSL

from l4lb.config import CertificateConfig, Config, FrontendTLSConfig, Problem

__all__ = [
    "EXPIRY_WARNING",
    "MOZILLA_INTERMEDIATE",
    "CertificateError",
    "LoadedCertificate",
    "certificate_names",
    "check_ciphers",
    "check_config",
    "check_frontend_tls",
    "check_key_matches",
    "expiry_warning",
    "load_ca_certificates",
    "load_certificate",
    "load_chain",
    "name_matches",
    "read_file",
    "select_certificate",
]

EXPIRY_WARNING = datetime.timedelta(days=14)

# Mozilla's "intermediate" TLS 1.2 cipher list (server side TLS guidelines,
# version 5.7); TLS 1.3 suites are OpenSSL's defaults, which are all fine.
MOZILLA_INTERMEDIATE = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)


class CertificateError(Exception):
    """A certificate, key or CA file is unusable; ``key`` is its config key path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@attrs.frozen
class LoadedCertificate:
    """A certificate chain (leaf first) with its key, ready for an SSL context."""

    config: CertificateConfig
    where: str  # key path of the entry, e.g. frontend.pg.tls.certificates[0]
    chain: tuple[x509.Certificate, ...]
    key: object  # a cryptography private key
    names: tuple[str, ...]  # lower-case DNS names the leaf is valid for

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc


def read_file(path: str, key: str) -> bytes:
    """The bytes of a TLS file; CertificateError (for config ``key``) if unreadable.

    Shared with `l4lb.tls.backend`, so frontend and pool TLS files fail alike.
    """
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        reason = error.strerror or str(error)
        raise CertificateError(key, f"cannot read {path!r}: {reason}") from None


def load_chain(path: str, key: str) -> tuple[x509.Certificate, ...]:
    """The PEM certificates in ``path``, in file order; CertificateError if none."""
    data = read_file(path, key)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertificateError(key, f"{path!r} holds no PEM certificate")
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except ValueError as error:
        raise CertificateError(
            key, f"{path!r} is not a valid PEM certificate file: {error}"
        ) from None


def load_ca_certificates(path: str, key: str) -> tuple[x509.Certificate, ...]:
    """The CA certificates in a PEM bundle (``client_ca``); CertificateError if none."""
    return load_chain(path, key)


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a server certificate is for: SAN, or the CN without a SAN."""
    try:
        san = cert.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        )
    except x509.ExtensionNotFound:
        names = [
            str(attribute.value)
            for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    else:
        names = list(san.value.get_values_for_type(x509.DNSName))
    return tuple(name.lower().rstrip(".") for name in names)


def load_certificate(
    config: CertificateConfig,
    where: str,
    now: datetime.datetime | None = None,
) -> LoadedCertificate:
    """Read and check one pair; ``where`` is its key path (for messages).

    Raises CertificateError for a missing/unreadable file, non-PEM content, an
    encrypted key (there is nobody to type a passphrase), a key that does not
    match the certificate, and an expired or not yet valid certificate.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    cert_key, key_key = f"{where}.cert", f"{where}.key"
    chain = load_chain(config.cert, cert_key)
    data = read_file(config.key, key_key)
    if b"PRIVATE KEY-----" not in data:
        raise CertificateError(key_key, f"{config.key!r} holds no PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(
            key_key,
            f"{config.key!r} is encrypted; l4lb needs an unencrypted key file"
            " (readable by l4lb only)",
        ) from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise CertificateError(
            key_key, f"{config.key!r} is not a valid PEM private key: {error}"
        ) from None
    leaf = chain[0]
    check_key_matches(leaf, key, config.cert, config.key, key_key)
    if leaf.not_valid_after_utc <= now:
        raise CertificateError(
            cert_key,
            f"{config.cert!r} expired on {_when(leaf.not_valid_after_utc)}",
        )
    if leaf.not_valid_before_utc > now:
        raise CertificateError(
            cert_key,
            f"{config.cert!r} is not valid before {_when(leaf.not_valid_before_utc)}",
        )
    return LoadedCertificate(config, where, chain, key, certificate_names(leaf))


def check_key_matches(
    leaf: x509.Certificate, key: object, cert_path: str, key_path: str, where: str
) -> None:
    """CertificateError (for config key ``where``) unless ``key`` is the leaf's key."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    public = key.public_key()  # type: ignore[attr-defined]
    if leaf.public_key().public_bytes(der, spki) != public.public_bytes(der, spki):
        raise CertificateError(
            where, f"{key_path!r} does not match the certificate in {cert_path!r}"
        )


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def expiry_warning(
    certificate: LoadedCertificate, now: datetime.datetime | None = None
) -> str | None:
    """A warning when the certificate expires within `EXPIRY_WARNING`, else None."""
    now = now or datetime.datetime.now(datetime.UTC)
    left = certificate.not_after - now
    if left >= EXPIRY_WARNING:
        return None
    days = left.total_seconds() / 86400
    return (
        f"{certificate.config.cert!r} expires on {_when(certificate.not_after)}"
        f" (in {days:.1f} days)"
    )


def check_ciphers(ciphers: str, where: str) -> None:
    """CertificateError when OpenSSL matches no cipher in ``ciphers``."""
    try:
        SSL.Context(SSL.TLS_SERVER_METHOD).set_cipher_list(ciphers.encode())
    except (SSL.Error, UnicodeEncodeError):
        raise CertificateError(
            f"{where}.ciphers", f"OpenSSL knows no cipher in {ciphers!r}"
        ) from None


def check_frontend_tls(
    tls: FrontendTLSConfig, where: str, now: datetime.datetime | None = None
) -> tuple[list[CertificateError], list[CertificateError]]:
    """(errors, warnings) for one ``[frontend.X.tls]``; ``where`` is its key path."""
    errors: list[CertificateError] = []
    warnings: list[CertificateError] = []
    for index, entry in enumerate(tls.certificates):
        entry_where = f"{where}.certificates[{index}]"
        try:
            loaded = load_certificate(entry, entry_where, now)
        except CertificateError as error:
            errors.append(error)
            continue
        warning = expiry_warning(loaded, now)
        if warning is not None:
            warnings.append(CertificateError(f"{entry_where}.cert", warning))
    if tls.client_ca is not None:
        try:
            load_ca_certificates(tls.client_ca, f"{where}.client_ca")
        except CertificateError as error:
            errors.append(error)
    if tls.ciphers is not None:
        try:
            check_ciphers(tls.ciphers, where)
        except CertificateError as error:
            errors.append(error)
    return errors, warnings


def check_config(
    config: Config, now: datetime.datetime | None = None
) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) for the TLS files of every frontend, as config Problems."""
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for frontend in config.frontends:
        if frontend.tls is None:
            continue
        where = f"frontend.{frontend.name}.tls"
        found, warned = check_frontend_tls(frontend.tls, where, now)
        errors += [Problem(config.source, e.key, e.message) for e in found]
        warnings += [Problem(config.source, w.key, w.message) for w in warned]
    return errors, warnings


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 matching: exact (case-insensitive), or ``*.rest`` for one label."""
    pattern = pattern.lower().rstrip(".")
    name = name.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = name.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return pattern == name


def select_certificate(names: Sequence[Sequence[str]], server_name: str | None) -> int:
    """Index of the certificate for ``server_name`` given each one's names.

    An exact name wins over a wildcard (as HAProxy does), earlier entries win
    ties, and no match or no SNI picks the first (the default) certificate.
    """
    if not server_name:
        return 0
    wanted = server_name.lower().rstrip(".")
    for index, candidates in enumerate(names):
        if wanted in candidates:
            return index
    for index, candidates in enumerate(names):
        if any(
            pattern.startswith("*.") and name_matches(pattern, wanted)
            for pattern in candidates
        ):
            return index
    return 0
