"""End-to-end: ``twistd -n l4lb`` terminating TLS for PostgreSQL clients.

The config has a ``[frontend.pg.tls]`` table with ``starttls = "postgres"`` in
front of the machine's PostgreSQL (127.0.0.1:5432, trust auth, TLS off).
Parsing that table belongs to the TLS termination work; until it is merged
these tests skip (they check the config parses, and say so when it does not).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from l4lb.config import ConfigError, parse_config
from tests.e2e import CLEAN_EXIT, L4LB
from tests.pg_tls_material import PgTLSFiles, make_material

pytestmark = pytest.mark.e2e

PSQL = shutil.which("psql")
OPENSSL = shutil.which("openssl")


def config_text(files: PgTLSFiles, plaintext: str = "refuse") -> str:
    return f"""\
[global]
log_format = "json"
shutdown_grace = "2s"

[frontend.pg]
listen = "127.0.0.1:0"
pool = "pg"

[frontend.pg.tls]
certificates = [{{ cert = "{files.cert}", key = "{files.key}" }}]
alpn = ["postgresql"]
handshake_timeout = "5s"
starttls = "postgres"
plaintext = "{plaintext}"

[pool.pg]

[[pool.pg.server]]
name = "pg1"
address = "127.0.0.1:5432"
"""


def _tls_table_parses(files: PgTLSFiles) -> bool:
    try:
        parse_config(config_text(files), "<probe>")
    except ConfigError:
        return False
    return True


@pytest.fixture
def material(tmp_path: Path) -> PgTLSFiles:
    files = make_material(tmp_path / "tls")
    if not _tls_table_parses(files):
        pytest.skip("[frontend.X.tls] is not parsed yet (TLS termination branch)")
    return files


@pytest.fixture
def run_l4lb(tmp_path: Path) -> Iterator[Callable[..., L4LB]]:
    runners: list[L4LB] = []

    def run(config: str) -> L4LB:
        runner = L4LB(tmp_path, name=f"l4lb-{len(runners)}")
        runners.append(runner)
        # One frontend (the default readiness counts "[frontend." headers,
        # which the TLS sub-table would double).
        return runner.start(config, ready=lambda r: len(r.events("listening")) >= 1)

    yield run
    for runner in runners:
        runner.kill()


def conninfo(port: int, files: PgTLSFiles, sslmode: str, **extra: str) -> str:
    keys = {
        "host": "localhost",
        "hostaddr": "127.0.0.1",
        "port": str(port),
        "user": "postgres",
        "dbname": "postgres",
        "sslmode": sslmode,
        "sslrootcert": str(files.ca),
        "connect_timeout": "10",
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in keys.items())


def psql(tmp_path: Path, info: str, sql: str) -> subprocess.CompletedProcess[str]:
    assert PSQL is not None
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LC_ALL": "C"}
    return subprocess.run(
        [PSQL, info, "-X", "-A", "-t", "-q", "-c", sql],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.skipif(PSQL is None, reason="psql is not installed")
class TestTwistd:
    def test_psql_verify_full_and_plaintext_refused(
        self, run_l4lb: Callable[..., L4LB], material: PgTLSFiles, tmp_path: Path
    ) -> None:
        """psql with verify-full runs a query; sslmode=disable sees the FATAL refusal."""
        lb = run_l4lb(config_text(material))
        _, port = lb.address("pg")
        ok = psql(tmp_path, conninfo(port, material, "verify-full"), "SELECT 40 + 2")
        assert (ok.returncode, ok.stdout.strip(), ok.stderr) == (0, "42", "")
        refused = psql(tmp_path, conninfo(port, material, "disable"), "SELECT 1")
        assert refused.returncode == 2
        assert "FATAL:  TLS required: connect with sslmode=require" in refused.stderr
        lines = lb.wait_for_closed(2)
        assert [line["reason"] for line in lines][1] == "plaintext refused"
        assert lines[0]["server"] == "pg1" and lines[1]["server"] is None
        assert lb.terminate() in CLEAN_EXIT

    def test_psycopg_copy_and_direct_tls(
        self, run_l4lb: Callable[..., L4LB], material: PgTLSFiles
    ) -> None:
        """psycopg: a 1 MB value and COPY over STARTTLS, and direct TLS with libpq 17+."""
        lb = run_l4lb(config_text(material))
        _, port = lb.address("pg")
        modes: list[dict[str, Any]] = [{}]
        if psycopg.pq.version() >= 170000:
            modes.append({"sslnegotiation": "direct"})
        for extra in modes:
            with psycopg.connect(
                conninfo(port, material, "verify-full", **extra)
            ) as conn:
                assert conn.pgconn.ssl_in_use
                big = conn.execute("SELECT repeat('z', 1048576)").fetchone()
                assert big == ("z" * 1048576,)
                with (
                    conn.cursor() as cur,
                    cur.copy(
                        "COPY (SELECT g FROM generate_series(1, 5000) g) TO STDOUT"
                    ) as copy,
                ):
                    assert sum(1 for _ in copy.rows()) == 5000
        lines = lb.wait_for_closed(len(modes))
        assert all(line["server"] == "pg1" for line in lines)
        assert lb.terminate() in CLEAN_EXIT

    @pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
    def test_openssl_starttls_postgres(
        self, run_l4lb: Callable[..., L4LB], material: PgTLSFiles
    ) -> None:
        """``openssl s_client -starttls postgres`` verifies the certificate through twistd."""
        lb = run_l4lb(config_text(material))
        _, port = lb.address("pg")
        assert OPENSSL is not None
        result = subprocess.run(
            [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}",
             "-starttls", "postgres", "-servername", "localhost",
             "-verify_hostname", "localhost", "-CAfile", str(material.ca),
             "-verify_return_error"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "Verify return code: 0 (ok)" in result.stdout
        lb.wait_for_closed(1)
        assert lb.terminate() in CLEAN_EXIT
