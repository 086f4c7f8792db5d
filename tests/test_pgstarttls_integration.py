"""PostgreSQL TLS termination in-process, with real clients and the machine's PostgreSQL.

l4lb runs on the global reactor with a ``starttls = "postgres"`` frontend on an
ephemeral 127.0.0.1 port, in front of PostgreSQL 15 on 127.0.0.1:5432 (trust
auth, TLS off: the server speaks plaintext, the clients TLS). The frontend's
config is built directly (``[frontend.X.tls]`` parsing lives on another
branch) and its TLS creator is Twisted's `CertificateOptions` from test-time
certificates. Clients: psql (libpq 15), psycopg (its bundled libpq, 17+ has
``sslnegotiation=direct``), ``openssl s_client -starttls postgres`` and Python's
``ssl``. Blocking clients run in subprocesses or threads, so the reactor
keeps serving while they wait.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import reactor, threads, utils
from twisted.internet.ssl import Certificate, optionsForClientTLS

from l4lb.config import CertificateConfig, FrontendTLSConfig, parse_config
from l4lb.service import L4LBService
from l4lb.tls.pgstarttls import SSL_REQUEST
from tests.loopback import CLOSE, L4LB, Lab, MiB, Peer, config_text
from tests.pg_tls_material import PgTLSFiles, make_material, server_creator

PG = "127.0.0.1:5432"
PSQL = shutil.which("psql")
OPENSSL = shutil.which("openssl")
DIRECT_TLS_LIBPQ = 170000  # libpq 17 added sslnegotiation=direct
_STARTUP_BODY = b"user\0postgres\0database\0postgres\0\0"
STARTUP_PACKET = struct.pack("!ii", 8 + len(_STARTUP_BODY), 196608) + _STARTUP_BODY


def _postgres_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=2):
            return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not _postgres_up(), reason="no PostgreSQL on 127.0.0.1:5432"
)


@pytest_twisted.async_yield_fixture
async def lab() -> Any:
    """The test's ports, services and connections; fails the test on leftovers."""
    lab = Lab(reactor)
    yield lab
    problems = await lab.teardown()
    assert not problems, "left behind by the test:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> PgTLSFiles:
    return make_material(tmp_path_factory.mktemp("pg-tls"))


def pg_lb(
    lab: Lab,
    material: PgTLSFiles,
    servers: dict[str, str] | None = None,
    **tls: Any,
) -> L4LB:
    """Start l4lb with a ``starttls = "postgres"`` frontend ``fe`` (ephemeral port)."""
    config = parse_config(config_text(servers or {"pg": PG}), "<test>")
    (frontend_config,) = config.frontends
    frontend_config = attrs.evolve(
        frontend_config,
        tls=FrontendTLSConfig(
            certificates=(CertificateConfig(str(material.cert), str(material.key)),),
            starttls="postgres",
            **{"alpn": ("postgresql",), **tls},
        ),
    )
    service = L4LBService(attrs.evolve(config, frontends=(frontend_config,)), reactor)
    frontend = service.frontends["fe"]
    if frontend.tls is None:  # no TLS termination wired up: bring Twisted's own
        frontend.tls = server_creator(
            material, [name.encode() for name in frontend_config.tls.alpn]
        )
    service.startService()
    assert frontend.port is not None
    lb = L4LB(service, frontend, frontend.port.getHost().port)
    lab.tcp_ports.append(("127.0.0.1", lb.port))
    lab.services.append(lb)
    return lb


def conninfo(port: int, material: PgTLSFiles, sslmode: str, **extra: str) -> str:
    """libpq keywords: name ``localhost`` (checked by verify-full), address 127.0.0.1."""
    keys = {
        "host": "localhost",
        "hostaddr": "127.0.0.1",
        "port": str(port),
        "user": "postgres",
        "dbname": "postgres",
        "sslmode": sslmode,
        "sslrootcert": str(material.ca),
        "connect_timeout": "10",
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in keys.items())


async def psql(lab: Lab, tmp_path: Path, info: str, sql: str) -> tuple[int, str, str]:
    """Run psql (in a subprocess, the reactor keeps running); exit code, stdout, stderr."""
    assert PSQL is not None
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LC_ALL": "C"}
    run = utils.getProcessOutputAndValue(
        PSQL,
        [info, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
        env=env,
    )
    out, err, code = await lab.wait(run, 30, "psql")
    return code, out.decode(), err.decode()


async def drained(lab: Lab, lb: L4LB) -> None:
    await lab.until(lambda: not lb.frontend.sessions, what="l4lb sessions finished")


def closed_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "connection closed"]


def no_errors(logs: list[dict[str, Any]]) -> None:
    bad = [e for e in logs if e["log_level"] in ("error", "critical")]
    assert not bad, bad


def psycopg_workload(info: str) -> dict[str, Any]:
    """Real queries over one connection (run in a thread): what they returned."""
    rows = 20000
    with psycopg.connect(info) as conn:
        result: dict[str, Any] = {
            "tls_to_l4lb": conn.pgconn.ssl_in_use,
            "one": conn.execute("SELECT 1").fetchone()[0],  # type: ignore[index]
            "big": conn.execute("SELECT repeat('x', 1048576)").fetchone()[0],  # type: ignore[index]
            # What the server sees: a plaintext connection from l4lb.
            "tls_to_server": conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()[0],  # type: ignore[index]
        }
        with conn.cursor() as cur:
            copied_out = 0
            with cur.copy(
                f"COPY (SELECT g, md5(g::text) FROM generate_series(1, {rows}) g) TO STDOUT"
            ) as copy:
                for _ in copy.rows():
                    copied_out += 1
            cur.execute("CREATE TEMP TABLE t (n int, s text)")
            with cur.copy("COPY t (n, s) FROM STDIN") as copy:
                for n in range(rows):
                    copy.write_row((n, "y" * 40))
            cur.execute("SELECT count(*), sum(n) FROM t")
            result["copied_out"] = copied_out
            result["copied_in"] = cur.fetchone()
    return result


@pytest.mark.skipif(PSQL is None, reason="psql is not installed")
class TestPsql:
    @pytest.mark.parametrize("sslmode", ["require", "verify-full"])
    @pytest_twisted.ensureDeferred
    async def test_query_over_tls(
        self, lab: Lab, material: PgTLSFiles, tmp_path: Path, sslmode: str
    ) -> None:
        """psql with sslmode=require and verify-full gets TLS from l4lb and runs a query."""
        lb = pg_lb(lab, material)
        with capture_logs() as logs:
            code, out, err = await psql(
                lab,
                tmp_path,
                conninfo(lb.port, material, sslmode),
                "SELECT 40 + 2, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            )
            await drained(lab, lb)
        assert (code, err) == (0, "")
        assert out.strip() == "42|f"  # the server saw plaintext from l4lb
        (line,) = closed_lines(logs)
        assert line["server"] == "pg"
        assert line["bytes_from_client"] > 0 and line["bytes_from_server"] > 0
        negotiated = [e for e in logs if e["event"] == "postgres negotiation done"]
        assert negotiated[0]["mode"] == "sslrequest"
        assert negotiated[0]["tls_version"] in ("TLSv1.2", "TLSv1.3")
        no_errors(logs)

    @pytest_twisted.ensureDeferred
    async def test_server_error_reaches_tls_client(
        self, lab: Lab, material: PgTLSFiles, tmp_path: Path
    ) -> None:
        """The server's FATAL error and close reach the TLS client through termination."""
        lb = pg_lb(lab, material)
        with capture_logs() as logs:
            code, _, err = await psql(
                lab,
                tmp_path,
                conninfo(lb.port, material, "verify-full", dbname="no_such_db"),
                "SELECT 1",
            )
            await drained(lab, lb)
        assert code == 2
        assert 'FATAL:  database "no_such_db" does not exist' in err
        (line,) = closed_lines(logs)
        # psql may close as soon as it has read the error, before the server's
        # FIN reaches l4lb: either side may be first.
        assert line["reason"] in ("server closed", "client closed")
        assert line["server"] == "pg" and line["bytes_from_server"] > 0

    @pytest_twisted.ensureDeferred
    async def test_wrong_root_refused_by_client(
        self, lab: Lab, material: PgTLSFiles, tmp_path: Path
    ) -> None:
        """verify-full against another CA fails in the client; no server is reached."""
        other = make_material(tmp_path / "other")
        backend = lab.backend(lab.peer)
        lb = pg_lb(lab, material, servers={"b": backend.address})
        with capture_logs() as logs:
            code, _, err = await psql(
                lab,
                tmp_path,
                conninfo(lb.port, other, "verify-full"),
                "SELECT 1",
            )
            await drained(lab, lb)
        assert code == 2
        assert "certificate verify failed" in err
        assert backend.peers == []
        (line,) = closed_lines(logs)
        assert line["reason"] == "tls handshake failed"
        assert line["server"] is None

    @pytest_twisted.ensureDeferred
    async def test_plaintext_refused(
        self, lab: Lab, material: PgTLSFiles, tmp_path: Path
    ) -> None:
        """psql with sslmode=disable sees the FATAL refusal; no server connection is made."""
        backend = lab.backend(lab.peer)
        lb = pg_lb(lab, material, servers={"b": backend.address})
        with capture_logs() as logs:
            code, _, err = await psql(
                lab, tmp_path, conninfo(lb.port, material, "disable"), "SELECT 1"
            )
            await drained(lab, lb)
        assert code == 2
        assert "FATAL:  TLS required: connect with sslmode=require" in err
        assert backend.peers == []
        (line,) = closed_lines(logs)
        assert (line["reason"], line["server"]) == ("plaintext refused", None)

    @pytest_twisted.ensureDeferred
    async def test_plaintext_allowed(
        self, lab: Lab, material: PgTLSFiles, tmp_path: Path
    ) -> None:
        """With plaintext = "allow", sslmode=disable passes through untouched."""
        lb = pg_lb(lab, material, plaintext="allow")
        with capture_logs() as logs:
            code, out, err = await psql(
                lab, tmp_path, conninfo(lb.port, material, "disable"), "SELECT 7 * 6"
            )
            await drained(lab, lb)
        assert (code, out.strip(), err) == (0, "42", "")
        (line,) = closed_lines(logs)
        assert line["server"] == "pg"
        no_errors(logs)


class TestPsycopg:
    @pytest.mark.parametrize("sslmode", ["require", "verify-full"])
    @pytest_twisted.ensureDeferred
    async def test_queries_and_copy(
        self, lab: Lab, material: PgTLSFiles, sslmode: str
    ) -> None:
        """psycopg runs SELECT 1, a 1 MB value and COPY both ways through TLS termination."""
        lb = pg_lb(lab, material)
        with capture_logs() as logs:
            result = await lab.wait(
                threads.deferToThread(
                    psycopg_workload, conninfo(lb.port, material, sslmode)
                ),
                60,
                "psycopg workload",
            )
            await drained(lab, lb)
        assert result["tls_to_l4lb"] is True
        assert result["tls_to_server"] is False
        assert result["one"] == 1
        assert result["big"] == "x" * 1048576
        assert result["copied_out"] == 20000
        assert result["copied_in"] == (20000, sum(range(20000)))
        (line,) = closed_lines(logs)
        assert line["bytes_from_server"] > 1048576
        no_errors(logs)

    @pytest.mark.skipif(
        psycopg.pq.version() < DIRECT_TLS_LIBPQ,
        reason="psycopg's libpq has no sslnegotiation=direct",
    )
    @pytest_twisted.ensureDeferred
    async def test_direct_tls(self, lab: Lab, material: PgTLSFiles) -> None:
        """libpq's sslnegotiation=direct (ClientHello first, ALPN postgresql) is terminated too."""
        lb = pg_lb(lab, material)
        with capture_logs() as logs:
            result = await lab.wait(
                threads.deferToThread(
                    psycopg_workload,
                    conninfo(lb.port, material, "verify-full", sslnegotiation="direct"),
                ),
                60,
                "psycopg workload",
            )
            await drained(lab, lb)
        assert (result["one"], result["tls_to_l4lb"]) == (1, True)
        negotiated = [e for e in logs if e["event"] == "postgres negotiation done"]
        assert [(e["mode"], e["tls_alpn"]) for e in negotiated] == [
            ("direct", "postgresql")
        ]
        # The session's own line carries the TLS fields, as on a TLS frontend.
        [closed] = [e for e in logs if e["event"] == "connection closed"]
        assert closed["tls_alpn"] == "postgresql"
        assert closed["tls_version"] in ("TLSv1.2", "TLSv1.3")
        no_errors(logs)


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
class TestOpenSSLClient:
    @pytest_twisted.ensureDeferred
    async def test_starttls_postgres(self, lab: Lab, material: PgTLSFiles) -> None:
        """``openssl s_client -starttls postgres`` completes a verified handshake."""
        lb = pg_lb(lab, material)
        command = (
            f"{OPENSSL} s_client -connect 127.0.0.1:{lb.port} -starttls postgres"
            f" -servername localhost -verify_hostname localhost"
            f" -CAfile {material.ca} -verify_return_error < /dev/null"
        )
        with capture_logs() as logs:
            out, err, code = await lab.wait(
                utils.getProcessOutputAndValue("/bin/sh", ["-c", command]),
                30,
                "openssl s_client",
            )
            await drained(lab, lb)
        text = out.decode(errors="replace")
        assert code == 0, err.decode(errors="replace")
        assert "Verify return code: 0 (ok)" in text
        assert "CN = localhost" in text
        negotiated = [e for e in logs if e["event"] == "postgres negotiation done"]
        assert [e["mode"] for e in negotiated] == ["sslrequest"]


def _direct_tls_client(port: int, ca: Path, alpn: list[str] | None) -> bytes:
    """A Python ``ssl`` client sending direct TLS; what it reads after the handshake."""
    context = ssl.create_default_context(cafile=str(ca))
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.recv(100)
        except (ssl.SSLError, ConnectionError) as e:
            return f"error: {e}".encode()


class TestDirectTLSALPN:
    @pytest.mark.parametrize("alpn", [None, ["http/1.1"]])
    @pytest_twisted.ensureDeferred
    async def test_without_alpn_postgresql_refused(
        self, lab: Lab, material: PgTLSFiles, alpn: list[str] | None
    ) -> None:
        """Direct TLS without ALPN ``postgresql`` is closed and never reaches a server."""
        backend = lab.backend(lab.peer)
        lb = pg_lb(lab, material, servers={"b": backend.address})
        with capture_logs() as logs:
            got = await lab.wait(
                threads.deferToThread(_direct_tls_client, lb.port, material.ca, alpn),
                20,
                "python ssl client",
            )
            await drained(lab, lb)
        assert not got or got.startswith(b"error")
        assert backend.peers == []
        (line,) = closed_lines(logs)
        assert line["reason"] == "tls handshake failed"
        assert line["server"] is None


class TestRefusals:
    @pytest_twisted.ensureDeferred
    async def test_silent_client_times_out(
        self, lab: Lab, material: PgTLSFiles
    ) -> None:
        """A client that gets ``S`` and never starts the handshake is closed at the timeout."""
        backend = lab.backend(lab.peer)
        lb = pg_lb(lab, material, servers={"b": backend.address}, handshake_timeout=0.3)
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer(keep=True))
            client.send(SSL_REQUEST)
            await lab.wait(client.closed.wait(), 10, "client closed by l4lb")
            await drained(lab, lb)
        assert bytes(client.data or b"") == b"S"
        assert backend.peers == []
        (line,) = closed_lines(logs)
        assert line["reason"] == "handshake timeout"

    @pytest.mark.parametrize(
        ("after_s", "reasons"),
        [
            # OpenSSL reads a startup packet's first bytes as a TLS record
            # header with a length of 11520 and waits for it: the timeout ends it.
            (STARTUP_PACKET, ("handshake timeout", "tls handshake failed")),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ("tls handshake failed",)),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_plaintext_after_s_never_reaches_server(
        self, lab: Lab, material: PgTLSFiles, after_s: bytes, reasons: tuple[str, ...]
    ) -> None:
        """A client that gets ``S`` and goes on in plaintext is closed, never reaching a server."""
        backend = lab.backend(lab.peer)
        lb = pg_lb(lab, material, servers={"b": backend.address}, handshake_timeout=0.5)
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer(keep=True, close_on_eof=True))
            client.send(SSL_REQUEST)
            await lab.until(lambda: client.received >= 1, 10, "the S answer")
            client.send(after_s)
            await lab.wait(client.closed.wait(), 10, "client closed by l4lb")
            await drained(lab, lb)
        assert bytes(client.data or b"")[:1] == b"S"
        assert backend.peers == []
        (line,) = closed_lines(logs)
        assert line["reason"] in reasons
        assert line["tls"] == "sslrequest"
        if line["reason"] == "tls handshake failed":
            assert line["detail"] and "[(" not in line["detail"]  # reasons, not tuples

    @pytest_twisted.ensureDeferred
    async def test_garbage_closed(self, lab: Lab, material: PgTLSFiles) -> None:
        """An HTTP request to the PostgreSQL frontend is closed and logged."""
        backend = lab.backend(lab.peer)
        lb = pg_lb(lab, material, servers={"b": backend.address})
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer(keep=True))
            client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await lab.wait(client.closed.wait(), 10, "client closed by l4lb")
            await drained(lab, lb)
        assert client.data == b""
        assert backend.peers == []
        (line,) = closed_lines(logs)
        assert line["reason"] == "bad startup packet"


INTEGRITY = 16 * MiB


def tls_client_options(material: PgTLSFiles) -> Any:
    """A verifying client (trusting the test CA) for ``startTLS`` after ``S``."""
    ca = Certificate.loadPEM(material.ca.read_bytes())
    return optionsForClientTLS("localhost", trustRoot=ca)


async def starttls_client(lab: Lab, port: int, material: PgTLSFiles) -> Peer:
    """A client that sends an SSLRequest, reads ``S``, and starts verified TLS."""
    client = await lab.connect(port, lab.peer())
    client.send(SSL_REQUEST)
    await lab.until(lambda: client.received >= 1, 10, "the S answer")
    assert client.received == 1
    client.transport.startTLS(tls_client_options(material))
    # From here on count only what comes through TLS.
    client.sha, client.received = hashlib.sha256(), 0
    return client


class TestIntegrity:
    @pytest_twisted.ensureDeferred
    async def test_client_to_server(self, lab: Lab, material: PgTLSFiles) -> None:
        """16 MiB of random bytes through STARTTLS termination arrive intact (SHA-256)."""
        backend = lab.backend(lambda: lab.peer(close_on_eof=True))
        lb = pg_lb(lab, material, servers={"b": backend.address})
        with capture_logs() as logs:
            client = await starttls_client(lab, lb.port, material)
            sent = await lab.wait(client.send_random(INTEGRITY), 120, "send")
            await lab.until(lambda: backend.peers, what="backend connected")
            server = backend.peers[0]
            await lab.until(lambda: server.received >= INTEGRITY, 60, "all bytes")
            assert server.digest == sent
            client.transport.loseConnection()
            await lab.wait(client.closed.wait(), 10, "client closed")
            await lab.wait(server.closed.wait(), 10, "server closed")
            await drained(lab, lb)
        (line,) = closed_lines(logs)
        assert line["bytes_from_client"] == INTEGRITY
        no_errors(logs)

    @pytest_twisted.ensureDeferred
    async def test_server_to_client(self, lab: Lab, material: PgTLSFiles) -> None:
        """16 MiB from the server reach the TLS client intact, then the close does."""

        async def send_on_connect(peer: Peer) -> None:
            await peer.send_random(INTEGRITY, then=CLOSE)

        backend = lab.backend(lambda: lab.peer(send_on_connect))
        lb = pg_lb(lab, material, servers={"b": backend.address})
        with capture_logs() as logs:
            client = await starttls_client(lab, lb.port, material)
            await lab.wait(client.closed.wait(), 120, "client closed")
            await drained(lab, lb)
        source = backend.peers[0].source
        assert source is not None
        assert client.digest == source.digest
        assert client.digest.size == INTEGRITY
        (line,) = closed_lines(logs)
        assert (line["bytes_from_server"], line["reason"]) == (
            INTEGRITY,
            "server closed",
        )
        no_errors(logs)


def _sleeping_query(conn: psycopg.Connection[Any]) -> str:
    """Run a long pg_sleep; how it ended (run in a thread)."""
    try:
        conn.execute("SELECT pg_sleep(30)")
    except psycopg.errors.QueryCanceled:
        return "cancelled"
    return "finished"


def _sleeping(application_name: str) -> bool:
    """Ask the server directly whether that client's pg_sleep is running."""
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres") as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND wait_event = 'PgSleep'",
            (application_name,),
        ).fetchone()
    return row == (1,)


async def wait_sleeping(lab: Lab, application_name: str) -> None:
    """Poll (from a thread: the check blocks) until the client's pg_sleep runs."""
    deadline = reactor.seconds() + 15
    while not await threads.deferToThread(_sleeping, application_name):
        assert reactor.seconds() < deadline, f"{application_name}: no pg_sleep"
        await lab.until(lambda: True, step=0.05)


class TestCancel:
    """Cancel requests open a new connection, so they meet the plaintext policy.

    (psycopg's blocking ``cancel()`` holds the GIL while it waits, which would
    stall this in-process l4lb; psql's Ctrl-C, a separate process, stands in.)
    """

    @pytest.mark.skipif(
        psycopg.pq.version() < DIRECT_TLS_LIBPQ,
        reason="libpq < 17 has no encrypted cancel",
    )
    @pytest_twisted.ensureDeferred
    async def test_encrypted_cancel_cancels(
        self, lab: Lab, material: PgTLSFiles
    ) -> None:
        """libpq 17's cancel (PQcancelCreate) negotiates TLS like the session and cancels."""
        lb = pg_lb(lab, material)
        info = conninfo(lb.port, material, "verify-full", application_name="pgtls-c1")
        conn = await lab.wait(
            threads.deferToThread(psycopg.connect, info), 20, "connect"
        )
        try:
            with capture_logs() as logs:
                query = threads.deferToThread(_sleeping_query, conn)
                await wait_sleeping(lab, "pgtls-c1")
                await lab.wait(threads.deferToThread(conn.cancel_safe), 10, "cancel")
                assert await lab.wait(query, 10, "query") == "cancelled"
                await lab.until(lambda: closed_lines(logs), 10, "cancel logged")
            (line,) = closed_lines(logs)
            assert (line["server"], line["reason"]) == ("pg", "server closed")
        finally:
            await lab.wait(threads.deferToThread(conn.close), 10, "close")
        await drained(lab, lb)

    @pytest.mark.skipif(PSQL is None, reason="psql is not installed")
    @pytest.mark.parametrize("plaintext", ["refuse", "allow"])
    @pytest_twisted.ensureDeferred
    async def test_plaintext_cancel(
        self, lab: Lab, material: PgTLSFiles, tmp_path: Path, plaintext: str
    ) -> None:
        """psql's Ctrl-C sends its CancelRequest unencrypted: refused or passed per ``plaintext``."""
        lb = pg_lb(lab, material, plaintext=plaintext)
        info = conninfo(lb.port, material, "require", application_name="pgtls-c2")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
        assert PSQL is not None
        with capture_logs() as logs:
            done = utils.getProcessOutputAndValue(
                "/bin/sh",
                ["-c", f'exec {PSQL} -X -A -t -c "SELECT pg_sleep(2), 1" "{info}"'],
                env=env,
            )
            await wait_sleeping(lab, "pgtls-c2")
            pids = [
                int(p)
                for p in os.popen("pgrep -f 'application_name=pgtls-c2'").read().split()
            ]
            assert pids
            for pid in pids:
                os.kill(pid, signal.SIGINT)
            out, err, code = await lab.wait(done, 20, "psql")
            await drained(lab, lb)
        assert "Cancel request sent" in err.decode()
        refused = [e for e in closed_lines(logs) if e["reason"] == "plaintext refused"]
        if plaintext == "refuse":
            assert [e["detail"] for e in refused] == ["CancelRequest without TLS"]
            # The server never got it: the query was not cancelled (psql still
            # exits 1, having been interrupted, with no result).
            assert "canceling statement" not in err.decode()
        else:
            assert refused == []
            assert "canceling statement due to user request" in err.decode()
