"""End-to-end TLS termination: ``twistd -n l4lb`` with a TLS frontend before Redis.

Certificate reload by SIGHUP on a running process, and start-up refusing a bad
certificate. Clients are Python ``ssl`` sockets speaking RESP; certificates
come from `tests.tls_material`, generated per test.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.e2e import CLEAN_EXIT, L4LB, free_port, l4lb_config, start_redis, wait_until
from tests.tls_material import Issued, TLSMaterial

pytestmark = pytest.mark.e2e


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    with start_redis(port, tmp_path):
        yield port


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[L4LB]:
    l4lb = L4LB(tmp_path)
    yield l4lb
    l4lb.kill()


def config(redis_port: int, cert: Path, key: Path) -> str:
    text = l4lb_config(
        {"tls": {"listen": "127.0.0.1:0", "pool": "redis"}},
        {"redis": {"servers": [{"address": f"127.0.0.1:{redis_port}"}]}},
    )
    return (
        text
        + f'[frontend.tls.tls]\ncertificates = [{{ cert = "{cert}", key = "{key}" }}]\n'
    )


def listening(runner: L4LB) -> bool:
    """Ready: the one frontend listens (its tls sub-table is not a frontend)."""
    return bool(runner.events("listening"))


class Client:
    """A blocking TLS client speaking RESP (PING → +PONG)."""

    def __init__(self, address: tuple[str, int], ca: Path) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        raw = socket.create_connection(address, timeout=10)
        self.tls = context.wrap_socket(raw, server_hostname="db.example.com")

    def ping(self) -> bytes:
        self.tls.sendall(b"PING\r\n")
        return self.tls.recv(64)

    def certificate(self) -> bytes:
        der = self.tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    def close(self) -> None:
        self.tls.close()


def der(issued: Issued) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.DER)


class TestReload:
    def test_sighup_reloads_certificates(
        self, tmp_path: Path, redis_port: int, runner: L4LB
    ) -> None:
        """SIGHUP: new handshakes get the new certificate, an open connection goes on;
        a bad file on a later SIGHUP keeps the current certificate."""
        pki = TLSMaterial(tmp_path / "pki")
        live = pki.write(pki.server("first", "db.example.com"), "live")
        assert live.cert_path is not None and live.key_path is not None
        runner.start(config(redis_port, live.cert_path, live.key_path), ready=listening)
        address = runner.address("tls")
        before = Client(address, pki.ca.cert_path)
        assert before.ping() == b"+PONG\r\n"
        assert before.certificate() == der(live)

        renewed = pki.write(pki.server("second", "db.example.com"), "live")
        runner.signal(signal.SIGHUP)
        wait_until(lambda: runner.events("tls certificates reloaded"), 10, "the reload")
        after = Client(address, pki.ca.cert_path)
        assert after.certificate() == der(renewed)
        assert after.ping() == b"+PONG\r\n"
        assert before.ping() == b"+PONG\r\n"  # the old connection is untouched

        live.key_path.write_text("not a key\n")
        runner.signal(signal.SIGHUP)
        (failed,) = wait_until(
            lambda: runner.events("tls reload failed, keeping the old certificates"),
            10,
            "the failed reload",
        )
        assert failed["level"] == "error"
        assert failed["key"] == "frontend.tls.tls.certificates[0].key"
        third = Client(address, pki.ca.cert_path)
        assert third.certificate() == der(renewed)
        assert third.ping() == b"+PONG\r\n"
        for client in (before, after, third):
            client.close()
        runner.wait_for_closed(3)
        assert runner.alive()
        assert runner.terminate() in CLEAN_EXIT


class TestStart:
    def test_expired_certificate_stops_start(
        self, tmp_path: Path, redis_port: int, runner: L4LB
    ) -> None:
        """An expired certificate: exit 1 at start, naming the key path and file."""
        pki = TLSMaterial(tmp_path / "pki")
        old = pki.expired("old", "db.example.com")
        assert old.cert_path is not None and old.key_path is not None
        runner.config_path.write_text(config(redis_port, old.cert_path, old.key_path))
        with pytest.raises(AssertionError, match="exited with 1"):
            runner.start(None)
        assert "frontend.tls.tls.certificates[0].cert: " in runner.stderr()
        assert "expired on" in runner.stderr()

    def test_expiring_certificate_is_a_warning(
        self, tmp_path: Path, redis_port: int, runner: L4LB
    ) -> None:
        """A certificate expiring within 14 days starts, with a warning in the log."""
        pki = TLSMaterial(tmp_path / "pki")
        soon = pki.expiring("soon", "db.example.com", days=3)
        assert soon.cert_path is not None and soon.key_path is not None
        runner.start(config(redis_port, soon.cert_path, soon.key_path), ready=listening)
        (warning,) = runner.events("certificate expires soon")
        assert warning["level"] == "warning"
        assert warning["key"] == "frontend.tls.tls.certificates[0].cert"
        assert runner.terminate() in CLEAN_EXIT


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="no redis-cli")
class TestRedisCli:
    def test_redis_cli_tls(self, tmp_path: Path, redis_port: int, runner: L4LB) -> None:
        """redis-cli --tls (verifying the CA, with SNI) runs real commands through l4lb."""
        pki = TLSMaterial(tmp_path / "pki")
        db = pki.server("db", "db.example.com")
        assert db.cert_path is not None and db.key_path is not None
        runner.start(config(redis_port, db.cert_path, db.key_path), ready=listening)
        host, port = runner.address("tls")
        base = ["redis-cli", "--tls", "--cacert", str(pki.ca.cert_path)]
        base += ["--sni", "db.example.com", "-h", host, "-p", str(port)]
        for command, expected in [
            (["SET", "tls-key", "through l4lb"], "OK"),
            (["GET", "tls-key"], "through l4lb"),
        ]:
            done = subprocess.run(
                base + command, capture_output=True, text=True, timeout=20, check=False
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == expected, done.stdout + done.stderr
        lines = runner.wait_for_closed(2)
        assert {line["tls_sni"] for line in lines} == {"db.example.com"}
        assert {line["tls_version"] for line in lines} == {"TLSv1.3"}
        assert runner.terminate() in CLEAN_EXIT
