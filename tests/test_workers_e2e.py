"""``workers = 2`` end to end: ``twistd -n l4lb`` as a supervisor of two worker processes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import (
    CLEAN_EXIT,
    L4LB,
    _toml_table,
    free_port,
    l4lb_config,
    port_refuses,
    wait_until,
)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


class Backend(socketserver.ThreadingTCPServer):
    """An echo server on 127.0.0.1 that counts connections and can die abruptly.

    It echoes until the client's FIN, then half-closes back (so half-close
    through the proxy is visible). ``accepted`` keeps the time of every
    accepted connection; ``live`` counts the open ones.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.accepted: list[float] = []
        self.live = 0
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def kill(self) -> None:
        """Like ``kill -9`` of a backend: stop listening, reset every connection."""
        self.shutdown()
        self.server_close()
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
                )
                conn.close()


class _EchoHandler(socketserver.BaseRequestHandler):
    server: Backend

    def handle(self) -> None:
        conn = self.request
        with self.server.lock:
            self.server.accepted.append(time.monotonic())
            self.server.live += 1
            self.server.conns.add(conn)
        try:
            while True:
                data = conn.recv(256 * 1024)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)
        except OSError:
            return
        finally:
            with self.server.lock:
                self.server.live -= 1
                self.server.conns.discard(conn)


@pytest.fixture
def backends() -> Iterator[Callable[[int], list[Backend]]]:
    started: list[Backend] = []

    def start(n: int) -> list[Backend]:
        new = [Backend() for _ in range(n)]
        started.extend(new)
        return new

    yield start
    for backend in started:
        with contextlib.suppress(OSError):
            backend.kill()


class Workers(L4LB):
    """A supervisor run: ready once every worker listens; teardown kills workers too."""

    def worker_lines(
        self, event: str, index: int | None = None
    ) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events(event)
            if "worker" in e and (index is None or e["worker"] == index)
        ]

    def pids(self) -> dict[int, int]:
        """Each worker index's latest process id."""
        return {e["index"]: e["pid"] for e in self.events("worker started")}

    def all_pids(self) -> set[int]:
        return {e["pid"] for e in self.events("worker started")}

    def address(self, frontend: str | None = None) -> tuple[str, int]:
        (line,) = self.worker_lines("listening", 0)[:1]
        host, _, port = line["address"].rpartition(":")
        return host, int(port)

    def kill(self) -> None:
        super().kill()
        for pid in self.all_pids():
            # Only a process still running this test's worker command: a pid
            # of a worker that exited may have been reused since.
            with contextlib.suppress(OSError):
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if (
                    b"l4lb.worker" in command
                    and str(self.config_path).encode() in command
                ):
                    os.kill(pid, signal.SIGKILL)


def both_listening(lb: L4LB) -> bool:
    assert isinstance(lb, Workers)
    return bool(lb.worker_lines("listening", 0) and lb.worker_lines("listening", 1))


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    runners: list[Workers] = []

    def start(config: str) -> Workers:
        runner = Workers(tmp_path, name=f"l4lb-{len(runners)}")
        runners.append(runner)
        runner.start(config, ready=both_listening, timeout=60)
        return runner

    yield start
    for runner in runners:
        runner.kill()


def config(
    backends: list[Backend],
    pool: dict[str, object] | None = None,
    health: dict[str, object] | None = None,
    **global_: object,
) -> str:
    text = l4lb_config(
        frontends={"f": {"listen": f"127.0.0.1:{free_port()}", "pool": "p"}},
        pools={
            "p": {
                **(pool or {}),
                "servers": [
                    {"address": f"127.0.0.1:{b.port}", "name": f"b{i}"}
                    for i, b in enumerate(backends)
                ],
            }
        },
        workers=2,
        **global_,
    )
    if health is not None:
        text += _toml_table("[pool.p.health]", health)
    return text


def echo_once(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def served_by(lb: Workers) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in lb.closed_lines():
        counts[line["worker"]] = counts.get(line["worker"], 0) + 1
    return counts


class TestServing:
    def test_both_workers_serve(
        self, run: Callable[..., Workers], backends: Callable[[int], list[Backend]]
    ) -> None:
        """Clients are spread over both workers, whose lines carry their index."""
        lb = run(config(backends(2)))
        _, port = lb.address()
        for i in range(40):
            assert echo_once(port, b"x%d" % i) == b"x%d" % i
        lb.wait_for_closed(40)
        counts = served_by(lb)
        assert set(counts) == {0, 1}, counts
        (started,) = lb.events("supervisor started")
        assert started["workers"] == 2
        assert "worker" not in started

    def test_bytes_and_half_close_through_workers(
        self, run: Callable[..., Workers], backends: Callable[[int], list[Backend]]
    ) -> None:
        """Random bytes come back intact after the client's FIN, on every connection."""
        lb = run(config(backends(2)))
        _, port = lb.address()
        for i in range(8):
            payload = os.urandom(MiB + i)
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                sender = threading.Thread(
                    target=lambda s=s, p=payload: (
                        s.sendall(p),
                        s.shutdown(socket.SHUT_WR),
                    )
                )
                sender.start()
                sha = hashlib.sha256()
                got = 0
                while chunk := s.recv(65536):
                    sha.update(chunk)
                    got += len(chunk)
                sender.join(20)
            assert got == len(payload)
            assert sha.digest() == hashlib.sha256(payload).digest()
        lines = lb.wait_for_closed(8)
        assert sorted(line["bytes_from_client"] for line in lines) == [
            MiB + i for i in range(8)
        ]
        assert all(
            line["bytes_from_server"] == line["bytes_from_client"] for line in lines
        )

    def test_least_connections_spread_stays_fair(
        self, run: Callable[..., Workers], backends: Callable[[int], list[Backend]]
    ) -> None:
        """60 held connections over 2 workers and 3 backends: 20 ± 1 each.

        Each worker counts only its own connections, but each worker's
        least-connections keeps its 3 backends within 1 of each other (ties
        taken in the same order), so whatever split the kernel makes, the
        totals differ from 20 by at most 1 (see docs/workers.md).
        """
        servers = backends(3)
        lb = run(config(servers, pool={"balance": "least-connections"}))
        _, port = lb.address()
        held = []
        try:
            for _ in range(60):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(s)
                s.sendall(b"x")
                assert s.recv(1) == b"x"  # connected through to a backend
            wait_until(
                lambda: sum(b.live for b in servers) == 60, 10, "60 live connections"
            )
            counts = [b.live for b in servers]
        finally:
            for s in held:
                s.close()
        assert sum(counts) == 60
        assert all(19 <= c <= 21 for c in counts), counts
        lb.wait_for_closed(60)
        per_worker = served_by(lb)
        assert set(per_worker) == {0, 1}, per_worker


class TestSupervision:
    def test_killed_worker_is_restarted_and_service_continues(
        self, run: Callable[..., Workers], backends: Callable[[int], list[Backend]]
    ) -> None:
        """``kill -9`` of a worker: logged, restarted, and clients are served throughout."""
        lb = run(config(backends(1)))
        _, port = lb.address()
        victim = lb.pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: lb.events("worker exited"), 10, "the supervisor to notice")
        for i in range(10):  # the other worker serves at once
            assert echo_once(port, b"%d" % i) == b"%d" % i
        wait_until(lambda: len(lb.worker_lines("listening", 0)) == 2, 30, "restart")
        exited = [e for e in lb.events("worker exited") if e["index"] == 0]
        assert exited[0]["signal"] == "SIGKILL"
        assert exited[0]["pid"] == victim
        (restarting,) = lb.events("restarting")
        assert restarting["index"] == 0
        assert lb.pids()[0] != victim
        before = served_by(lb).get(0, 0)
        for _ in range(30):
            assert echo_once(port) == b"ping"
        wait_until(
            lambda: served_by(lb).get(0, 0) > before, 10, "the new worker 0 to serve"
        )
        assert lb.alive()

    def test_sighup_reaches_every_worker(
        self, run: Callable[..., Workers], backends: Callable[[int], list[Backend]]
    ) -> None:
        """SIGHUP to the supervisor makes each worker reload its certificates."""
        lb = run(config(backends(1)))
        lb.signal(signal.SIGHUP)
        wait_until(
            lambda: (
                {e["worker"] for e in lb.worker_lines("reloading tls certificates")}
                == {0, 1}
            ),
            10,
            "both workers to reload",
        )
        assert lb.alive()

    def test_sigterm_drains_and_exits(
        self, run: Callable[..., Workers], backends: Callable[[int], list[Backend]]
    ) -> None:
        """SIGTERM: workers stop accepting, an open connection finishes, then all exit."""
        lb = run(config(backends(1), shutdown_grace="10s"))
        host, port = lb.address()
        pids = set(lb.pids().values())
        client = socket.create_connection((host, port), timeout=10)
        try:
            client.sendall(b"a")
            assert client.recv(1) == b"a"
            lb.signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_until(lambda: port_refuses(host, port), 5, "new connects refused")
            wait_until(
                lambda: len(lb.worker_lines("stopping")) == 2, 5, "workers stopping"
            )
            client.sendall(b"b")  # still served during the grace period
            assert client.recv(1) == b"b"
            assert lb.alive()
        finally:
            client.close()
        status = lb.wait(10)
        assert time.monotonic() - signalled < 10
        assert status in CLEAN_EXIT, lb.output()
        stopped = lb.worker_lines("stopped")
        assert len(stopped) == 2
        # Readiness probes (port_refuses) may be accepted before a worker stops
        # listening; the held connection is the one that carried bytes.
        assert sum(e["finished_in_grace"] for e in stopped) >= 1
        assert all(e["closed_at_shutdown"] == 0 for e in stopped)
        held = [e for e in lb.closed_lines() if e["bytes_from_client"] > 0]
        assert [e["reason"] for e in held] == ["client closed"]
        assert all(e["drained"] for e in stopped)
        assert [e["exit_code"] for e in lb.events("worker exited")] == [0, 0]
        assert lb.events("supervisor stopped")
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
        assert "Traceback" not in lb.output()


def _is_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    return True


class TestOneHealthView:
    def test_probes_run_once_and_every_worker_follows(
        self, run: Callable[..., Workers], backends: Callable[[int], list[Backend]]
    ) -> None:
        """Probes come from one place; a dead backend leaves rotation in every worker."""
        interval = 0.5
        a, b = backends(2)
        lb = run(
            config(
                [a, b],
                pool={"balance": "round-robin"},
                health={"interval": interval, "jitter": "10%", "observe": False},
            )
        )
        _, port = lb.address()
        # Probe rate at backend a: at most one prober's worth. Each prober waits
        # at least interval * 0.9 between probes; two probers would double it.
        start = len(a.accepted)
        wait_until(lambda: len(a.accepted) - start >= 6, 20, "six probes")
        probes = a.accepted[start:]
        window = probes[-1] - probes[0]
        assert len(probes) - 1 <= window / (interval * 0.9) + 1, (len(probes), window)
        assert not lb.worker_lines("server down")
        a.kill()
        wait_until(lambda: lb.events("server down"), 15, "server down")
        (down,) = lb.events("server down")
        assert "worker" not in down  # decided by the supervisor, once
        before = len(b.accepted)
        for _ in range(30):
            assert echo_once(port) == b"ping"
        lines = lb.wait_for_closed(30)
        assert {line["server"] for line in lines} == {"b1"}
        assert {line["worker"] for line in lines} == {0, 1}
        assert len(b.accepted) - before >= 30


class TestHealthInWorkers:
    def test_on_down_close_closes_sessions_in_every_worker(
        self, run: Callable[..., Workers], backends: Callable[[int], list[Backend]]
    ) -> None:
        """A server marked down by the supervisor loses its live sessions in both workers."""
        data, check = backends(2)
        lb = run(
            config(
                [data],
                health={
                    "interval": 0.3,
                    "port": check.port,
                    "on_down": "close",
                    "fall": 1,
                },
            )
        )
        _, port = lb.address()
        held = []
        try:
            for _ in range(16):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(s)
                s.sendall(b"x")
                assert s.recv(1) == b"x"
            check.kill()  # the data server stays up: only the check fails
            lines = lb.wait_for_closed(16, timeout=20)
        finally:
            for s in held:
                s.close()
        assert {line["reason"] for line in lines} == {"server down"}
        assert {line["worker"] for line in lines} == {0, 1}
        (down,) = lb.events("server down")
        assert down["on_down"] == "close"

    def test_failed_connects_in_workers_reach_the_supervisor(
        self, run: Callable[..., Workers], backends: Callable[[int], list[Backend]]
    ) -> None:
        """``observe``: clients' refused connects in a worker mark the server down."""
        (live,) = backends(1)
        dead = Backend()
        dead.kill()  # nothing listens on its port any more
        text = config(
            [live],
            pool={"balance": "round-robin"},
            health={
                "interval": 60,
                "fall": 1,
                "observe": True,
            },
        ).replace(
            'name = "b0"\n',
            f'name = "b0"\n\n[[pool.p.server]]\naddress = "127.0.0.1:{dead.port}"\n'
            'name = "dead"\n',
        )
        lb = run(text)
        _, port = lb.address()
        wait_until(
            lambda: echo_once(port) == b"ping" and lb.events("server down"),
            20,
            "a refused client connect to mark the dead server down",
        )
        (down,) = lb.events("server down")
        assert down["server"] == "dead"
        assert down["reason"].startswith("client connect failed")
        assert "worker" not in down


class TestSecondSignal:
    def test_second_sigterm_closes_at_once_in_every_worker(
        self, run: Callable[..., Workers], backends: Callable[[int], list[Backend]]
    ) -> None:
        """A second SIGTERM during a long grace is passed on: workers close what is left."""
        lb = run(config(backends(1), shutdown_grace="60s"))
        host, port = lb.address()
        held = []
        try:
            for _ in range(8):
                s = socket.create_connection((host, port), timeout=10)
                held.append(s)
                s.sendall(b"x")
                assert s.recv(1) == b"x"
            lb.signal(signal.SIGTERM)
            wait_until(
                lambda: len(lb.worker_lines("stopping")) == 2, 10, "workers stopping"
            )
            lb.signal(signal.SIGTERM)
            signalled = time.monotonic()
            status = lb.wait(15)
        finally:
            for s in held:
                s.close()
        assert status in CLEAN_EXIT, lb.output()
        assert time.monotonic() - signalled < 10
        assert {line["reason"] for line in lb.closed_lines()} == {"shutdown"}
        assert len(lb.closed_lines()) == 8
        warnings = lb.worker_lines("second stop signal: closing connections now")
        assert {e["worker"] for e in warnings} == {0, 1}


def tls_config(tmp_path: Path, backends: list[Backend]) -> tuple[str, Any]:
    from tests.tls_material import TLSMaterial

    pki = TLSMaterial(tmp_path / "pki")
    live = pki.write(pki.server("first", "db.example.com"), "live")
    assert live.cert_path is not None and live.key_path is not None
    text = config(backends) + (
        "[frontend.f.tls]\n"
        f'certificates = [{{ cert = "{live.cert_path}", key = "{live.key_path}" }}]\n'
    )
    return text, (pki, live)


class TestBackoff:
    def test_worker_that_cannot_start_backs_off_then_recovers(
        self,
        tmp_path: Path,
        run: Callable[..., Workers],
        backends: Callable[[int], list[Backend]],
    ) -> None:
        """A restarted worker that fails at start is retried with growing delays; the other serves."""
        text, (pki, live) = tls_config(tmp_path, backends(1))
        lb = run(text)
        address = lb.address()
        good_key = live.key_path.read_bytes()
        live.key_path.write_text("not a key\n")
        os.kill(lb.pids()[0], signal.SIGKILL)
        wait_until(lambda: len(lb.events("restarting")) >= 3, 30, "three restarts")
        exits = [e for e in lb.events("worker exited") if e["index"] == 0]
        assert exits[0]["signal"] == "SIGKILL"
        assert [e["exit_code"] for e in exits[1:3]] == [1, 1]
        delays = [e["delay"] for e in lb.events("restarting")][:3]
        assert delays == [0.0, 0.5, 1.0]
        assert "frontend.f.tls.certificates[0].key" in lb.stderr()
        # Worker 1 still serves meanwhile.
        context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
        for _ in range(5):
            raw = socket.create_connection(address, timeout=10)
            with context.wrap_socket(raw, server_hostname="db.example.com") as tls:
                tls.sendall(b"ok")
                assert tls.recv(2) == b"ok"
        live.key_path.write_bytes(good_key)
        wait_until(
            lambda: len(lb.worker_lines("listening", 0)) == 2, 30, "worker 0 back"
        )
        assert lb.alive()


class TestTLS:
    def test_tls_frontend_and_certificate_reload_in_every_worker(
        self,
        tmp_path: Path,
        run: Callable[..., Workers],
        backends: Callable[[int], list[Backend]],
    ) -> None:
        """TLS is terminated in both workers, and SIGHUP gives both the new certificate."""
        from cryptography.hazmat.primitives import serialization

        from tests.tls_material import TLSMaterial

        pki = TLSMaterial(tmp_path / "pki")
        live = pki.write(pki.server("first", "db.example.com"), "live")
        assert live.cert_path is not None and live.key_path is not None
        text = config(backends(1)) + (
            "[frontend.f.tls]\n"
            f'certificates = [{{ cert = "{live.cert_path}", key = "{live.key_path}" }}]\n'
        )
        lb = run(text)
        address = lb.address()
        context = ssl.create_default_context(cafile=str(pki.ca.cert_path))

        def handshake() -> bytes:
            raw = socket.create_connection(address, timeout=10)
            with context.wrap_socket(raw, server_hostname="db.example.com") as tls:
                tls.sendall(b"hello")
                assert tls.recv(5) == b"hello"
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                return der

        def der(issued: Any) -> bytes:
            return issued.cert.public_bytes(serialization.Encoding.DER)

        assert {handshake() for _ in range(10)} == {der(live)}
        renewed = pki.write(pki.server("second", "db.example.com"), "live")
        lb.signal(signal.SIGHUP)
        wait_until(
            lambda: (
                {e["worker"] for e in lb.worker_lines("tls certificates reloaded")}
                == {0, 1}
            ),
            10,
            "both workers to reload",
        )
        assert {handshake() for _ in range(20)} == {der(renewed)}
        lines = lb.wait_for_closed(30)
        assert {line["worker"] for line in lines} == {0, 1}
