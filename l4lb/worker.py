"""One worker process: ``python -m l4lb.worker --config PATH --index N``.

Started by the supervisor (`l4lb.supervisor`) when ``[global] workers`` is
above 1. It is the single-process l4lb with three differences: it listens on
``SO_REUSEPORT`` sockets shared with the other workers (`l4lb.reuseport`), it
runs no health probes but follows the server states the supervisor writes to
its stdin (`l4lb.workerlink`), and it reports failed client connects to the
supervisor on descriptor 3. Its log lines carry ``worker=N``.

Signals are the supervisor's to send: SIGTERM/SIGINT drain and stop (a second
one closes what is left), SIGHUP reloads TLS certificates. The worker leaves
the terminal's process group, so a Ctrl-C reaches the supervisor only, which
passes it on exactly once. When its stdin closes (the supervisor is gone) the
worker stops gracefully instead of serving unsupervised.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import structlog
from twisted.internet import stdio
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogBeginner
from twisted.python.failure import Failure

from l4lb import fastpoll, runloop
from l4lb.config import ConfigError, load_config
from l4lb.logs import TwistedBridge, configure_logging
from l4lb.pool import Pool, ServerState
from l4lb.reuseport import ReusePortEndpoint
from l4lb.service import L4LBService
from l4lb.tls.backend import check_backend_tls
from l4lb.tls.certificates import check_config as check_certificates
from l4lb.workerlink import (
    LineBuffer,
    apply_states,
    connect_failed_line,
    parse_line,
)

log = structlog.get_logger("l4lb.worker")

EVENTS_FD = 3  # worker → supervisor: passive health observations


class HealthFollower(Protocol):
    """Applies the supervisor's server states to this worker's pools.

    Connected to stdin (states in) and descriptor 3 (observations out).
    """

    def __init__(self, service: L4LBService, on_lost: Any = None) -> None:
        self.service = service
        self.pools = service.pools
        self.lines = LineBuffer()
        self.on_lost = on_lost
        for pool in self.pools.values():
            health = pool.config.health
            if health is not None and health.observe:
                pool.on_connect_failed = self._observed(pool)

    def _observed(self, pool: Pool) -> Any:
        def connect_failed(server: ServerState, why: str) -> None:
            if self.transport is not None:
                self.transport.write(connect_failed_line(pool.name, server.name, why))

        return connect_failed

    def dataReceived(self, data: bytes) -> None:
        for line in self.lines.feed(data):
            self.apply_line(line)

    def apply_line(self, line: bytes) -> None:
        message = parse_line(line)
        if message is None:
            log.error("bad line from supervisor", line=line[:200].decode("replace"))
            return
        pools, went_down = apply_states(self.pools, message)
        for server in went_down:
            pool = next(p for p in pools if server in p.servers)
            health = pool.config.health
            if health is not None and health.on_down == "close":
                for session in list(server.sessions):
                    session.close("server down")
        for pool in pools:
            pool.changed()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.on_lost is not None:
            self.on_lost()


def read_first_line(fd: int) -> tuple[bytes, bytes]:
    """Block until one whole line arrives on ``fd``: (the line, what came after it).

    Used once before the reactor runs, so the snapshot of server states is in
    place before the first client is accepted.
    """
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("l4lb worker: stdin closed before the server snapshot")
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line, rest


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m l4lb.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="FRONTEND=PORT",
        help="the port the supervisor bound for FRONTEND (resolves port 0)",
    )
    return parser.parse_args(argv)


def _cannot_start(index: int, problems: list[str]) -> NoReturn:
    """Exit 1 naming every problem (the supervisor logs the exit and backs off)."""
    for problem in problems:
        print(f"l4lb worker {index}: {problem}", file=sys.stderr)
    raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    ports = {}
    for item in args.port:
        name, _, port = item.rpartition("=")
        ports[name] = int(port)
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # out of the terminal's group: Ctrl-C goes to the supervisor
    # The supervisor checked these files at its start; they may have changed
    # since (a worker restarted later reads them again), so check as tap does.
    try:
        config = load_config(args.config)
        check_backend_tls(config)
    except ConfigError as e:
        _cannot_start(args.index, [str(p) for p in e.problems])
    errors, _ = check_certificates(config)
    if errors:
        _cannot_start(args.index, [str(p) for p in errors])
    level = config.global_.log_level
    configure_logging(config.global_.log_format, level)
    index = args.index

    def add_worker(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("worker", index)
        return event

    structlog.configure(processors=[add_worker, *structlog.get_config()["processors"]])
    globalLogBeginner.beginLoggingTo(
        [TwistedBridge(level)], redirectStandardIO=False, discardBuffer=True
    )

    from twisted.internet import reactor

    def endpoint(frontend: Any) -> ReusePortEndpoint:
        return ReusePortEndpoint(reactor, frontend, ports.get(frontend.name))

    service = L4LBService(config, reactor, server_endpoint=endpoint, probes=False)

    stopping = []
    reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)

    def supervisor_gone() -> None:
        if not stopping:
            log.warning("supervisor gone (stdin closed): stopping")
            reactor.stop()

    follower = HealthFollower(service, on_lost=supervisor_gone)
    snapshot, rest = read_first_line(0)
    follower.apply_line(snapshot)
    service.privilegedStartService()  # listens; SystemExit(1) if it cannot
    stdio.StandardIO(follower, stdin=0, stdout=EVENTS_FD, reactor=reactor)
    if rest:
        follower.dataReceived(rest)
    service.install_second_signal()
    service.install_reload_signal()
    fastpoll.install(reactor)
    runloop.install(reactor)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
