"""l4lb in-process over real sockets on 127.0.0.1: data integrity, half-close,
retries, connect timeouts, flow control, balancing and unix-socket backends.

Each test builds l4lb from TOML on the global reactor (frontend on an ephemeral
port) in front of test servers from `tests.loopback`, and waits on Deferreds or
polls with a deadline, never sleeps. The `lab` fixture fails a test that leaves
a connection, port, reader/writer or delayed call behind.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from l4lb.proxy import Session
from tests.loopback import (
    CLOSE,
    HALF_CLOSE,
    Digest,
    Lab,
    MiB,
    Peer,
    Script,
    free_port,
)

BULK = 256 * MiB

# Data-path tests run on both paths: zero-copy splicing and copying in Python.
BOTH_PATHS = pytest.mark.parametrize(
    "lab", [True, False], ids=["splice", "copy"], indirect=True
)


def closed_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "connection closed"]


def connect_failures(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "server connect failed"]


def retries_by_client(lines: list[dict[str, Any]]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in lines:
        counts[line["client"]] += line["retries"]
    return +counts


def failures_by_client(failures: list[dict[str, Any]]) -> Counter[str]:
    return Counter(f["client"] for f in failures)


def sha(data: bytes) -> Digest:
    return Digest(len(data), hashlib.sha256(data).hexdigest())


def buffered(transport: Any) -> int:
    """Bytes a Twisted FileDescriptor holds in user space, waiting to be sent."""
    return len(transport.dataBuffer) + transport._tempDataLen


def only_session(lb: Any) -> Session:
    (session,) = lb.frontend.sessions
    return session


async def drained(lab: Lab, lb: Any) -> None:
    """Wait until l4lb has finished (and logged) every session."""
    await lab.until(lambda: not lb.frontend.sessions, what="l4lb sessions finished")


async def echo_round_trip(lab: Lab, port: int, message: bytes) -> bytes:
    """One client: send ``message`` and a FIN, read until closed; return the echo."""
    client = await lab.connect(port, lab.peer(keep=True))
    client.send(message, then=HALF_CLOSE)
    await lab.wait(client.closed.wait(), 5, "echo client closed")
    return bytes(client.data or b"")


def no_internal_errors(logs: list[dict[str, Any]]) -> None:
    errors = [
        (e["event"], (e.get("failure") or "").strip().splitlines()[-1:])
        for e in logs
        if e["log_level"] in ("error", "critical")
    ]
    assert not errors, f"l4lb logged errors: {errors}"


async def black_hole(lab: Lab) -> int:
    """A 127.0.0.1 port whose SYNs go unanswered, checked to make connects hang.

    A listening socket with backlog 0 that never accepts: once a connection
    fills its accept queue, Linux drops further SYNs, so connects to it hang
    until the client's own timeout.
    """
    hole = lab.plain_socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    for _ in range(2):
        lab.plain_socket().connect_ex(("127.0.0.1", port))
    probe = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    attempt = probe.connect(Factory.forProtocol(Protocol))
    attempt.addTimeout(0.3, reactor)
    # A cancelled endpoint connect fails with ConnectingCancelledError, which
    # addTimeout passes through (it only converts CancelledError).
    with pytest.raises((defer.TimeoutError, error.ConnectingCancelledError)):
        await attempt
    return port


def send_on_connect(total: int, then: str) -> Script:
    """A backend script: send ``total`` random bytes as soon as connected."""

    async def script(peer: Peer) -> None:
        await peer.send_random(total, then=then)

    return script


@pytest.mark.slow
@BOTH_PATHS
class TestBulk:
    @pytest_twisted.ensureDeferred
    async def test_client_to_server_256mib(self, lab: Lab) -> None:
        """256 MiB from the client reach the server intact, then the FIN does."""
        backend = lab.backend(lambda: lab.peer(close_on_eof=True))
        lb = lab.l4lb({"b": backend.address})
        started = time.perf_counter()
        with capture_logs() as logs:
            client = await lab.connect(lb.port)
            sent = await lab.wait(client.send_random(BULK, then=HALF_CLOSE), 60, "send")
            await lab.until(lambda: backend.peers, what="backend accepted")
            received = await lab.wait(backend.peers[0].eof.wait(), 30, "server EOF")
            await lab.wait(client.closed.wait(), 10, "client closed")
            await drained(lab, lb)
        print(f"\nclient -> server 256 MiB: {time.perf_counter() - started:.2f}s")
        assert received == sent
        # The client's sender was paused by flow control: it never buffered much.
        assert client.source is not None and client.source.pauses > 0
        (line,) = closed_lines(logs)
        assert (line["bytes_from_client"], line["bytes_from_server"]) == (BULK, 0)
        assert line["reason"] == "client closed"

    @pytest_twisted.ensureDeferred
    async def test_server_to_client_256mib(self, lab: Lab) -> None:
        """256 MiB from the server reach the client intact, then the close does."""
        backend = lab.backend(lambda: lab.peer(send_on_connect(BULK, CLOSE)))
        lb = lab.l4lb({"b": backend.address})
        started = time.perf_counter()
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer(close_on_eof=True))
            received = await lab.wait(client.eof.wait(), 60, "client EOF")
            await lab.wait(client.closed.wait(), 10, "client closed")
            await drained(lab, lb)
        print(f"\nserver -> client 256 MiB: {time.perf_counter() - started:.2f}s")
        source = backend.peers[0].source
        assert source is not None and source.pauses > 0
        assert received == source.digest
        assert received.size == BULK
        (line,) = closed_lines(logs)
        assert (line["bytes_from_client"], line["bytes_from_server"]) == (0, BULK)
        assert line["reason"] == "server closed"


@BOTH_PATHS
class TestHalfClose:
    @pytest_twisted.ensureDeferred
    async def test_client_fin_first_still_gets_reply(self, lab: Lab) -> None:
        """A client that shut its write half still receives the whole reply."""

        async def reply_after_eof(peer: Peer) -> None:
            await peer.eof.wait()
            await peer.send_random(MiB, then=CLOSE)

        backend = lab.backend(lambda: lab.peer(reply_after_eof))
        lb = lab.l4lb({"b": backend.address})
        request = os.urandom(10_000)
        with capture_logs() as logs:
            client = await lab.connect(lb.port)
            client.send(request, then=HALF_CLOSE)
            reply = await lab.wait(client.eof.wait(), 10, "reply and FIN")
            assert client.write_closed  # the reply arrived on a half-closed socket
            await lab.wait(client.closed.wait(), 5, "client closed")
            await lab.until(lambda: not backend.live, what="backend closed")
            await drained(lab, lb)
        server = backend.peers[0]
        assert server.eof.value == sha(request)
        assert server.source is not None and reply == server.source.digest
        assert reply.size == MiB
        (line,) = closed_lines(logs)
        assert line["reason"] == "client closed"
        assert (line["bytes_from_client"], line["bytes_from_server"]) == (
            len(request),
            MiB,
        )

    @pytest_twisted.ensureDeferred
    async def test_server_fin_first_client_still_sends(self, lab: Lab) -> None:
        """After the server's FIN the client can still send, and it all arrives."""
        greeting = b"220 hello, I am done talking\r\n"

        async def greet_and_fin(peer: Peer) -> None:
            peer.send(greeting, then=HALF_CLOSE)

        backend = lab.backend(lambda: lab.peer(greet_and_fin))
        lb = lab.l4lb({"b": backend.address})
        with capture_logs() as logs:
            client = await lab.connect(lb.port)
            got = await lab.wait(client.eof.wait(), 5, "greeting and FIN")
            assert got == sha(greeting)
            sent = await lab.wait(client.send_random(MiB, then=HALF_CLOSE), 10, "send")
            await lab.wait(client.closed.wait(), 5, "client closed")
            await lab.until(
                lambda: backend.peers and not backend.live, what="backend closed"
            )
            await drained(lab, lb)
        assert backend.peers[0].eof.value == sent
        (line,) = closed_lines(logs)
        assert line["reason"] == "server closed"
        assert (line["bytes_from_client"], line["bytes_from_server"]) == (
            MiB,
            len(greeting),
        )


class TestRetries:
    @pytest_twisted.ensureDeferred
    async def test_refused_server_costs_client_nothing(self, lab: Lab) -> None:
        """With one server refusing, 20 clients in a row all get their echo."""
        echo = lab.backend(lab.echo)
        lb = lab.l4lb(
            {"dead": f"127.0.0.1:{free_port()}", "echo": echo.address},
            pool="retries = 3",
        )
        with capture_logs() as logs:
            echoes = [
                await echo_round_trip(lab, lb.port, b"hello %d" % i) for i in range(20)
            ]
            await drained(lab, lb)
        no_internal_errors(logs)
        assert echoes == [b"hello %d" % i for i in range(20)]
        lines = closed_lines(logs)
        failures = connect_failures(logs)
        assert len(lines) == 20
        assert {e["server"] for e in lines} == {"echo"}
        assert {e["reason"] for e in lines} == {"client closed"}
        assert failures, "no client was sent to the dead server first"
        assert {(f["server"], f["error"]) for f in failures} == {
            ("dead", "connection refused")
        }
        # Every failed attempt shows up as a retry on its own client's line.
        assert retries_by_client(lines) == failures_by_client(failures)
        assert all(
            e["retries"] == 1
            for e in lines
            if e["client"] in failures_by_client(failures)
        )
        assert lb.service.pools["p"].server("dead").failed_connects == len(failures)

    @pytest_twisted.ensureDeferred
    async def test_unanswered_syn_times_out_and_retries(self, lab: Lab) -> None:
        """A server dropping SYNs costs ``connect_timeout``; the other one serves."""
        hole_port = await black_hole(lab)
        echo = lab.backend(lab.echo)
        lb = lab.l4lb(
            {"hole": f"127.0.0.1:{hole_port}", "echo": echo.address},
            pool='retries = 3\nconnect_timeout = "300ms"',
        )
        started = time.perf_counter()
        with capture_logs() as logs:
            echoes = await defer.gatherResults(
                [
                    defer.Deferred.fromCoroutine(
                        echo_round_trip(lab, lb.port, b"c%d" % i)
                    )
                    for i in range(6)
                ],
                consumeErrors=True,
            )
            await drained(lab, lb)
        elapsed = time.perf_counter() - started
        print(f"\n6 concurrent clients, some via the black hole: {elapsed:.2f}s")
        no_internal_errors(logs)
        assert echoes == [b"c%d" % i for i in range(6)]
        assert [s.live for s in lb.service.pools["p"]] == [0, 0]
        lines = closed_lines(logs)
        failures = connect_failures(logs)
        assert len(lines) == 6
        assert {e["server"] for e in lines} == {"echo"}
        assert failures, "no client was sent to the black hole first"
        assert {(f["server"], f["error"]) for f in failures} == {
            ("hole", "timed out after 0.3s")
        }
        assert retries_by_client(lines) == failures_by_client(failures)
        assert 0.3 <= elapsed < 3

    @pytest_twisted.ensureDeferred
    async def test_shutdown_cancels_hanging_connect(self, lab: Lab) -> None:
        """Stopping l4lb during a hanging connect cancels it and frees the slot."""
        hole_port = await black_hole(lab)
        lb = lab.l4lb(
            {"hole": f"127.0.0.1:{hole_port}"},
            pool='connect_timeout = "10s"',
            grace="100ms",
        )
        hole = lb.service.pools["p"].server("hole")
        with capture_logs() as logs:
            client = await lab.connect(lb.port)
            await lab.until(
                lambda: hole.live == 1, what="connect to the black hole started"
            )
            await lab.wait(lb.service.stopService(), 5, "stopService")
            await lab.wait(client.closed.wait(), 5, "client closed by the shutdown")
        no_internal_errors(logs)
        (line,) = closed_lines(logs)
        assert line["reason"] == "shutdown"
        assert hole.live == 0, "the cancelled connect attempt kept its server slot"

    @pytest_twisted.ensureDeferred
    async def test_client_leaving_during_connect_stops_it(self, lab: Lab) -> None:
        """A client closing while l4lb's connect hangs ends its session right away."""
        hole_port = await black_hole(lab)
        lb = lab.l4lb(
            {"hole": f"127.0.0.1:{hole_port}"},
            pool='connect_timeout = "300ms"\nretries = 3',
        )
        hole = lb.service.pools["p"].server("hole")
        with capture_logs() as logs:
            client = await lab.connect(lb.port)
            await lab.until(
                lambda: hole.live == 1, what="connect to the black hole started"
            )
            left = reactor.seconds()
            client.transport.loseConnection()
            await lab.wait(client.closed.wait(), 5, "client closed")
            await drained(lab, lb)  # so the fixture sees no leftovers either way
            took = reactor.seconds() - left
        (line,) = closed_lines(logs)
        assert (line["reason"], len(connect_failures(logs))) == ("client closed", 0), (
            f"session ended after {took:.2f}s: {line['reason']!r},"
            f" {len(connect_failures(logs))} connect attempts timed out"
        )
        assert hole.live == 0


class TestClientSpeaksFirst:
    """A client whose bytes wait at accept: no departure watch, nothing read."""

    @pytest_twisted.ensureDeferred
    async def test_bytes_waiting_at_accept_wait_for_the_backend(self, lab: Lab) -> None:
        hole_port = await black_hole(lab)
        lb = lab.l4lb({"hole": f"127.0.0.1:{hole_port}"}, pool='connect_timeout = "5s"')
        listening = lb.frontend.port
        assert listening is not None
        listening.stopReading()  # the client connects and sends before the accept
        client = lab.plain_socket()
        client.setblocking(True)
        client.settimeout(5)
        client.connect(("127.0.0.1", lb.port))
        client.sendall(b"hello")
        listening.startReading()
        await lab.until(lambda: lb.frontend.sessions, what="accepted")
        session = only_session(lb)
        transport = session.client.transport
        assert session._watch is None  # bytes were waiting: no watch
        assert transport not in reactor.getReaders()  # nothing read meanwhile
        assert session._attempt is not None  # connecting to the black hole
        assert transport.socket.recv(16, socket.MSG_PEEK) == b"hello"
        session.close("test over")
        await drained(lab, lb)

    @pytest_twisted.ensureDeferred
    async def test_bytes_waiting_at_accept_reach_the_backend(self, lab: Lab) -> None:
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address})
        listening = lb.frontend.port
        assert listening is not None
        listening.stopReading()
        client = lab.plain_socket()
        client.setblocking(True)
        client.settimeout(5)
        client.connect(("127.0.0.1", lb.port))
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        client.setblocking(False)
        listening.startReading()
        got = b""

        def echoed() -> bool:
            nonlocal got
            try:
                data = client.recv(100)
            except BlockingIOError:
                return False
            got += data
            return data == b""  # closed after the echo

        await lab.until(echoed, what="echo and close")
        assert got == b"hello"
        await drained(lab, lb)


@BOTH_PATHS
class TestFlowControl:
    @pytest_twisted.ensureDeferred
    async def test_slow_reader_bounds_memory(self, lab: Lab) -> None:
        """A client that stops reading stalls the server; l4lb buffers < 1 MiB."""
        total = 64 * MiB
        backend = lab.backend(lambda: lab.peer(send_on_connect(total, CLOSE)))
        lb = lab.l4lb({"b": backend.address})
        client = await lab.connect(lb.port, lab.peer(paused=True, close_on_eof=True))
        await lab.until(lambda: backend.peers and lb.frontend.sessions, what="spliced")
        session = only_session(lb)
        assert session.server is not None
        client_side, server_side = session.client.transport, session.server.transport
        assert (session.splicer is not None) is lab.splice
        server = backend.peers[0]
        most = 0

        def sample() -> tuple[int, int, int]:
            nonlocal most
            held = buffered(client_side) + buffered(server_side)
            if session.splicer is not None:
                held += session.splicer.pending  # bytes in the kernel pipes
            most = max(most, held)
            assert server.source is not None
            return server.source.sent, session.bytes_from_server, held

        sent, relayed, held = await lab.settle(sample, polls=10, step=0.02)
        print(
            f"\nstalled: server wrote {sent / MiB:.1f} MiB, l4lb relayed"
            f" {relayed / MiB:.1f} MiB, holds {held} B (at most {most} B seen)"
        )
        assert server.source is not None
        assert sent < total, "the whole transfer fit in kernel buffers; nothing stalled"
        assert server.source.paused and server.transport.producerPaused
        # l4lb stopped reading the server.
        assert server_side not in reactor.getReaders()
        if session.splicer is None:
            assert client_side.producerPaused
        else:  # the pipe to the client is full; the client is watched for room
            assert session.splicer.down.pending > 0
            assert client_side in reactor.getWriters()
        assert most < MiB
        assert client.received == 0

        client.transport.resumeProducing()
        received = await lab.wait(client.eof.wait(), 30, "client EOF")
        await lab.wait(client.closed.wait(), 5, "client closed")
        await drained(lab, lb)
        assert received == server.source.digest
        assert received.size == total


class TestBalancing:
    @pytest_twisted.ensureDeferred
    async def test_least_connections_spreads_evenly(self, lab: Lab) -> None:
        """30 long-lived clients over 3 servers: 10 connections each."""
        backends = {
            f"s{i}": lab.backend(lambda: lab.peer(close_on_eof=True)) for i in range(3)
        }
        lb = lab.l4lb({name: b.address for name, b in backends.items()})
        clients = [await lab.connect(lb.port) for _ in range(30)]
        await lab.until(
            lambda: sum(len(b.live) for b in backends.values()) == 30,
            what="30 backend conns",
        )
        assert {name: len(b.live) for name, b in backends.items()} == {
            "s0": 10,
            "s1": 10,
            "s2": 10,
        }
        assert [s.live for s in lb.service.pools["p"]] == [10, 10, 10]
        for client in clients:
            client.transport.loseConnection()
        await lab.until(
            lambda: not any(b.live for b in backends.values()), what="all closed"
        )
        await drained(lab, lb)
        assert [s.live for s in lb.service.pools["p"]] == [0, 0, 0]


class TestUnixBackend:
    @pytest_twisted.ensureDeferred
    async def test_unix_socket_server(self, lab: Lab, tmp_path: Any) -> None:
        """A ``unix:/path`` server gets the client's bytes and its echo comes back."""
        path = str(tmp_path / "b.sock")
        assert len(path) < 100
        echo = lab.unix_backend(path, lab.echo)
        lb = lab.l4lb({"u": echo.address})
        with capture_logs() as logs:
            client = await lab.connect(lb.port)
            sent = await lab.wait(
                client.send_random(4 * MiB, then=HALF_CLOSE), 10, "send"
            )
            got = await lab.wait(client.eof.wait(), 10, "echo")
            await lab.wait(client.closed.wait(), 5, "client closed")
            await drained(lab, lb)
        assert got == sent
        (line,) = closed_lines(logs)
        assert line["server"] == "u"
        assert (line["bytes_from_client"], line["bytes_from_server"]) == (
            4 * MiB,
            4 * MiB,
        )


class TestAddresses:
    @pytest_twisted.ensureDeferred
    async def test_ipv6_frontend_and_server(self, lab: Lab) -> None:
        """A frontend on [::1] in front of a server on [::1] splices like IPv4."""
        echo = lab.backend(lab.echo, host="::1")
        lb = lab.l4lb({"v6": echo.address}, listen="[::1]:0")
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer(keep=True), host="::1")
            client.send(b"over six", then=HALF_CLOSE)
            await lab.wait(client.closed.wait(), 5, "echo client closed")
            await drained(lab, lb)
        assert bytes(client.data) == b"over six"
        (line,) = closed_lines(logs)
        assert line["client"].startswith("[::1]:")
        assert line["server"] == "v6"

    @pytest_twisted.ensureDeferred
    async def test_server_by_dns_name(self, lab: Lab) -> None:
        """A server given as ``localhost:PORT`` is resolved without blocking and reached."""
        echo = lab.backend(lab.echo)
        port = echo.address.rpartition(":")[2]
        lb = lab.l4lb({"named": f"localhost:{port}"})
        with capture_logs() as logs:
            echoed = await echo_round_trip(lab, lb.port, b"by name")
            await drained(lab, lb)
        no_internal_errors(logs)
        assert echoed == b"by name"
        (line,) = closed_lines(logs)
        assert (line["server"], line["reason"]) == ("named", "client closed")


class TestConnectionCaps:
    @pytest_twisted.ensureDeferred
    async def test_client_beyond_cap_waits_in_backlog(self, lab: Lab) -> None:
        """At the frontend cap a further client is not accepted until a slot frees, then served."""
        echo = lab.backend(lab.echo)
        lb = lab.l4lb({"e": echo.address}, frontend="max_connections = 2")
        held = [await lab.connect(lb.port) for _ in range(2)]
        await lab.until(lambda: len(echo.live) == 2, what="two clients spliced")
        # The kernel completes the third handshake (backlog); l4lb does not accept it.
        third = await lab.connect(lb.port, lab.peer(keep=True))
        third.send(b"third", then=HALF_CLOSE)
        assert await lab.settle(
            lambda: (len(lb.frontend.sessions), len(echo.live))
        ) == (
            2,
            2,
        )
        assert third.data == b""
        with capture_logs() as logs:
            held[0].transport.loseConnection()
            await lab.wait(third.closed.wait(), 5, "third client served")
            held[1].transport.loseConnection()
            await drained(lab, lb)
        assert bytes(third.data) == b"third"
        assert sorted(e["reason"] for e in closed_lines(logs)) == ["client closed"] * 3
        # resumed (slot freed) → paused (third accepted: at the cap again) →
        # resumed; the second pause is within the report interval: not a warning.
        assert [
            (e["event"], e["log_level"]) for e in logs if "accepting" in e["event"]
        ] == [("accepting resumed", "debug"), ("accepting resumed", "debug")]
