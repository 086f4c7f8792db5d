"""End-to-end failover: ``twistd -n l4lb`` with tcp health checks in front of three
real redis-servers, under a bounded client load, while one is killed with
SIGKILL and restarted on its port."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.e2e import CLEAN_EXIT, L4LB, free_port, start_redis, wait_until

pytestmark = pytest.mark.e2e

SLOW_START = 4.0


def failover_config(listen_port: int, ports: list[int]) -> str:
    servers = "".join(
        f'[[pool.redis.server]]\nname = "redis-{i}"\naddress = "127.0.0.1:{port}"\n'
        for i, port in enumerate(ports)
    )
    return f"""
[global]
log_format = "json"
shutdown_grace = "2s"

[frontend.redis]
listen = "127.0.0.1:{listen_port}"
pool = "redis"

[pool.redis]
balance = "round-robin"
connect_timeout = "1s"
retries = 3
queue_timeout = "5s"
{servers}
[pool.redis.health]
type = "tcp"
interval = "200ms"
fast_interval = "100ms"
down_interval = "200ms"
timeout = "500ms"
rise = 2
fall = 2
jitter = "10%"
observe = true
slow_start = "{SLOW_START:g}s"
"""


class Load:
    """Clients in threads: connect, PING, close, again; bounded in count and time."""

    def __init__(self, port: int, threads: int = 2, limit: int = 40000) -> None:
        self.port = port
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.done = 0
        self.limit = limit
        self.deadline = time.monotonic() + 120
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            with self._lock:
                if self.done >= self.limit:
                    return
            try:
                client = redis.Redis(
                    host="127.0.0.1",
                    port=self.port,
                    single_connection_client=True,
                    retry=Retry(NoBackoff(), 0),
                    socket_timeout=10,
                    socket_connect_timeout=5,
                )
                try:
                    if client.ping() is not True:
                        raise AssertionError("PING did not answer PONG")
                finally:
                    client.close()
            except Exception as e:
                with self._lock:
                    self.errors.append(f"{type(e).__name__}: {e}")
            with self._lock:
                self.done += 1

    def wait_for(self, more: int, timeout: float = 30) -> None:
        """Wait until ``more`` further client connections have finished."""
        target = self.done + more
        wait_until(lambda: self.done >= target, timeout, f"{more} more clients")


@contextlib.contextmanager
def redis_on(port: int, workdir: Path) -> Iterator[Any]:
    with start_redis(port, workdir) as process:
        yield process


def index_of(lines: list[dict[str, Any]], event: str, **fields: Any) -> int:
    for i, line in enumerate(lines):
        if line.get("event") == event and all(
            line.get(k) == v for k, v in fields.items()
        ):
            return i
    raise AssertionError(f"no {event} {fields} line")


def assert_no_failed_connect(lb: L4LB, load: Load) -> None:
    """Every client reached a backend (retries hid the dead one); the only
    client errors are sessions already on the killed server when it died
    (redis-py's handshake got its replies, then the server was gone)."""
    closed = lb.closed_lines()
    assert [e for e in closed if e["server"] is None] == []
    cut = [
        e for e in closed if e["server"] == "redis-2" and e["reason"] == "server closed"
    ]
    assert len(load.errors) <= len(cut), (load.errors, cut)


def seconds(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"]).timestamp()


def picked_after_down(lines: list[dict[str, Any]], server: str) -> list[Any]:
    """Connections to ``server`` that l4lb chose after logging it down.

    A line about ``server`` after the down line is fine only for a session
    that began before it (its pick was made then): a session still running,
    or a first connect attempt that was already on its way. Each session's
    start is its "connection closed" time minus its duration.
    """
    down = index_of(lines, "server down", server=server)
    down_at = seconds(lines[down])
    wrong = []
    for i in range(down + 1, len(lines)):
        line = lines[i]
        if line.get("server") != server:
            continue
        if line["event"] == "connection closed":
            if seconds(line) - line["duration"] >= down_at:
                wrong.append(line)
        elif line["event"] == "server connect failed":
            closed = next(
                e
                for e in lines[i + 1 :]
                if e.get("event") == "connection closed"
                and e["client"] == line["client"]
            )
            if line["attempt"] != 1 or seconds(closed) - closed["duration"] >= down_at:
                wrong.append(line)
    return wrong


class TestFailover:
    def test_kill_and_restart_a_backend_under_load(self, tmp_path: Path) -> None:
        """SIGKILL one of three redis backends: it leaves rotation with no failed
        client, and restarted it comes back after ``rise`` checks under slow start."""
        ports = [free_port() for _ in range(3)]
        lb = L4LB(tmp_path)
        with contextlib.ExitStack() as stack:
            processes = [stack.enter_context(redis_on(p, tmp_path)) for p in ports]
            stack.callback(lb.kill)
            lb.start(failover_config(free_port(), ports))
            _, lb_port = lb.address()
            load = stack.enter_context(Load(lb_port))
            wait_until(
                lambda: (
                    {e["server"] for e in lb.closed_lines()}
                    >= {"redis-0", "redis-1", "redis-2"}
                ),
                30,
                "every backend to serve clients",
            )

            processes[2].kill()  # SIGKILL
            processes[2].wait(10)
            wait_until(lambda: lb.events("server down"), 20, "the down line")
            (down,) = lb.events("server down")
            assert down["server"] == "redis-2"
            # A probe's refused connect, or a client's (refused, or reset when
            # it raced the kill).
            assert down["reason"].startswith(("connect ", "client connect failed: "))
            load.wait_for(300)
            assert picked_after_down(lb.lines(), "redis-2") == []
            assert_no_failed_connect(lb, load)

            stack.enter_context(redis_on(ports[2], tmp_path))
            wait_until(lambda: lb.events("server up"), 20, "the up line")
            wait_until(
                lambda: lb.events("slow start finished"),
                SLOW_START + 20,
                "slow start to finish",
            )
            load.wait_for(200)
            load.__exit__(None, None, None)
            assert lb.terminate() in CLEAN_EXIT
        lines = lb.lines()
        (up,) = lb.events("server up")
        assert up["server"] == "redis-2"
        assert up["reason"] == "connected"
        assert up["slow_start"] == SLOW_START
        # It came back after exactly `rise` (2) good checks: one going-up step.
        ramp = lines[
            index_of(lines, "server up") + 1 : index_of(lines, "slow start finished")
        ]
        closed = [e for e in ramp if e.get("event") == "connection closed"]
        assert len(closed) >= 100, len(closed)
        half = len(closed) // 2
        share = [
            sum(e["server"] == "redis-2" for e in part) / len(part)
            for part in (closed[:half], closed[half:])
        ]
        # Weight ramps from 5% to 100% of the others': round-robin gives it about
        # 10% of new clients in the first half and about 27% in the second.
        assert 0 < share[0] < share[1] < 1 / 3 + 0.05, share
        assert share[0] < 0.2, share
        after = lines[index_of(lines, "slow start finished") + 1 :]
        final = [e for e in after if e.get("event") == "connection closed"]
        assert sum(e["server"] == "redis-2" for e in final) > 0
        assert_no_failed_connect(lb, load)
        assert lb.events("stopped")
        assert not [e for e in lines if e.get("level") in ("error", "critical")]
