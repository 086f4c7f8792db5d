"""Tests for the [frontend.X.tls] table: parsing, defaults and exact key-path errors.

Parsing is pure (no file is opened); file checks are in test_tls_certificates.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.config import (
    CertificateConfig,
    ConfigError,
    FrontendTLSConfig,
    Problem,
    load_config,
    parse_config,
)
from tests.test_config import EXAMPLE, dump

SOURCE = "etc/tls.toml"
TLS_EXAMPLE = EXAMPLE.parent / "tls.toml"

PAIR = '{ cert = "a.pem", key = "a.key" }'


def text(tls: str, *, pair: bool = True) -> str:
    """A config whose frontend ``f`` has a [frontend.f.tls] table with ``tls``."""
    certificates = f"certificates = [{PAIR}]\n" if pair else ""
    return f"""
[frontend.f]
listen = ":1"
pool = "p"

[frontend.f.tls]
{certificates}{tls}

[pool.p]
[[pool.p.server]]
address = "db:1"
"""


def without_table(tls: str | None = None) -> str:
    """The same config without a [frontend.f.tls] table; ``tls = <tls>`` if given."""
    document = text("", pair=False).replace("[frontend.f.tls]\n", "")
    if tls is None:
        return document
    return document.replace('pool = "p"\n', f'pool = "p"\ntls = {tls}\n', 1)


def tls_of(tls: str, *, pair: bool = True) -> FrontendTLSConfig:
    parsed = parse_config(text(tls, pair=pair), SOURCE).frontend("f").tls
    assert parsed is not None
    return parsed


def problems(document: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, SOURCE)
    return [str(problem) for problem in caught.value.problems]


class TestParsing:
    def test_no_table_means_no_tls(self) -> None:
        """A frontend without a tls table stays plain TCP."""
        assert parse_config(without_table(), SOURCE).frontend("f").tls is None

    def test_defaults(self) -> None:
        """Only certificates given: TLS 1.2, default ciphers, 10s handshake, no mTLS."""
        assert tls_of("") == FrontendTLSConfig(
            certificates=(CertificateConfig("a.pem", "a.key"),),
            min_version="1.2",
            ciphers=None,
            alpn=(),
            client_ca=None,
            client_auth="required",
            handshake_timeout=10.0,
            starttls=None,
            plaintext="refuse",
        )

    def test_every_key(self) -> None:
        """Every key is read into its field."""
        parsed = tls_of(
            'min_version = "1.3"\nciphers = "ECDHE-RSA-AES128-GCM-SHA256"\n'
            'alpn = ["postgresql", "h2"]\nclient_ca = "ca.pem"\n'
            'client_auth = "optional"\nhandshake_timeout = "2.5s"\n'
            'starttls = "postgres"\nplaintext = "allow"\n'
        )
        assert parsed.min_version == "1.3"
        assert parsed.ciphers == "ECDHE-RSA-AES128-GCM-SHA256"
        assert parsed.alpn == ("postgresql", "h2")
        assert parsed.client_ca == "ca.pem"
        assert parsed.client_auth == "optional"
        assert parsed.handshake_timeout == 2.5
        assert parsed.starttls == "postgres"
        assert parsed.plaintext == "allow"

    def test_starttls_postgres_offers_alpn_postgresql(self) -> None:
        """With starttls = "postgres", ALPN defaults to "postgresql" (libpq direct TLS)."""
        assert tls_of('starttls = "postgres"\n').alpn == ("postgresql",)

    def test_starttls_postgres_alpn_must_include_postgresql(self) -> None:
        """An alpn list without "postgresql" would refuse libpq's direct TLS."""
        with pytest.raises(ConfigError) as caught:
            tls_of('starttls = "postgres"\nalpn = ["h2"]\n')
        [problem] = caught.value.problems
        assert problem.key == "frontend.f.tls.alpn"
        assert 'must include "postgresql"' in problem.message

    def test_array_of_tables_form(self) -> None:
        """[[frontend.X.tls.certificates]] tables work like the inline array, in order."""
        document = text("", pair=False) + (
            '[[frontend.f.tls.certificates]]\ncert = "1.pem"\nkey = "1.key"\n'
            '[[frontend.f.tls.certificates]]\ncert = "2.pem"\nkey = "2.key"\n'
        )
        parsed = parse_config(document, SOURCE).frontend("f").tls
        assert parsed is not None
        assert parsed.certificates == (
            CertificateConfig("1.pem", "1.key"),
            CertificateConfig("2.pem", "2.key"),
        )

    def test_handshake_timeout_zero_disables(self) -> None:
        """A handshake_timeout of 0 means no limit, like the other timeouts."""
        assert tls_of("handshake_timeout = 0").handshake_timeout == 0.0

    def test_example_file_loads(self) -> None:
        """etc/tls.toml loads (paths are not opened by load_config)."""
        cfg = load_config(str(TLS_EXAMPLE))
        terminated = cfg.frontend("redis-tls").tls
        assert terminated is not None and len(terminated.certificates) == 2
        mtls = cfg.frontend("redis-mtls").tls
        assert mtls is not None and mtls.client_ca is not None


class TestProblems:
    @pytest.mark.parametrize(
        ("tls", "pair", "key", "fragment"),
        [
            ("", False, "certificates", "at least one certificate is required"),
            ("certificates = []", False, "certificates", "at least one certificate"),
            ('certificates = "a.pem"', False, "certificates", "expected an array"),
            (
                'certificates = [{ cert = "a.pem" }]',
                False,
                "certificates[0].key",
                "required key is missing",
            ),
            (
                'certificates = [{ key = "a.key" }]',
                False,
                "certificates[0].cert",
                "required key is missing",
            ),
            (
                'certificates = [{ cert = "a", key = "b", chain = "c" }]',
                False,
                "certificates[0].chain",
                "unknown key",
            ),
            (
                'certificates = [{ cert = "", key = "b" }]',
                False,
                "certificates[0].cert",
                "must not be empty",
            ),
            ('min_version = "1.1"', True, "min_version", 'unknown value "1.1"'),
            ("min_version = 1.2", True, "min_version", "expected a string"),
            ('ciphers = ""', True, "ciphers", "must not be empty"),
            ('alpn = "h2"', True, "alpn", "expected an array of strings"),
            ("alpn = [1]", True, "alpn", "item 0: expected a string"),
            ('alpn = ["h2", ""]', True, "alpn", "item 1: must not be empty"),
            ('alpn = ["h2", "h2"]', True, "alpn", 'item 1: "h2" is listed twice'),
            (f'alpn = ["{"x" * 256}"]', True, "alpn", "longer than 255 bytes"),
            ('client_auth = "yes"', True, "client_auth", 'unknown value "yes"'),
            ('client_auth = "optional"', True, "client_auth", "needs client_ca"),
            ('handshake_timeout = "10"', True, "handshake_timeout", "has no unit"),
            (
                "handshake_timeout = -1",
                True,
                "handshake_timeout",
                "must not be negative",
            ),
            ('starttls = "mysql"', True, "starttls", "expected one of: postgres"),
            ('plaintext = "deny"', True, "plaintext", "expected one of: refuse, allow"),
            (
                'plaintext = "allow"',
                True,
                "plaintext",
                "has no effect without starttls",
            ),
            ("ssl = true", True, "ssl", "unknown key"),
            ('min_versoin = "1.3"', True, "min_versoin", 'did you mean "min_version"'),
        ],
    )
    def test_reported(self, tls: str, pair: bool, key: str, fragment: str) -> None:
        """Each mistake is reported once, at its exact key path."""
        (problem,) = problems(text(tls, pair=pair))
        prefix = f"{SOURCE}: frontend.f.tls.{key}: "
        assert problem.startswith(prefix), problem
        assert fragment in problem[len(prefix) :], problem

    def test_tls_not_a_table(self) -> None:
        """tls = true is refused as not a table."""
        assert problems(without_table("true")) == [
            f"{SOURCE}: frontend.f.tls: expected a table, got boolean true"
        ]

    def test_all_problems_at_once(self) -> None:
        """Missing certificates and bad cross-key use are all reported in one run."""
        found = problems(
            text('client_auth = "optional"\nplaintext = "allow"', pair=False)
        )
        assert [p.split(": ")[1] for p in found] == [
            "frontend.f.tls.certificates",
            "frontend.f.tls.client_auth",
            "frontend.f.tls.plaintext",
        ]

    def test_problem_type(self) -> None:
        """TLS problems are ordinary config Problems (same format, same exit)."""
        with pytest.raises(ConfigError) as caught:
            parse_config(text('min_version = "1.0"'), SOURCE)
        assert isinstance(caught.value.problems[0], Problem)


_TLS_KEYS = st.sampled_from(
    [
        "certificates",
        "cert",
        "key",
        "min_version",
        "ciphers",
        "alpn",
        "client_ca",
        "client_auth",
        "handshake_timeout",
        "starttls",
        "plaintext",
        "x",
    ]
)
_TLS_LEAVES = st.one_of(
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.text(alphabet="abcxyz019.-*:/ ", max_size=8),  # TOML-safe via dump()
    st.sampled_from(["1.2", "1.3", "required", "optional", "postgres", "10s", "a"]),
)
_TLS_VALUES = st.recursive(
    _TLS_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(_TLS_KEYS, inner, max_size=3)
    ),
    max_leaves=8,
)


class TestRobustness:
    @settings(max_examples=300)
    @given(st.dictionaries(_TLS_KEYS, _TLS_VALUES, max_size=6))
    def test_any_tls_table_parses_or_reports(self, table: dict[str, Any]) -> None:
        """Any [frontend.X.tls] content gives a FrontendTLSConfig or ConfigError."""
        document = without_table(dump(table))
        try:
            cfg = parse_config(document, SOURCE)
        except ConfigError as error:
            assert error.problems
            assert all(p.key.startswith("frontend.f.tls") for p in error.problems), [
                str(p) for p in error.problems
            ]
        else:
            tls = cfg.frontend("f").tls
            assert tls is not None and tls.certificates
