"""End-to-end TLS routing: ``twistd -n l4lb`` in front of TLS redis-servers.

Passthrough is driven by ``openssl s_client -servername``; backend TLS by a
plain redis-py client through l4lb to redis-servers that only speak TLS.
Certificates come from a CA made at test time.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.e2e import L4LB, free_port, port_accepts, stop_process, wait_until
from tests.tls_material import CA

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl"),
]


@contextlib.contextmanager
def tls_redis(port: int, cert: str, key: str, ca: str, workdir: Path) -> Iterator[None]:
    """A redis-server speaking only TLS on 127.0.0.1:``port``."""
    args = [
        "redis-server",
        "--port", "0",
        "--tls-port", str(port),
        "--bind", "127.0.0.1",
        "--tls-cert-file", cert,
        "--tls-key-file", key,
        "--tls-ca-cert-file", ca,
        "--tls-auth-clients", "no",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
    ]  # fmt: skip
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(
            lambda: process.poll() is not None or port_accepts("127.0.0.1", port),
            10,
            f"TLS redis-server on {port}",
        )
        assert process.poll() is None, "redis-server with TLS did not start"
        yield
    finally:
        stop_process(process)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Enter context managers and start l4lb runners; all undone at teardown."""
    runners: list[L4LB] = []
    with contextlib.ExitStack() as exits:

        def enter(thing: Any) -> Any:
            if isinstance(thing, str):  # a config: run l4lb with it
                runner = L4LB(tmp_path, name=f"l4lb-{len(runners)}")
                runners.append(runner)
                return runner.start(thing)
            return exits.enter_context(thing)

        try:
            yield enter
        finally:
            for runner in runners:
                runner.kill()


def s_client(port: int, server_name: str, ca: str, timeout: float = 10) -> str:
    """Run ``openssl s_client -servername``, send PING, return all it printed."""
    args = [
        "openssl", "s_client",
        "-connect", f"127.0.0.1:{port}",
        "-servername", server_name,
        "-CAfile", ca,
        "-verify_return_error",
    ]  # fmt: skip
    process = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdin is not None and process.stdout is not None
    output = b""
    try:
        process.stdin.write(b"PING\r\n")
        process.stdin.flush()
        deadline = time.monotonic() + timeout
        while b"+PONG" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.1)
            if ready:
                chunk = process.stdout.read1(65536)
                if not chunk:
                    break
                output += chunk
    finally:
        process.kill()
        process.wait(10)
    return output.decode(errors="replace")


def routed_config(pools: dict[str, int], default: str | None) -> str:
    text = (
        '[global]\nlog_format = "json"\n'
        f'[frontend.edge]\nlisten = "127.0.0.1:{free_port()}"\n'
        'route_by_sni = { "a.example.com" = "pa", "*.b.example.com" = "pb" }\n'
        'handshake_timeout = "2s"\n'
    )
    if default:
        text += f'pool = "{default}"\n'
    for name, port in pools.items():
        text += f'[pool.{name}]\n[[pool.{name}.server]]\naddress = "127.0.0.1:{port}"\n'
    return text


class TestPassthrough:
    def test_s_client_routed_by_servername(self, tmp_path: Path, stack: Any) -> None:
        """openssl s_client reaches the redis whose certificate matches its -servername."""
        ca = CA()
        ca_file = ca.write(tmp_path)
        ports = {"pa": free_port(), "pb": free_port()}
        names = {"pa": "a.example.com", "pb": "eu.b.example.com"}
        for pool, port in ports.items():
            cert, key = ca.issue(names[pool]).write(tmp_path, pool)
            stack(tls_redis(port, cert, key, ca_file, tmp_path))
        lb = stack(routed_config(ports, default=None))
        _, port = lb.address("edge")

        for name in names.values():
            output = s_client(port, name, ca_file)
            assert "+PONG" in output, output
            assert f"CN = {name}" in output  # the backend's own certificate
            assert "Verify return code: 0 (ok)" in output
        refused = s_client(port, "c.example.com", ca_file, timeout=5)
        assert "+PONG" not in refused

        lines = lb.wait_for_closed(3)
        assert [(line["pool"], line["sni"]) for line in lines] == [
            ("pa", "a.example.com"),
            ("pb", "eu.b.example.com"),
            (None, "c.example.com"),
        ]
        assert lines[2]["reason"] == "no route"
        assert lb.alive()


def backend_tls_config(ports: list[int], ca: str) -> str:
    text = (
        '[global]\nlog_format = "json"\n'
        f'[frontend.cache]\nlisten = "127.0.0.1:{free_port()}"\npool = "redis"\n'
        '[pool.redis]\nbalance = "first"\n'
    )
    for i, port in enumerate(ports):
        text += f'[[pool.redis.server]]\nname = "r{i}"\naddress = "127.0.0.1:{port}"\n'
    text += f'[pool.redis.tls]\nca = "{ca}"\nserver_name = "redis.internal"\n'
    return text


class TestBackendTLS:
    def test_redis_behind_verified_tls(self, tmp_path: Path, stack: Any) -> None:
        """A plain redis client works through l4lb to TLS-only redis; a bad cert is skipped."""
        ca = CA()
        ca_file = ca.write(tmp_path)
        bad_port, good_port = free_port(), free_port()
        cert, key = ca.issue("wrong.internal").write(tmp_path, "bad")
        stack(tls_redis(bad_port, cert, key, ca_file, tmp_path))
        cert, key = ca.issue("redis.internal").write(tmp_path, "good")
        stack(tls_redis(good_port, cert, key, ca_file, tmp_path))
        lb = stack(backend_tls_config([bad_port, good_port], ca_file))
        host, port = lb.address("cache")

        client = redis.Redis(host=host, port=port, socket_timeout=5)
        try:
            assert client.set("tls-key", b"x" * 100_000)
            assert client.get("tls-key") == b"x" * 100_000
        finally:
            client.close()
        [line] = lb.wait_for_closed(1)
        assert (line["server"], line["retries"]) == ("r1", 1)
        [failure] = lb.events("server connect failed")
        assert failure["server"] == "r0"
        assert "not valid for 'redis.internal'" in failure["error"]

    def test_check_reports_missing_files(self, tmp_path: Path) -> None:
        """--check fails with the key path of a certificate file that is missing."""
        runner = L4LB(tmp_path)
        runner.config_path.write_text(
            backend_tls_config([6379], str(tmp_path / "nope.pem"))
        )
        result = subprocess.run(
            runner.command(["--config", str(runner.config_path), "--check"]),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert result.returncode == 1
        assert (
            f"pool.redis.tls.ca: cannot read '{tmp_path}/nope.pem':"
            " No such file or directory"
        ) in result.stderr
