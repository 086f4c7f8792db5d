"""Certificate files for TLS termination: start-up/--check problems, SNI selection.

Certificates come from `tests.tls_material`, generated per test run.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4lb.config import CertificateConfig, parse_config
from l4lb.tap import Options
from l4lb.tls.certificates import (
    CertificateError,
    certificate_names,
    check_config,
    load_certificate,
    name_matches,
    select_certificate,
)
from tests.tls_material import TLSMaterial

WHERE = "frontend.f.tls.certificates[0]"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    return TLSMaterial(tmp_path_factory.mktemp("pki"))


def pair(cert: Path | str, key: Path | str) -> CertificateConfig:
    return CertificateConfig(str(cert), str(key))


def config_text(tls: str) -> str:
    return f"""
[frontend.f]
listen = "127.0.0.1:0"
pool = "p"
[frontend.f.tls]
{tls}
[pool.p]
[[pool.p.server]]
address = "127.0.0.1:1"
"""


class TestLoad:
    def test_good_pair(self, pki: TLSMaterial) -> None:
        """A matching, valid pair loads with its SAN names (lower case)."""
        issued = pki.server("good", "DB.example.com", "*.example.org")
        loaded = load_certificate(pair(issued.cert_path, issued.key_path), WHERE)
        assert loaded.names == ("db.example.com", "*.example.org")
        assert loaded.leaf == issued.cert

    def test_chain_is_kept(self, pki: TLSMaterial, tmp_path: Path) -> None:
        """A cert file holding leaf + CA keeps both, leaf first."""
        issued = pki.server("chained", "db.example.com")
        chain = tmp_path / "chain.pem"
        chain.write_bytes(issued.cert_pem + pki.ca.cert_pem)
        loaded = load_certificate(pair(chain, issued.key_path), WHERE)
        assert loaded.chain == (issued.cert, pki.ca.cert)

    def test_cn_only_without_san(self, pki: TLSMaterial) -> None:
        """Without a SAN extension the subject CN is the name."""
        issued = pki.server("cn", "cn.example.com", ips=(), san=False)
        assert certificate_names(issued.cert) == ("cn.example.com",)

    @pytest.mark.parametrize(
        ("damage", "key", "fragment"),
        [
            ("missing cert", "cert", "cannot read"),
            ("missing key", "key", "cannot read"),
            ("cert not pem", "cert", "holds no PEM certificate"),
            ("key not pem", "key", "holds no PEM private key"),
            ("cert garbage pem", "cert", "is not a valid PEM certificate file"),
            ("key of another cert", "key", "does not match the certificate"),
            ("cert is a directory", "cert", "cannot read"),
        ],
    )
    def test_problems(
        self, pki: TLSMaterial, tmp_path: Path, damage: str, key: str, fragment: str
    ) -> None:
        """Each kind of broken file is refused, naming the file and key path."""
        issued = pki.server("victim", "v.example.com")
        other = pki.server("other", "o.example.com")
        cert, private = issued.cert_path, issued.key_path
        if damage == "missing cert":
            cert = tmp_path / "nope.pem"
        elif damage == "missing key":
            private = tmp_path / "nope.key"
        elif damage == "cert not pem":
            cert = tmp_path / "bad.pem"
            cert.write_text("hello\n")
        elif damage == "key not pem":
            private = tmp_path / "bad.key"
            private.write_text("hello\n")
        elif damage == "cert garbage pem":
            cert = tmp_path / "garbage.pem"
            cert.write_text(
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            )
        elif damage == "key of another cert":
            private = other.key_path
        elif damage == "cert is a directory":
            cert = tmp_path
        with pytest.raises(CertificateError) as caught:
            load_certificate(pair(cert, private), WHERE)
        assert caught.value.key == f"{WHERE}.{key}"
        assert fragment in caught.value.message
        assert str(cert if key == "cert" else private) in caught.value.message

    def test_expired(self, pki: TLSMaterial) -> None:
        """An expired certificate is an error with its expiry date."""
        issued = pki.expired("expired", "old.example.com")
        with pytest.raises(CertificateError, match="expired on") as caught:
            load_certificate(pair(issued.cert_path, issued.key_path), WHERE)
        assert caught.value.key == f"{WHERE}.cert"

    def test_not_yet_valid(self, pki: TLSMaterial) -> None:
        """A certificate from the future is an error too."""
        start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
        issued = pki.server("future", "f.example.com", not_before=start)
        with pytest.raises(CertificateError, match="not valid before"):
            load_certificate(pair(issued.cert_path, issued.key_path), WHERE)

    def test_encrypted_key(self, pki: TLSMaterial, tmp_path: Path) -> None:
        """A passphrase-protected key is refused with a hint."""
        from cryptography.hazmat.primitives import serialization

        issued = pki.server("enc", "e.example.com")
        encrypted = tmp_path / "enc.key"
        encrypted.write_bytes(
            issued.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        with pytest.raises(CertificateError, match="is encrypted"):
            load_certificate(pair(issued.cert_path, encrypted), WHERE)


class TestCheckConfig:
    def test_all_problems_and_warnings(self, pki: TLSMaterial, tmp_path: Path) -> None:
        """Every broken file is an error; a certificate expiring soon is a warning."""
        good = pki.server("ok", "ok.example.com")
        soon = pki.expiring("soon", "soon.example.com", days=3)
        old = pki.expired("old", "old.example.com")
        cfg = parse_config(
            config_text(
                f"certificates = [{good.toml()}, {soon.toml()}, {old.toml()}]\n"
                f'client_ca = "{tmp_path / "none.pem"}"\n'
                'ciphers = "NOT-A-CIPHER"\n'
            ),
            "x.toml",
        )
        errors, warnings = check_config(cfg)
        assert [(p.source, p.key) for p in errors] == [
            ("x.toml", "frontend.f.tls.certificates[2].cert"),
            ("x.toml", "frontend.f.tls.client_ca"),
            ("x.toml", "frontend.f.tls.ciphers"),
        ]
        assert [p.key for p in warnings] == ["frontend.f.tls.certificates[1].cert"]
        assert "expires on" in warnings[0].message
        assert re.search(r"\(in (3\.0|2\.9) days\)", warnings[0].message)

    def test_no_tls_nothing_to_check(self) -> None:
        """A config without TLS frontends has no certificate problems."""
        cfg = parse_config(config_text("").replace("[frontend.f.tls]", ""), "x")
        assert check_config(cfg) == ([], [])


class TestCommandLine:
    def write(self, tmp_path: Path, tls: str) -> str:
        path = tmp_path / "l4lb.toml"
        path.write_text(config_text(tls))
        return str(path)

    def test_check_fails_on_expired(
        self, pki: TLSMaterial, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--check exits 1 and names the key path of an expired certificate."""
        old = pki.expired("old-cli", "old.example.com")
        path = self.write(tmp_path, f"certificates = [{old.toml()}]")
        with pytest.raises(SystemExit) as exit_:
            Options().parseOptions(["--config", path, "--check"])
        assert exit_.value.code == 1
        err = capsys.readouterr().err
        assert f"{path}: frontend.f.tls.certificates[0].cert: " in err
        assert "expired on" in err
        assert "1 problem(s) found" in err

    def test_start_fails_on_missing_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Starting (no --check) refuses a missing key file the same way."""
        path = self.write(
            tmp_path, f'certificates = [{{ cert = "{tmp_path}/c", key = "k" }}]'
        )
        with pytest.raises(SystemExit) as exit_:
            Options().parseOptions(["--config", path])
        assert exit_.value.code == 1
        assert "frontend.f.tls.certificates[0].cert: cannot read" in (
            capsys.readouterr().err
        )

    def test_check_warns_but_passes(
        self, pki: TLSMaterial, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A certificate expiring within 14 days is a warning; --check still exits 0."""
        soon = pki.expiring("soon-cli", "soon.example.com", days=3)
        path = self.write(tmp_path, f"certificates = [{soon.toml()}]")
        with pytest.raises(SystemExit) as exit_:
            Options().parseOptions(["--config", path, "--check"])
        assert exit_.value.code == 0
        captured = capsys.readouterr()
        assert "warning: " in captured.err
        assert "frontend.f.tls.certificates[0].cert" in captured.err
        assert "configuration is valid" in captured.out


class TestServerNames:
    @pytest.mark.parametrize(
        ("pattern", "name", "matches"),
        [
            ("db.example.com", "db.example.com", True),
            ("db.example.com", "DB.Example.COM.", True),
            ("db.example.com", "x.db.example.com", False),
            ("*.example.org", "a.example.org", True),
            ("*.example.org", "A.EXAMPLE.ORG", True),
            ("*.example.org", "a.b.example.org", False),
            ("*.example.org", "example.org", False),
            ("*.example.org", ".example.org", False),
            ("*.example.org", "aexample.org", False),
        ],
    )
    def test_name_matches(self, pattern: str, name: str, matches: bool) -> None:
        """Exact names match case-insensitively; a wildcard covers exactly one label."""
        assert name_matches(pattern, name) is matches

    NAMES = (
        ("db.example.com",),
        ("*.example.org", "example.org"),
        ("a.example.org",),
    )

    @pytest.mark.parametrize(
        ("server_name", "index"),
        [
            (None, 0),
            ("", 0),
            ("db.example.com", 0),
            ("b.example.org", 1),
            ("example.org", 1),
            ("a.example.org", 2),  # exact beats an earlier wildcard
            ("unknown.example.net", 0),  # no match: the first
        ],
    )
    def test_select(self, server_name: str | None, index: int) -> None:
        """SNI picks the matching certificate, exact before wildcard, else the first."""
        assert select_certificate(self.NAMES, server_name) == index

    @given(st.text(max_size=80))
    def test_select_never_fails(self, server_name: str) -> None:
        """Any SNI text selects some certificate without raising."""
        assert 0 <= select_certificate(self.NAMES, server_name) < len(self.NAMES)
