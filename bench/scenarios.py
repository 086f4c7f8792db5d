"""The scenarios: one real client run against one contender, returning figures.

Each ``Scenario`` names the backend it needs, the tools it runs, and the
metrics it returns (``Metric.key`` -> float).  ``run`` gets the ``Context`` of
the whole run (durations, rate estimates, connection counts) and a running
``Instance`` of a contender.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import env, parsers
from bench.contenders import Instance
from bench.procs import run
from bench.sink import tls_bulk_send

GIB = 1024**3


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True


@dataclass
class Context:
    """Settings shared by every scenario of a run."""

    duration: float  # seconds per measurement
    idle_connections: int
    pg_database: str | None = None
    # (scenario, contender) -> measured rate, used to size redis-benchmark -n
    rates: dict[tuple[str, str], float] = field(default_factory=dict)


Runner = Callable[[Context, Instance, "Scenario"], dict[str, float]]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    backend: str  # "iperf", "redis", "pg" or "sink"
    tools: tuple[str, ...]
    metrics: tuple[Metric, ...]
    runner: Runner
    tls: bool = False
    fresh: bool = False  # start a new contender instance for each measurement
    direct: bool = True  # meaningful without a proxy
    # rough rate of the slowest contender, to size the first run (redis-benchmark)
    first_rate: float = 0.0


# ---------------------------------------------------------------------------
# bulk: iperf3


def _iperf(args: list[str]) -> Runner:
    def runner(ctx: Context, inst: Instance, scenario: Scenario) -> dict[str, float]:
        host, port = inst.addresses["iperf"]
        seconds = max(1, round(ctx.duration))
        pids = inst.pids()
        cpu_before = env.cpu_seconds(pids)
        out = run(
            ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J", *args],
            timeout=seconds + 30,
        )
        cpu = env.cpu_seconds(pids) - cpu_before
        result = parsers.iperf3_json(out)
        figures = {"gbps": result["bits_per_second"] / 1e9}
        if pids:
            figures["cpu_s_per_gib"] = cpu / (result["bytes"] / GIB)
        return figures

    return runner


BULK_METRICS = (
    Metric("gbps", "Gbit/s", "Gbit/s"),
    Metric("cpu_s_per_gib", "proxy CPU s/GiB", "s/GiB", higher_is_better=False),
)

# ---------------------------------------------------------------------------
# redis-benchmark


def _redis_benchmark(args: list[str], test: str, latency: bool) -> Runner:
    def runner(ctx: Context, inst: Instance, scenario: Scenario) -> dict[str, float]:
        host, port = inst.addresses["redis"]
        key = (scenario.name, inst.contender)
        rate = ctx.rates.get(key)

        def once(requests: int) -> dict[str, float]:
            out = run(
                [
                    "redis-benchmark",
                    "-h",
                    host,
                    "-p",
                    str(port),
                    "-n",
                    str(requests),
                    "--csv",
                    *args,
                ],
                timeout=ctx.duration * 10 + 30,
            )
            return parsers.redis_benchmark_csv(out)[test]

        if rate is None:
            # First time for this pair: a short sizing run at the slowest
            # contender's rate (also a warm-up), then the real one.
            warm = once(max(200, int(scenario.first_rate * ctx.duration * 0.3)))
            rate = warm["rps"]
        row = once(max(500, int(rate * ctx.duration)))
        ctx.rates[key] = row["rps"]
        figures = {"rps": row["rps"]}
        if latency:
            figures["p50_ms"] = row["p50_latency_ms"]
            figures["p99_ms"] = row["p99_latency_ms"]
        return figures

    return runner


# ---------------------------------------------------------------------------
# idle memory


def hold_connections(
    host: str, port: int, count: int, batch: int = 500
) -> list[socket.socket]:
    """Open ``count`` connections and make each do one PING/PONG round trip.

    The round trip proves each one reaches the backend (so the proxy holds
    both sides) before memory is read; batches keep the accept backlog short.
    """
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            group = [
                socket.create_connection((host, port), timeout=30)
                for _ in range(min(batch, count - len(held)))
            ]
            held.extend(group)
            for s in group:
                s.sendall(b"PING\r\n")
            for s in group:
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = s.recv(64)
                    if not chunk:
                        raise RuntimeError("connection closed before PONG")
                    reply += chunk
                if reply != b"+PONG\r\n":  # e.g. -ERR max number of clients reached
                    raise RuntimeError(f"backend replied {reply!r} to PING")
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


def _idle_memory(ctx: Context, inst: Instance, scenario: Scenario) -> dict[str, float]:
    host, port = inst.addresses["redis"]
    for s in hold_connections(host, port, 20):  # warm-up: first-use allocations
        s.close()
    time.sleep(0.2)  # let the proxy finish closing the warm-up connections
    before = env.rss_kib(inst.pids())
    held = hold_connections(host, port, ctx.idle_connections)
    try:
        after = env.rss_kib(inst.pids())
    finally:
        for s in held:
            s.close()
    return {"kib_per_conn": (after - before) / ctx.idle_connections}


# ---------------------------------------------------------------------------
# TLS


def _tls_handshakes(
    ctx: Context, inst: Instance, scenario: Scenario
) -> dict[str, float]:
    host, port = inst.addresses["redis"]
    seconds = max(1, round(ctx.duration))
    start = time.monotonic()
    out = run(
        [
            "openssl",
            "s_time",
            "-connect",
            f"{host}:{port}",
            "-new",
            "-time",
            str(seconds),
        ],
        timeout=seconds + 30,
    )
    elapsed = time.monotonic() - start
    return {"handshakes_per_s": parsers.s_time_connections(out) / elapsed}


def _tls_bulk(ctx: Context, inst: Instance, scenario: Scenario) -> dict[str, float]:
    host, port = inst.addresses["sink"]
    pids = inst.pids()
    cpu_before = env.cpu_seconds(pids)
    result = tls_bulk_send(host, port, ctx.duration)
    cpu = env.cpu_seconds(pids) - cpu_before
    figures = {"gbps": result["bytes"] * 8 / result["seconds"] / 1e9}
    if pids:
        figures["cpu_s_per_gib"] = cpu / (result["bytes"] / GIB)
    return figures


# ---------------------------------------------------------------------------
# PostgreSQL


def _pgbench(args: list[str]) -> Runner:
    def runner(ctx: Context, inst: Instance, scenario: Scenario) -> dict[str, float]:
        assert ctx.pg_database
        host, port = inst.addresses["pg"]
        seconds = max(1, round(ctx.duration))
        out = run(
            [
                "pgbench",
                "-h",
                host,
                "-p",
                str(port),
                "-U",
                "postgres",
                "-n",
                "-S",
                "-c",
                "8",
                "-j",
                "2",
                "-T",
                str(seconds),
                *args,
                ctx.pg_database,
            ],
            timeout=seconds * 5 + 60,
        )
        return {"tps": parsers.pgbench(out)["tps"]}

    return runner


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "bulk", "bulk, iperf3 1 stream", "iperf", ("iperf3",), BULK_METRICS, _iperf([])
    ),
    Scenario(
        "bulk-reverse",
        "bulk reverse, iperf3 -R",
        "iperf",
        ("iperf3",),
        BULK_METRICS,
        _iperf(["-R"]),
    ),
    Scenario(
        "bulk-8",
        "bulk 8 streams, iperf3 -P 8",
        "iperf",
        ("iperf3",),
        BULK_METRICS,
        _iperf(["-P", "8"]),
    ),
    Scenario(
        "connect-rate",
        "new connections/s, redis-benchmark -k 0 -c 32 ping_inline",
        "redis",
        ("redis-benchmark",),
        (Metric("rps", "connections/s", "conn/s"),),
        _redis_benchmark(
            ["-k", "0", "-c", "32", "-t", "ping_inline"], "PING_INLINE", False
        ),
        first_rate=1200,
    ),
    Scenario(
        "get",
        "small requests, redis-benchmark GET -c 50",
        "redis",
        ("redis-benchmark",),
        (
            Metric("rps", "requests/s", "req/s"),
            Metric("p50_ms", "p50 latency", "ms", higher_is_better=False),
            Metric("p99_ms", "p99 latency", "ms", higher_is_better=False),
        ),
        _redis_benchmark(["-k", "1", "-c", "50", "-t", "get"], "GET", True),
        first_rate=8000,
    ),
    Scenario(
        "pipelined",
        "pipelined GET, redis-benchmark -c 50 -P 32",
        "redis",
        ("redis-benchmark",),
        (Metric("rps", "requests/s", "req/s"),),
        _redis_benchmark(
            ["-k", "1", "-c", "50", "-P", "32", "-t", "get"], "GET", False
        ),
        first_rate=300000,
    ),
    Scenario(
        "idle-memory",
        "idle memory per proxied connection",
        "redis",
        (),
        (Metric("kib_per_conn", "KiB per connection", "KiB", higher_is_better=False),),
        _idle_memory,
        fresh=True,
        direct=False,
    ),
    Scenario(
        "tls-handshakes",
        "TLS handshakes/s, openssl s_time -new (ECDSA P-256)",
        "redis",
        ("openssl",),
        (Metric("handshakes_per_s", "handshakes/s", "hs/s"),),
        _tls_handshakes,
        tls=True,
        direct=False,
    ),
    Scenario(
        "tls-bulk",
        "TLS bulk, Python ssl client -> discard server",
        "sink",
        (),
        BULK_METRICS,
        _tls_bulk,
        tls=True,
        direct=False,
    ),
    Scenario(
        "pgbench",
        "pgbench -S -c 8",
        "pg",
        ("pgbench", "psql"),
        (Metric("tps", "transactions/s", "tps"),),
        _pgbench([]),
    ),
    Scenario(
        "pgbench-connect",
        "pgbench -S -C -c 8 (new connection per transaction)",
        "pg",
        ("pgbench", "psql"),
        (Metric("tps", "transactions/s", "tps"),),
        _pgbench(["-C"]),
    ),
)


def by_name(names: list[str]) -> list[Scenario]:
    """The scenarios named, in the standard order; ValueError for an unknown name."""
    known = {s.name for s in SCENARIOS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}"
        )
    return [s for s in SCENARIOS if s.name in names]
