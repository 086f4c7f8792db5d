"""End-to-end: ``twistd -n l4lb`` as a subprocess in front of real servers.

Redis instances are started per test on free ports; PostgreSQL is the machine's
own (127.0.0.1:5432, trust auth). Every wait polls a condition with a deadline
and every load loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import resource
import select
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.e2e import (
    CLEAN_EXIT,
    L4LB,
    free_port,
    l4lb_config,
    port_refuses,
    start_redis,
    wait_until,
)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
GiB = 1024 * MiB


@pytest.fixture
def run_l4lb(tmp_path: Path) -> Iterator[Callable[..., L4LB]]:
    """Start l4lb processes: ``run(config, **start_options)``; killed at teardown."""
    runners: list[L4LB] = []

    def run(config: str | None = None, **options: Any) -> L4LB:
        runner = L4LB(tmp_path, name=f"l4lb-{len(runners)}")
        runners.append(runner)
        return runner.start(config, **options)

    yield run
    for runner in runners:
        runner.kill()


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[Callable[[int], list[int]]]:
    """Start ``n`` throwaway redis-servers and get their ports; stopped at teardown."""
    with contextlib.ExitStack() as stack:

        def start(n: int) -> list[int]:
            ports = [free_port() for _ in range(n)]
            for port in ports:
                stack.enter_context(start_redis(port, tmp_path))
            return ports

        yield start


def redis_client(port: int) -> redis.Redis:
    """A redis-py client on one socket that never silently reconnects."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        single_connection_client=True,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=10,
        socket_connect_timeout=5,
    )


def held_reasons(lb: L4LB) -> list[str]:
    """Reasons of the connections that carried client bytes (not readiness probes)."""
    return [e["reason"] for e in lb.closed_lines() if e["bytes_from_client"] > 0]


def redis_config(ports: list[int], **global_: object) -> str:
    """One frontend on a free port in front of the redis servers on ``ports``."""
    return l4lb_config(
        frontends={"redis": {"listen": f"127.0.0.1:{free_port()}", "pool": "redis"}},
        pools={
            "redis": {
                "balance": "least-connections",
                "servers": [
                    {"address": f"127.0.0.1:{port}", "name": f"redis-{i}"}
                    for i, port in enumerate(ports)
                ],
            }
        },
        **global_,
    )


def connections_received(ports: list[int]) -> list[int]:
    """Each redis server's total_connections_received (counts this query's own)."""
    totals = []
    for port in ports:
        admin = redis_client(port)
        try:
            totals.append(admin.info("stats")["total_connections_received"])
        finally:
            admin.close()
    return totals


class TestRedis:
    def test_benchmark_then_connections_spread_evenly(
        self, run_l4lb: Callable[..., L4LB], redis_servers: Callable[[int], list[int]]
    ) -> None:
        """redis-benchmark passes through l4lb, and 30 held clients spread 10/10/10."""
        ports = redis_servers(3)
        lb = run_l4lb(redis_config(ports))
        host, port = lb.address()

        before = connections_received(ports)
        bench = subprocess.run(
            ["redis-benchmark", "-h", host, "-p", str(port),
             "-c", "30", "-n", "3000", "-t", "ping,set,get", "-q"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stdout + bench.stderr
        results = [
            line for line in bench.stdout.splitlines() if "requests per second" in line
        ]
        assert len(results) >= 3, bench.stdout
        # Each backend connection is one l4lb session (no retries while all are up);
        # the "- 1" is the INFO query's own connection.
        per_server = [
            a - b - 1 for a, b in zip(connections_received(ports), before, strict=True)
        ]
        assert all(n > 0 for n in per_server), per_server
        # Every backend connection is a session or a retried attempt: on a
        # machine loaded enough that a connect times out after the server
        # accepted it, that server counts a connection the session gave up.
        wait_until(
            lambda: (
                sum(1 + line["retries"] for line in lb.closed_lines())
                >= sum(per_server)
            ),
            30,
            f"sessions and retries for {sum(per_server)} backend connections"
            f" (seen: {len(lb.closed_lines())} closed lines,"
            f" {len(lb.events('server connect failed'))} failed connects)",
        )
        bench_lines = lb.closed_lines()
        sessions = len(bench_lines)
        if all(line["retries"] == 0 for line in bench_lines):
            assert sessions == sum(per_server)
            assert Counter(line["server"] for line in bench_lines) == {
                f"redis-{i}": n for i, n in enumerate(per_server)
            }
        else:  # only a loaded machine's connect timeouts may cause retries
            failed = lb.events("server connect failed")
            assert failed, bench_lines
            assert all(e["error"].startswith("timed out") for e in failed), failed

        clients = [redis_client(port) for _ in range(30)]
        try:
            for i, client in enumerate(clients):
                assert client.ping() is True
                assert client.client_setname(f"e2e-held-{i}") is True
            held = []
            for backend in ports:
                admin = redis_client(backend)
                try:
                    names = [c["name"] for c in admin.client_list()]
                finally:
                    admin.close()
                held.append(sum(name.startswith("e2e-held-") for name in names))
            assert held == [10, 10, 10]
        finally:
            for client in clients:
                client.close()

        lines = lb.wait_for_closed(sessions + 30)[sessions:]
        assert Counter(line["server"] for line in lines) == {
            "redis-0": 10, "redis-1": 10, "redis-2": 10
        }  # fmt: skip
        assert len({line["client"] for line in lines}) == 30
        for line in lines:
            assert line["frontend"] == "redis"
            assert line["pool"] == "redis"
            assert line["reason"] == "client closed"
            assert line["retries"] == 0
            assert line["bytes_from_client"] > 0
            assert line["bytes_from_server"] > 0


class TestPostgres:
    def test_queries_copy_and_psql(self, run_l4lb: Callable[..., L4LB]) -> None:
        """psycopg and psql work through l4lb, and the log counts the bytes."""
        lb = run_l4lb(
            l4lb_config(
                frontends={"pg": {"listen": f"127.0.0.1:{free_port()}", "pool": "pg"}},
                pools={
                    "pg": {
                        "balance": "first",
                        "servers": [{"address": "127.0.0.1:5432", "name": "postgres"}],
                    }
                },
            )
        )
        host, port = lb.address()

        with psycopg.connect(
            host=host, port=port, user="postgres", dbname="postgres", connect_timeout=10
        ) as conn:
            with socket.socket(fileno=conn.pgconn.socket) as sock:
                client = "{}:{}".format(*sock.getsockname())
                sock.detach()  # the fd stays psycopg's
            assert conn.execute("SELECT 1").fetchone() == (1,)
            (big,) = conn.execute("SELECT repeat('x', 1000000)").fetchone()
            assert big == "x" * 1_000_000
            copied = bytearray()
            query = "SELECT g, md5(g::text) FROM generate_series(1, 10000) g"
            with conn.cursor().copy(f"COPY ({query}) TO STDOUT") as copy:
                for block in copy:
                    copied += block
            rows = bytes(copied).decode().splitlines()
            assert len(rows) == 10000
            assert rows[-1].split("\t") == ["10000", hashlib.md5(b"10000").hexdigest()]
        (line,) = lb.wait_for_closed(1)
        assert line["client"] == client
        assert (line["frontend"], line["pool"], line["server"]) == (
            "pg",
            "pg",
            "postgres",
        )
        assert line["bytes_from_server"] > 1_000_000 + len(copied)
        assert 0 < line["bytes_from_client"] < 100_000
        assert line["retries"] == 0
        assert line["connect_time"] is not None and line["connect_time"] >= 0
        # psycopg sends Terminate and closes; PostgreSQL closes on Terminate, so
        # both FINs reach l4lb in the same instant and either may be seen first.
        assert line["reason"] in ("client closed", "server closed")

        psql = subprocess.run(
            ["psql", "-X", "-w", "-h", host, "-p", str(port), "-U", "postgres",
             "-d", "postgres", "-A", "-t", "-c", "select 42"],
            capture_output=True, text=True, timeout=30,
            env={"PGCONNECT_TIMEOUT": "10", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert psql.returncode == 0, psql.stderr
        assert psql.stdout.strip() == "42"
        line = lb.wait_for_closed(2)[1]
        assert (line["pool"], line["server"]) == ("pg", "postgres")
        assert line["bytes_from_client"] > 0 and line["bytes_from_server"] > 0


class TestGracefulStop:
    def test_sigterm_drains_open_connection(
        self, run_l4lb: Callable[..., L4LB], redis_servers: Callable[[int], list[int]]
    ) -> None:
        """After SIGTERM new clients are refused, open ones finish, then l4lb exits."""
        lb = run_l4lb(redis_config(redis_servers(1), shutdown_grace="5s"))
        host, port = lb.address()
        client = redis_client(port)
        try:
            assert client.ping() is True
            client_id = client.client_id()
            lb.signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_until(
                lambda: port_refuses(host, port), 2, "new connects to be refused"
            )
            assert lb.alive()
            assert client.ping() is True
            assert client.client_id() == client_id  # still the same backend connection
            assert lb.alive()
        finally:
            client.close()
        status = lb.wait(5)
        elapsed = time.monotonic() - signalled
        assert status in CLEAN_EXIT, lb.output()
        assert elapsed < 5
        (stopping,) = lb.events("stopping")
        assert stopping["live_connections"] >= 1
        (stopped,) = lb.events("stopped")
        assert stopped["closed_at_shutdown"] == 0
        assert stopped["drained"] is True
        assert held_reasons(lb) == ["client closed"]

    def test_connection_past_grace_is_closed(
        self, run_l4lb: Callable[..., L4LB], redis_servers: Callable[[int], list[int]]
    ) -> None:
        """A connection still open when the grace period ends is closed and logged."""
        lb = run_l4lb(redis_config(redis_servers(1), shutdown_grace="1s"))
        _, port = lb.address()
        client = redis_client(port)
        try:
            assert client.ping() is True
            lb.signal(signal.SIGTERM)
            signalled = time.monotonic()
            status = lb.wait(10)
            elapsed = time.monotonic() - signalled
            with pytest.raises(redis.ConnectionError):
                client.ping()
        finally:
            client.close()
        assert status in CLEAN_EXIT, lb.output()
        assert 0.9 <= elapsed < 10
        (line,) = lb.closed_lines()
        assert line["reason"] == "shutdown"
        assert line["server"] == "redis-0"
        (stopped,) = lb.events("stopped")
        assert stopped["closed_at_shutdown"] == 1
        assert stopped["drained"] is False

    def test_second_signal_closes_at_once(
        self, run_l4lb: Callable[..., L4LB], redis_servers: Callable[[int], list[int]]
    ) -> None:
        """A second SIGTERM during a long grace period closes what is left and exits."""
        lb = run_l4lb(redis_config(redis_servers(1), shutdown_grace="60s"))
        host, port = lb.address()
        client = redis_client(port)
        try:
            assert client.ping() is True
            lb.signal(signal.SIGTERM)
            wait_until(lambda: port_refuses(host, port), 2, "new connects refused")
            assert client.ping() is True  # still served in the grace period
            lb.signal(signal.SIGTERM)
            signalled = time.monotonic()
            status = lb.wait(10)
            elapsed = time.monotonic() - signalled
        finally:
            client.close()
        assert status in CLEAN_EXIT, lb.output()
        assert elapsed < 5
        assert "Traceback" not in lb.output()
        (warning,) = lb.events("second stop signal: closing connections now")
        assert warning["live_connections"] == 1
        assert held_reasons(lb) == ["shutdown"]
        (stopped,) = lb.events("stopped")
        assert stopped["closed_at_shutdown"] == 1

    @pytest.mark.parametrize("close_in_grace", [True, False], ids=["drained", "cut"])
    def test_stopped_is_the_last_line(
        self,
        run_l4lb: Callable[..., L4LB],
        redis_servers: Callable[[int], list[int]],
        close_in_grace: bool,
    ) -> None:
        """The stop's last line, "stopped", follows every connection's closed line."""
        lb = run_l4lb(redis_config(redis_servers(1), shutdown_grace="1s"))
        _, port = lb.address()
        client = redis_client(port)
        try:
            assert client.ping() is True
            lb.signal(signal.SIGTERM)
            if close_in_grace:
                wait_until(lambda: lb.events("stopping"), 5, "the stopping line")
                client.close()
            lb.wait(10)
        finally:
            client.close()
        events = [line["event"] for line in lb.lines()]
        closed = [i for i, event in enumerate(events) if event == "connection closed"]
        assert len(closed) == 1, events
        assert events.index("stopped") > closed[0], events[events.index("stopping") :]


def twistd_l4lb(
    args: list[str], cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``twistd -n l4lb ARGS`` to completion."""
    return subprocess.run(
        L4LB(cwd).command(args),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class TestConfigErrors:
    @staticmethod
    def config(frontend_port: int, server_address: str, balance: str = "first") -> str:
        return l4lb_config(
            frontends={"f": {"listen": f"127.0.0.1:{frontend_port}", "pool": "x"}},
            pools={"x": {"balance": balance, "servers": [{"address": server_address}]}},
        )

    def test_bad_config_exits_1_and_listens_nowhere(self, tmp_path: Path) -> None:
        """A config error exits 1, names the key on stderr, and binds nothing."""
        port = free_port()
        (tmp_path / "bad.toml").write_text(self.config(port, "127.0.0.1:70000"))
        result = twistd_l4lb(["--config", "bad.toml"], tmp_path)
        assert result.returncode == 1, result
        assert re.search(
            r"^bad\.toml: pool\.x\.server\[0\]\.address: .*70000", result.stderr, re.M
        ), result.stderr
        assert "listening" not in result.stdout
        assert port_refuses("127.0.0.1", port)

    def test_check_accepts_good_file(self, tmp_path: Path) -> None:
        """--check on a valid file exits 0 and says so."""
        (tmp_path / "good.toml").write_text(self.config(free_port(), "127.0.0.1:6379"))
        result = twistd_l4lb(["--check", "--config", "good.toml"], tmp_path)
        assert result.returncode == 0, result
        assert "good.toml: configuration is valid" in result.stdout

    def test_check_accepts_example_config(self, tmp_path: Path) -> None:
        """The commented example etc/l4lb.toml is valid."""
        example = Path(__file__).resolve().parent.parent / "etc" / "l4lb.toml"
        result = twistd_l4lb(["--check", "--config", str(example)], tmp_path)
        assert result.returncode == 0, result

    def test_check_lists_every_problem(self, tmp_path: Path) -> None:
        """--check on a file with two problems exits 1 and prints one line for each."""
        (tmp_path / "bad.toml").write_text(
            self.config(free_port(), "127.0.0.1:70000", balance="fastest")
        )
        result = twistd_l4lb(["--check", "--config", "bad.toml"], tmp_path)
        assert result.returncode == 1, result
        problems = re.findall(r"^bad\.toml: (\S+): ", result.stderr, re.M)
        assert sorted(problems) == ["pool.x.balance", "pool.x.server[0].address"], (
            result.stderr
        )
        assert "2 problem(s) found" in result.stderr

    def test_missing_config_option_is_a_usage_error(self, tmp_path: Path) -> None:
        """Without --config (or --demo) twistd exits non-zero with a usage message."""
        result = twistd_l4lb([], tmp_path)
        assert result.returncode != 0
        output = result.stdout + result.stderr
        assert "Usage:" in output
        assert "--config PATH is required" in output

    def test_address_in_use_exits_promptly(self, tmp_path: Path) -> None:
        """A frontend that cannot bind stops start-up with an error naming it."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            (tmp_path / "inuse.toml").write_text(self.config(port, "127.0.0.1:6379"))
            started = time.monotonic()
            result = twistd_l4lb(["--config", "inuse.toml"], tmp_path, timeout=20)
            elapsed = time.monotonic() - started
        assert result.returncode != 0, result
        assert elapsed < 10
        output = result.stdout + result.stderr
        assert f"frontend.f: cannot listen on 127.0.0.1:{port}" in output, output
        assert '"event": "listening"' not in result.stdout


class TestDemo:
    def test_three_backends_greet_and_echo(self, run_l4lb: Callable[..., L4LB]) -> None:
        """--demo spreads three clients over three named echo backends."""
        listen = f"127.0.0.1:{free_port()}"
        lb = run_l4lb(
            args=["--demo", "--demo-listen", listen],
            ready=lambda runner: f"address={listen}" in runner.stdout(),
        )
        host, _, port = listen.rpartition(":")
        conns = [
            socket.create_connection((host, int(port)), timeout=10) for _ in range(3)
        ]
        try:
            readers = [conn.makefile("rb") for conn in conns]
            greetings = [reader.readline().decode() for reader in readers]
            assert sorted(greetings) == [f"hello from backend-{n}\n" for n in (1, 2, 3)]
            name = greetings[0].split()[-1]
            conns[0].sendall(b"echo me\n")
            assert readers[0].readline() == f"{name}: echo me\n".encode()
            for reader in readers:
                reader.close()  # a socket with an open makefile() stays open
        finally:
            for conn in conns:
                conn.close()
        stopping = time.monotonic()
        assert lb.terminate() in CLEAN_EXIT, lb.output()
        # The clients are gone, so the stop does not wait out the demo's 2 s grace.
        assert time.monotonic() - stopping < 2, lb.output()


class BulkSender:
    """A backend that sends ``total`` pseudo-random bytes to one client, then closes.

    Runs in a thread; ``sent`` is its progress counter and ``digest`` the SHA-256
    of everything sent. Every socket operation has a timeout, so it cannot hang.
    """

    CHUNK = MiB
    SLICE = 64 * 1024

    def __init__(self, total: int, timeout: float = 60.0) -> None:
        self.total = total
        self.sent = 0
        self.digest: str | None = None
        self.error: BaseException | None = None
        self._timeout = timeout
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(timeout)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self._listener.accept()
            with conn:
                conn.settimeout(self._timeout)
                sha = hashlib.sha256()
                base = random.Random(1).randbytes(self.CHUNK)
                for index in range(self.total // self.CHUNK):
                    # Each chunk differs, so a lost or repeated chunk changes the hash.
                    chunk = memoryview(index.to_bytes(8, "big") + base[8:])
                    sha.update(chunk)
                    for start in range(0, self.CHUNK, self.SLICE):
                        conn.sendall(chunk[start : start + self.SLICE])
                        self.sent += self.SLICE
                self.digest = sha.hexdigest()
        except BaseException as error:
            self.error = error
        finally:
            self._listener.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "sender still running"
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._listener.close()


def wait_for_stall(progress: Callable[[], int], quiet: float, timeout: float) -> int:
    """Wait until ``progress()`` has not changed for ``quiet`` seconds; its value."""
    last = progress()
    since = time.monotonic()

    def stalled() -> bool:
        nonlocal last, since
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
            return False
        return time.monotonic() - since >= quiet

    wait_until(stalled, timeout, f"the sender to stall for {quiet:g}s", interval=0.05)
    return last


def recv_exactly(sock: socket.socket, count: int, sha: Any) -> None:
    """Read ``count`` bytes into ``sha``; fail on a premature end."""
    buffer = bytearray(256 * 1024)
    view = memoryview(buffer)
    while count > 0:
        n = sock.recv_into(view, min(count, len(buffer)))
        assert n > 0, "connection ended early"
        sha.update(view[:n])
        count -= n


@pytest.mark.slow
class TestSlowReader:
    @pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
    def test_one_gib_to_a_stalled_reader_keeps_memory_bounded(
        self, run_l4lb: Callable[..., L4LB], tmp_path: Path, splice: bool
    ) -> None:
        """A client that stops reading stalls the backend instead of filling RAM."""
        started = time.monotonic()
        sender = BulkSender(GiB)
        try:
            lb = run_l4lb(
                l4lb_config(
                    frontends={
                        "bulk": {"listen": f"127.0.0.1:{free_port()}", "pool": "b"}
                    },
                    pools={"b": {"servers": [{"address": f"127.0.0.1:{sender.port}"}]}},
                    splice=splice,
                )
            )
            baseline = lb.rss_kib()
            cpu_before = lb.cpu_seconds()
            sha = hashlib.sha256()
            with socket.create_connection(lb.address(), timeout=60) as client:
                recv_exactly(client, MiB, sha)
                stalled_at = wait_for_stall(lambda: sender.sent, quiet=1.0, timeout=60)
                growth = lb.rss_kib() - baseline
                print(
                    f"\nslow reader: sender stalled at {stalled_at / MiB:.1f} MiB,"
                    f" l4lb RSS {baseline / 1024:.1f} MiB idle,"
                    f" +{growth / 1024:.2f} MiB while stalled"
                )
                assert stalled_at < GiB
                assert growth < 32 * 1024, f"RSS grew by {growth} KiB"
                recv_exactly(client, GiB - MiB, sha)
                client.settimeout(10)
                assert client.recv(1) == b"", "more than 1 GiB arrived"
            sender.join(30)
            assert sha.hexdigest() == sender.digest
            (line,) = lb.wait_for_closed(1, timeout=20)
            # Indicative only (shared machine): l4lb's CPU time for this GiB.
            print(f"slow reader: l4lb CPU {lb.cpu_seconds() - cpu_before:.2f} s/GiB")
            assert line["bytes_from_server"] == GiB
            assert line["bytes_from_client"] == 0
            peak = lb.peak_rss_kib() - baseline
            print(
                f"slow reader: peak RSS +{peak / 1024:.2f} MiB over idle,"
                f" run time {time.monotonic() - started:.1f}s"
            )
        finally:
            sender.close()


def set_low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


class TestOutOfFileDescriptors:
    def test_emfile_neither_kills_nor_spins(
        self, run_l4lb: Callable[..., L4LB], redis_servers: Callable[[int], list[int]]
    ) -> None:
        """With 64 fds and 80 clients, l4lb stays up, idles, and recovers after."""
        lb = run_l4lb(redis_config(redis_servers(1)), preexec_fn=set_low_fd_limit)
        address = lb.address()

        clients: list[socket.socket] = []
        connect_failures = 0
        for _ in range(80):
            try:
                clients.append(socket.create_connection(address, timeout=2))
            except OSError:
                connect_failures += 1
        for client in clients:
            with contextlib.suppress(OSError):
                client.sendall(b"PING\r\n")
        # Collect each client's outcome, for at most 5 s in all.
        outcome: dict[socket.socket, str] = {}
        deadline = time.monotonic() + 5
        while len(outcome) < len(clients) and time.monotonic() < deadline:
            pending = [c for c in clients if c not in outcome]
            readable, _, _ = select.select(pending, [], [], 0.2)
            for client in readable:
                try:
                    data = client.recv(64)
                except OSError:
                    data = b""
                outcome[client] = "PONG" if data.startswith(b"+PONG") else "closed"
        counts = Counter(outcome.get(c, "no answer") for c in clients)

        try:
            assert lb.alive(), lb.output()
            cpu_before = lb.cpu_seconds()
            time.sleep(1.0)  # a measurement window, not a wait for a condition
            cpu_used = lb.cpu_seconds() - cpu_before
            assert lb.alive(), lb.output()
        finally:
            for client in clients:
                client.close()

        # Twisted's EMFILE lines name each client: count them by their text without it.
        events = Counter(
            re.sub(r" from \(.*\)$", " from ...", str(line.get("event")))
            for line in lb.lines()
        )
        print(
            f"\nEMFILE: {len(clients)} connected, {connect_failures} connect failures,"
            f" outcomes {dict(counts)}, l4lb CPU {cpu_used:.3f}s over 1s,"
            f" log events {dict(events)}"
        )
        assert counts["PONG"] > 0
        assert cpu_used < 0.25, f"l4lb used {cpu_used:.2f}s CPU in 1s while idle"

        # Until the closes above free l4lb's fds, a new client may still be
        # accepted and dropped (Twisted's EMFILE recovery): retry until served.
        wait_until(lambda: _ping_ok(address[1]), 10, "a fresh client to be served")
        assert lb.alive()


def _ping_ok(port: int) -> bool:
    """One PING on a new connection (redis-py connects in the constructor)."""
    try:
        client = redis_client(port)
    except redis.RedisError:
        return False
    try:
        return client.ping() is True
    except redis.RedisError:
        return False
    finally:
        client.close()
