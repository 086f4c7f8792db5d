"""The servers behind the proxies, started (and removed) by the benchmark.

Its own ``redis-server`` (no persistence) and ``iperf3 -s`` on free ports, a
discard server for TLS bulk, and a scratch database in the machine's
PostgreSQL (created here, dropped at the end; no other database is touched).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from bench import env
from bench.procs import Process, StartError, free_port, run, stop_all

PG_HOST, PG_PORT = "127.0.0.1", 5432


def certificate(directory: Path) -> tuple[Path, Path]:
    """A fresh self-signed ECDSA P-256 certificate and key (openssl CLI)."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    run(
        [
            "openssl",
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            str(key),
        ],
        30,
    )
    run(
        [
            "openssl",
            "req",
            "-new",
            "-x509",
            "-key",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ],
        30,
    )
    return cert, key


class Backends:
    """Start what the selected scenarios need; ``problems`` names what could not."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[Process] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self.problems: dict[str, str] = {}
        self.pg_database: str | None = None

    def _start(self, kind: str, name: str, argv: list[str], port: int) -> None:
        """Run ``argv`` as ``name`` listening on ``port``, or say why not in problems."""
        if not env.find_tool(argv[0]):
            self.problems[kind] = env.missing_message(argv[0])
            return
        process = Process(name, argv, self.workdir)
        try:
            process.start()
            self.processes.append(process)
            process.wait_listening([port])
        except (StartError, OSError) as e:
            self.problems[kind] = str(e)
            return
        self.addresses[kind] = ("127.0.0.1", port)

    def start(self, kinds: set[str], max_clients: int) -> None:
        if "redis" in kinds:
            port = free_port()
            self._start(
                "redis",
                "redis-server",
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--maxclients",
                    str(max_clients),
                    "--logfile",
                    "",
                ],
                port,
            )
        if "iperf" in kinds:
            port = free_port()
            self._start(
                "iperf",
                "iperf3-server",
                ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
                port,
            )
        if "sink" in kinds:
            port = free_port()
            self._start(
                "sink", "sink", [sys.executable, "-m", "bench.sink", str(port)], port
            )
        if "pg" in kinds:
            self._create_database()

    def _create_database(self) -> None:
        for tool in ("psql", "pgbench"):
            if not env.find_tool(tool):
                self.problems["pg"] = env.missing_message(tool)
                return
        name = f"l4lb_bench_{os.getpid()}"
        try:
            self._psql(f'CREATE DATABASE "{name}"')
            self.pg_database = name
            run(
                [
                    "pgbench",
                    "-h",
                    PG_HOST,
                    "-p",
                    str(PG_PORT),
                    "-U",
                    "postgres",
                    "-i",
                    "-q",
                    "-s",
                    "1",
                    name,
                ],
                120,
            )
        except RuntimeError as e:
            self.problems["pg"] = f"PostgreSQL at {PG_HOST}:{PG_PORT}: {e}"
            return
        self.addresses["pg"] = (PG_HOST, PG_PORT)

    def _psql(self, sql: str) -> None:
        run(
            [
                "psql",
                "-h",
                PG_HOST,
                "-p",
                str(PG_PORT),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-qAtc",
                sql,
            ],
            60,
        )

    def stop(self) -> None:
        stop_all(self.processes)
        if self.pg_database:
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                self._psql(f'DROP DATABASE IF EXISTS "{self.pg_database}" WITH (FORCE)')
            self.pg_database = None


@contextlib.contextmanager
def started(workdir: Path, kinds: set[str], max_clients: int) -> Iterator[Backends]:
    backends = Backends(workdir)
    try:
        backends.start(kinds, max_clients)
        yield backends
    finally:
        backends.stop()
