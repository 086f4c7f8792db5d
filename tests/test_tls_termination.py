"""TLS termination in-process over real sockets: real clients, log lines, reload.

l4lb runs on the global reactor (`tests.loopback.Lab`) with a TLS frontend in
front of plain test servers. Clients are Twisted TLS endpoints, Python's `ssl`
module and `openssl s_client` (both blocking, so run in a thread). Certificates
come from `tests.tls_material`, generated for this run.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

from tests.loopback import CLOSE, HALF_CLOSE, Lab, MiB, Peer, _Once
from tests.tls_material import Issued, TLSMaterial

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="no openssl binary")


class PKI:
    """The certificates every test here uses."""

    def __init__(self, directory: Path) -> None:
        self.material = TLSMaterial(directory)
        self.db = self.material.server("db", "db.example.com")
        self.wild = self.material.server("wild", "*.example.org")
        self.alice = self.material.client("alice", "alice")
        self.mallory = self.material.rogue_client("mallory", "mallory")

    @property
    def ca_path(self) -> str:
        return str(self.material.ca.cert_path)

    @property
    def client_ca_path(self) -> str:
        return str(self.material.client_ca.cert_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def tls_table(pki: PKI, extra: str = "", first: Issued | None = None) -> str:
    """A [frontend.fe.tls] table: db.example.com (default) and *.example.org."""
    first = first or pki.db
    return (
        "[frontend.fe.tls]\n"
        f"certificates = [{first.toml()}, {pki.wild.toml()}]\n"
        f"{extra}\n"
    )


def closed_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "connection closed"]


async def drained(lab: Lab, lb: Any) -> None:
    """Wait until l4lb has logged every session and the test servers saw the close."""
    await lab.until(lambda: not lb.frontend.sessions, what="l4lb sessions finished")
    await lab.until(
        lambda: not any(backend.live for backend in lab.backends),
        what="server connections closed",
    )


async def tls_connect(
    lab: Lab,
    port: int,
    pki: PKI,
    peer: Peer | None = None,
    server_name: str = "db.example.com",
    client: Issued | None = None,
) -> Peer:
    """A Twisted TLS client that verifies the server as ``server_name`` (and sends SNI)."""
    peer = peer if peer is not None else lab.peer(keep=True)
    client_cert = None
    if client is not None:
        client_cert = PrivateCertificate.loadPEM(client.cert_pem + client.key_pem)
    options = optionsForClientTLS(
        server_name,
        trustRoot=Certificate.loadPEM(pki.material.ca.cert_pem),
        clientCertificate=client_cert,
    )
    endpoint = wrapClientTLS(
        options, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    )
    lab.clients.append(peer)
    await lab.wait(endpoint.connect(_Once(peer)), 10, f"TLS connect to {port}")
    return peer


async def round_trip(lab: Lab, peer: Peer, message: bytes) -> None:
    """Send ``message`` through an echo backend and wait until it is back."""
    before = peer.received
    peer.transport.write(message)
    await lab.until(
        lambda: peer.received >= before + len(message) or not peer.is_connected,
        what="echo",
    )
    assert peer.data is not None
    assert bytes(peer.data[before:]) == message


def python_client(
    port: int,
    ca: str,
    *,
    server_name: str | None = None,
    cert: Issued | None = None,
    version: ssl.TLSVersion | None = None,
    alpn: Sequence[str] = (),
    context: ssl.SSLContext | None = None,
    session: ssl.SSLSession | None = None,
) -> dict[str, Any]:
    """Blocking: one TLS round trip through an echo server with Python's ``ssl``."""
    if context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(ca)
        if version is not None:
            context.minimum_version = context.maximum_version = version
        if cert is not None:
            context.load_cert_chain(str(cert.cert_path), str(cert.key_path))
        if alpn:
            context.set_alpn_protocols(list(alpn))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name, session=session) as tls,
    ):
        tls.sendall(b"ping")
        echoed = b""
        while len(echoed) < 4:
            chunk = tls.recv(4 - len(echoed))
            if not chunk:
                break
            echoed += chunk
        return {
            "version": tls.version(),
            "cert": tls.getpeercert(binary_form=True),
            "alpn": tls.selected_alpn_protocol(),
            "reused": tls.session_reused,
            "session": tls.session,
            "context": context,
            "echoed": echoed,
        }


def s_client(port: int, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """Blocking: ``openssl s_client`` against 127.0.0.1:``port``."""
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input=stdin,
        capture_output=True,
        timeout=20,
        check=False,
    )


class Leaving:
    """A TLS 1.3 client that holds back its Finished, then sends it and leaves.

    `handshake` (blocking, in a thread) runs the handshake up to the client's
    Finished. `leave` runs in the reactor thread, so l4lb cannot read between
    the Finished and the close: both are in its socket at its next read. The
    close is a ``close_notify`` (one write with the Finished), a ``fin`` or a
    ``reset`` (SO_LINGER 0, as ``openssl s_time`` closes).
    """

    def __init__(self, port: int, ca: str) -> None:
        self.port = port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False
        self.context.load_verify_locations(ca)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = self.context.wrap_bio(self.incoming, self.outgoing)
        self.raw: socket.socket | None = None
        self.finished = b""

    def handshake(self) -> None:
        self.raw = raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    raw.sendall(self.outgoing.read())
                data = raw.recv(65536)
                assert data, "l4lb closed during the handshake"
                self.incoming.write(data)
        self.finished = self.outgoing.read()

    def leave(self, how: str) -> None:
        raw = self.raw
        assert raw is not None
        if how == "close_notify":
            with contextlib.suppress(ssl.SSLWantReadError):
                self.tls.unwrap()
            raw.sendall(self.finished + self.outgoing.read())
        elif how == "fin":
            raw.sendall(self.finished)
            raw.shutdown(socket.SHUT_WR)
        else:
            raw.sendall(self.finished)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()

    def drain(self) -> None:
        """Blocking: read until l4lb closes, then close."""
        assert self.raw is not None
        with self.raw, contextlib.suppress(OSError):
            while self.raw.recv(65536):
                pass


def der(issued: Issued) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return issued.cert.public_bytes(serialization.Encoding.DER)


class TestTermination:
    @pytest_twisted.ensureDeferred
    async def test_echo_and_log_fields(self, lab: Lab, pki: PKI) -> None:
        """Decrypted bytes reach the plain server; the log line names TLS details."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        with capture_logs() as logs:
            client = await tls_connect(lab, lb.port, pki)
            await round_trip(lab, client, b"hello over tls")
            client.transport.loseConnection()
            await lab.wait(client.closed.wait(), 5, "client closed")
            await drained(lab, lb)
        (line,) = closed_lines(logs)
        assert line["reason"] == "client closed"
        assert line["server"] == "b"
        assert (line["bytes_from_client"], line["bytes_from_server"]) == (14, 14)
        assert line["tls_version"] == "TLSv1.3"
        assert line["tls_cipher"].startswith("TLS_")
        assert line["tls_sni"] == "db.example.com"
        assert "tls_client_subject" not in line

    @pytest.mark.parametrize(
        ("server_name", "expected"),
        [
            ("db.example.com", "db"),
            ("b.example.org", "wild"),
            ("B.EXAMPLE.ORG", "wild"),
            ("unknown.example.net", "db"),
            (None, "db"),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_sni_picks_the_certificate(
        self, lab: Lab, pki: PKI, server_name: str | None, expected: str
    ) -> None:
        """Two names get two certificates; no match or no SNI gets the first."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        result = await threads.deferToThread(
            python_client, lb.port, pki.ca_path, server_name=server_name
        )
        await drained(lab, lb)
        assert result["echoed"] == b"ping"
        assert result["cert"] == der(getattr(pki, expected))

    @pytest_twisted.ensureDeferred
    async def test_early_data_with_the_handshake_is_kept(
        self, lab: Lab, pki: PKI
    ) -> None:
        """Bytes sent right behind the client's Finished reach the server, in order."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        client = await tls_connect(lab, lb.port, pki)
        # Written before the handshake finished: Twisted sends them with (or
        # right after) the client's last flight, before l4lb has a server.
        client.transport.write(b"first ")
        client.transport.write(b"second")
        await lab.until(lambda: client.received >= 12, what="echo")
        assert client.data == b"first second"
        client.transport.loseConnection()
        await lab.wait(client.closed.wait(), 5, "client closed")
        await drained(lab, lb)

    @pytest_twisted.ensureDeferred
    async def test_alpn(self, lab: Lab, pki: PKI) -> None:
        """The first of our ALPN protocols the client offers is chosen and logged."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb(
            {"b": backend.address},
            frontend=tls_table(pki, 'alpn = ["redis", "h2"]'),
        )
        with capture_logs() as logs:
            chosen = await threads.deferToThread(
                python_client, lb.port, pki.ca_path, alpn=["h2", "redis"]
            )
            none = await threads.deferToThread(
                python_client, lb.port, pki.ca_path, alpn=["http/1.1"]
            )
            await drained(lab, lb)
        assert chosen["alpn"] == "redis"
        assert none["alpn"] is None and none["echoed"] == b"ping"
        assert [line.get("tls_alpn") for line in closed_lines(logs)] == ["redis", None]

    @pytest.mark.parametrize(
        "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
    )
    @pytest_twisted.ensureDeferred
    async def test_session_resumption(
        self, lab: Lab, pki: PKI, version: ssl.TLSVersion
    ) -> None:
        """A second connection resumes the first one's session."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        first = await threads.deferToThread(
            python_client, lb.port, pki.ca_path, version=version
        )
        second = await threads.deferToThread(
            python_client,
            lb.port,
            pki.ca_path,
            context=first["context"],
            session=first["session"],
        )
        await drained(lab, lb)
        assert not first["reused"]
        assert second["reused"]


@needs_openssl
class TestClientLeavesAfterHandshake:
    @pytest.mark.parametrize("how", ["close_notify", "fin", "reset"])
    @pytest_twisted.ensureDeferred
    async def test_no_server_connection(self, lab: Lab, pki: PKI, how: str) -> None:
        """A client that leaves with its Finished never reaches a server (as HAProxy)."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        client = Leaving(lb.port, pki.ca_path)
        with capture_logs() as logs:
            await threads.deferToThread(client.handshake)
            client.leave(how)  # in the reactor thread: l4lb reads both at once
            if how != "reset":
                await threads.deferToThread(client.drain)
            await drained(lab, lb)
        (line,) = closed_lines(logs)
        assert line["server"] is None
        if how == "reset":  # the Finished is not even processed
            assert line["reason"] == "handshake failed"
            assert line["detail"] == "client closed the connection"
        else:
            assert line["reason"] == "client closed"
            assert line["tls_version"] == "TLSv1.3"
        assert backend.peers == []
        assert lb.service.cap.live == 0

    @needs_openssl
    @pytest_twisted.ensureDeferred
    async def test_s_time_new(self, lab: Lab, pki: PKI) -> None:
        """``openssl s_time -new`` handshakes all succeed; few or none reach a server."""
        assert OPENSSL is not None
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        address = f"127.0.0.1:{lb.port}"
        with capture_logs() as logs:
            result = await threads.deferToThread(
                subprocess.run,
                [OPENSSL, "s_time", "-new", "-time", "1", "-connect", address],
                capture_output=True,
                timeout=30,
                check=False,
            )
            await drained(lab, lb)
        assert result.returncode == 0, result.stderr
        lines = closed_lines(logs)
        assert lines
        # s_time resets right behind its Finished: "handshake failed" when l4lb
        # saw the reset before the Finished, else "client closed".
        reasons = {line["reason"] for line in lines}
        assert reasons <= {"client closed", "handshake failed"}, reasons
        # Timing decides for each one; s_time closes right behind its Finished.
        assert len(backend.peers) <= len(lines)


class TestOpenSSLClient:
    @pytest.mark.parametrize(
        ("flag", "protocol"), [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")]
    )
    @pytest_twisted.ensureDeferred
    async def test_modern_versions_accepted(
        self, lab: Lab, pki: PKI, flag: str, protocol: str
    ) -> None:
        """openssl s_client with TLS 1.2 or 1.3 gets through, verified against the CA."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        done = await threads.deferToThread(
            s_client,
            lb.port,
            flag,
            "-brief",
            "-CAfile",
            pki.ca_path,
            "-servername",
            "x.example.org",
            "-verify_return_error",
        )
        await drained(lab, lb)
        output = done.stdout.decode() + done.stderr.decode()
        assert done.returncode == 0, output
        assert f"Protocol version: {protocol}" in output
        assert "CN = *.example.org" in output  # SNI chose the wildcard certificate

    @pytest.mark.parametrize("flag", ["-tls1_1", "-tls1"])
    @pytest_twisted.ensureDeferred
    async def test_old_versions_refused(self, lab: Lab, pki: PKI, flag: str) -> None:
        """TLS 1.0/1.1 handshakes are refused and never reach a server."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        with capture_logs() as logs:
            done = await threads.deferToThread(
                s_client, lb.port, flag, "-CAfile", pki.ca_path
            )
            await drained(lab, lb)
        assert done.returncode != 0
        (line,) = closed_lines(logs)
        assert line["reason"] == "handshake failed"
        assert line["server"] is None
        assert backend.peers == []

    @pytest_twisted.ensureDeferred
    async def test_min_version_13_refuses_12(self, lab: Lab, pki: PKI) -> None:
        """min_version = "1.3" refuses a TLS 1.2 client."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb(
            {"b": backend.address}, frontend=tls_table(pki, 'min_version = "1.3"')
        )
        with capture_logs() as logs:
            done = await threads.deferToThread(
                s_client, lb.port, "-tls1_2", "-CAfile", pki.ca_path
            )
            await drained(lab, lb)
        assert done.returncode != 0
        (line,) = closed_lines(logs)
        assert line["reason"] == "handshake failed"
        assert line["detail"] == "unsupported protocol"
        assert backend.peers == []

    @pytest_twisted.ensureDeferred
    async def test_client_renegotiation_refused(self, lab: Lab, pki: PKI) -> None:
        """A TLS 1.2 client asking to renegotiate (s_client "R") is refused."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        done = await threads.deferToThread(
            s_client, lb.port, "-tls1_2", "-CAfile", pki.ca_path, stdin=b"R\n"
        )
        await drained(lab, lb)
        output = done.stdout.decode() + done.stderr.decode()
        assert "RENEGOTIATING" in output
        assert "no renegotiation" in output

    @pytest_twisted.ensureDeferred
    async def test_no_compression(self, lab: Lab, pki: PKI) -> None:
        """The session never uses TLS compression."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        done = await threads.deferToThread(
            s_client, lb.port, "-tls1_2", "-CAfile", pki.ca_path
        )
        await drained(lab, lb)
        assert b"Compression: NONE" in done.stdout


class TestClientCertificates:
    def mtls(self, pki: PKI, auth: str) -> str:
        return tls_table(
            pki, f'client_ca = "{pki.client_ca_path}"\nclient_auth = "{auth}"'
        )

    @pytest_twisted.ensureDeferred
    async def test_required_admits_a_valid_certificate(
        self, lab: Lab, pki: PKI
    ) -> None:
        """With client_auth = "required" a client with a valid cert gets through."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=self.mtls(pki, "required"))
        with capture_logs() as logs:
            result = await threads.deferToThread(
                python_client, lb.port, pki.ca_path, cert=pki.alice
            )
            await drained(lab, lb)
        assert result["echoed"] == b"ping"
        (line,) = closed_lines(logs)
        assert line["tls_client_subject"] == "CN=alice,O=l4lb tests"

    @pytest.mark.parametrize("who", [None, "mallory"])
    @pytest_twisted.ensureDeferred
    async def test_required_refuses_missing_or_untrusted(
        self, lab: Lab, pki: PKI, who: str | None
    ) -> None:
        """No certificate, or one from another CA: refused, no server connection."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=self.mtls(pki, "required"))
        cert = getattr(pki, who) if who else None
        with capture_logs() as logs:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await threads.deferToThread(
                    python_client, lb.port, pki.ca_path, cert=cert
                )
            await drained(lab, lb)
        (line,) = closed_lines(logs)
        assert line["reason"] == "handshake failed"
        expected = "did not return a certificate" if who is None else "certificate"
        assert expected in line["detail"]
        assert backend.peers == []

    @pytest.mark.parametrize("with_cert", [False, True])
    @pytest_twisted.ensureDeferred
    async def test_optional(self, lab: Lab, pki: PKI, with_cert: bool) -> None:
        """With client_auth = "optional" clients get in with or without a cert."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=self.mtls(pki, "optional"))
        with capture_logs() as logs:
            result = await threads.deferToThread(
                python_client,
                lb.port,
                pki.ca_path,
                cert=pki.alice if with_cert else None,
            )
            await drained(lab, lb)
        assert result["echoed"] == b"ping"
        (line,) = closed_lines(logs)
        assert ("tls_client_subject" in line) is with_cert

    @pytest_twisted.ensureDeferred
    async def test_optional_still_refuses_an_untrusted_certificate(
        self, lab: Lab, pki: PKI
    ) -> None:
        """ "optional" admits no certificate, not a certificate that fails to verify."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=self.mtls(pki, "optional"))
        with capture_logs() as logs:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await threads.deferToThread(
                    python_client, lb.port, pki.ca_path, cert=pki.mallory
                )
            await drained(lab, lb)
        (line,) = closed_lines(logs)
        assert line["reason"] == "handshake failed"
        assert backend.peers == []

    @needs_openssl
    @pytest_twisted.ensureDeferred
    async def test_openssl_client_certificate(self, lab: Lab, pki: PKI) -> None:
        """openssl s_client -cert/-key is admitted by a required-mTLS frontend."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=self.mtls(pki, "required"))
        with capture_logs() as logs:
            done = await threads.deferToThread(
                s_client,
                lb.port,
                "-CAfile",
                pki.ca_path,
                "-cert",
                str(pki.alice.cert_path),
                "-key",
                str(pki.alice.key_path),
                stdin=b"ping",
            )
            await drained(lab, lb)
        assert done.returncode == 0, done.stderr
        (line,) = closed_lines(logs)
        assert line["tls_client_subject"] == "CN=alice,O=l4lb tests"


class TestHandshakeTimeout:
    @pytest.mark.parametrize("sends", [b"", b"\x16\x03\x01"])
    @pytest_twisted.ensureDeferred
    async def test_slow_handshake_is_closed(
        self, lab: Lab, pki: PKI, sends: bytes
    ) -> None:
        """A client that never finishes the handshake is closed; no server is used."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb(
            {"b": backend.address},
            frontend=tls_table(pki, 'handshake_timeout = "0.3s"'),
        )
        with capture_logs() as logs:
            client = await lab.connect(lb.port)
            if sends:
                client.transport.write(sends)
            await lab.wait(client.closed.wait(), 5, "client closed by l4lb")
            await drained(lab, lb)
        (line,) = closed_lines(logs)
        assert line["reason"] == "handshake timeout"
        assert line["server"] is None
        assert 0.3 <= line["duration"] < 3
        assert backend.peers == []

    @pytest_twisted.ensureDeferred
    async def test_plaintext_client_is_refused(self, lab: Lab, pki: PKI) -> None:
        """A client speaking plain RESP to a TLS port is closed; no server is used."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer(close_on_eof=True))
            client.transport.write(b"PING\r\n")
            await lab.wait(client.closed.wait(), 5, "client closed by l4lb")
            await drained(lab, lb)
        (line,) = closed_lines(logs)
        assert line["reason"] == "handshake failed"
        assert line["detail"]  # OpenSSL's reason, e.g. "wrong version number"
        assert backend.peers == []

    @pytest_twisted.ensureDeferred
    async def test_handshake_counts_against_the_cap(self, lab: Lab, pki: PKI) -> None:
        """A client in its handshake holds a connection slot (caps stay exact)."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        client = await lab.connect(lb.port)
        await lab.until(lambda: lb.frontend.sessions, what="session counted")
        assert lb.service.cap.live == 1
        assert backend.peers == []
        client.transport.loseConnection()
        await lab.wait(client.closed.wait(), 5, "client closed")
        await drained(lab, lb)


class TestIntegrity:
    @pytest_twisted.ensureDeferred
    async def test_64mib_each_way(self, lab: Lab, pki: PKI) -> None:
        """64 MiB of random bytes each way through a TLS frontend arrive intact."""
        total = 64 * MiB

        async def server_script(peer: Peer) -> None:
            sending = peer.send_random(total)
            await lab.until(lambda: peer.received >= total, timeout=120, step=0.05)
            await sending
            peer.transport.loseWriteConnection()  # FIN: l4lb closes the TLS side

        backend = lab.backend(lambda: lab.peer(server_script))
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        with capture_logs() as logs:
            client = await tls_connect(lab, lb.port, pki, lab.peer())
            sent = await lab.wait(client.send_random(total), 120, "client send")
            received = await lab.wait(client.closed.wait(), 120, "client closed")
            await drained(lab, lb)
        server = backend.peers[0]
        assert server.digest == sent
        assert server.source is not None
        assert received.digest == server.source.digest
        assert received.digest.size == total
        (line,) = closed_lines(logs)
        assert (line["bytes_from_client"], line["bytes_from_server"]) == (total, total)
        assert line["reason"] == "server closed"

    @pytest_twisted.ensureDeferred
    async def test_slow_client_stalls_the_server(self, lab: Lab, pki: PKI) -> None:
        """A TLS client that stops reading pauses the server; l4lb holds < 1 MiB."""
        total = 64 * MiB

        async def send(peer: Peer) -> None:
            await peer.send_random(total, then=CLOSE)

        backend = lab.backend(lambda: lab.peer(send))
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        client = await tls_connect(lab, lb.port, pki, StopReading())
        await lab.until(lambda: backend.peers and lb.frontend.sessions, what="spliced")
        server = backend.peers[0]
        (session,) = lb.frontend.sessions

        def held() -> int:
            return sum(
                len(t.dataBuffer) + t._tempDataLen
                for t in (
                    session.client.transport.transport,  # TCP under TLS
                    session.server.transport,
                )
            )

        def sample() -> tuple[int, int]:
            assert server.source is not None
            return server.source.sent, session.bytes_from_server

        sent, _ = await lab.settle(sample, polls=10, step=0.02)
        assert sent < total, "nothing stalled"
        assert server.source is not None and server.source.paused
        assert held() < MiB
        client.transport.resumeProducing()
        received = await lab.wait(client.closed.wait(), 60, "client closed")
        await drained(lab, lb)
        assert received.digest == server.source.digest

    @pytest_twisted.ensureDeferred
    async def test_slow_server_stalls_the_client(self, lab: Lab, pki: PKI) -> None:
        """A server that stops reading pauses the TLS client's sender."""
        total = 64 * MiB
        backend = lab.backend(lambda: lab.peer(paused=True, close_on_eof=True))
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        client = await tls_connect(lab, lb.port, pki, lab.peer())
        sending = client.send_random(total)
        await lab.until(lambda: backend.peers and lb.frontend.sessions, what="spliced")
        server = backend.peers[0]
        sent, _ = await lab.settle(
            lambda: (client.source.sent, server.received),  # type: ignore[union-attr]
            polls=10,
            step=0.02,
        )
        assert sent < total, "nothing stalled"
        assert client.source is not None and client.source.paused
        server.transport.resumeProducing()
        digest = await lab.wait(sending, 60, "client sent everything")
        await lab.until(lambda: server.received >= total, timeout=60)
        assert server.digest == digest
        client.transport.loseConnection()
        await lab.wait(client.closed.wait(), 10, "client closed")
        await drained(lab, lb)


class TestClosing:
    @pytest_twisted.ensureDeferred
    async def test_server_fin_closes_tls_after_flushing(
        self, lab: Lab, pki: PKI
    ) -> None:
        """A server FIN: the client gets every byte, then a clean TLS close."""

        async def reply(peer: Peer) -> None:
            peer.send(b"bye", then=HALF_CLOSE)

        backend = lab.backend(lambda: lab.peer(reply, close_on_eof=True))
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki))
        with capture_logs() as logs:
            client = await tls_connect(lab, lb.port, pki)
            await lab.wait(client.closed.wait(), 10, "client closed")
            await drained(lab, lb)
        assert client.data == b"bye"
        assert client.close_reason is not None
        from twisted.internet.error import ConnectionDone

        assert client.close_reason.check(ConnectionDone), client.close_reason
        (line,) = closed_lines(logs)
        assert line["reason"] == "server closed"


class StopReading(Peer):
    """A client that stops reading at its first bytes (so after the handshake)."""

    stopped = False

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if not self.stopped:
            self.stopped = True
            self.transport.pauseProducing()


class TestReload:
    @pytest_twisted.ensureDeferred
    async def test_new_handshakes_see_the_new_certificate(
        self, lab: Lab, pki: PKI, tmp_path: Path
    ) -> None:
        """reload_tls: new certificate for new handshakes, old connections untouched."""
        material = TLSMaterial(tmp_path)  # its own CA: the client trusts the old one
        live = pki.material.server("live", "db.example.com")
        live = material.write(live, "live")
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki, first=live))
        before = await tls_connect(lab, lb.port, pki)
        await round_trip(lab, before, b"before")

        renewed = pki.material.server("renewed", "db.example.com")
        material.write(renewed, "live")  # replace the files in place
        with capture_logs() as logs:
            assert lb.service.reload_tls() == {"fe": True}
        assert [e["event"] for e in logs] == [
            "reloading tls certificates",
            "tls certificates reloaded",
        ]
        after = await threads.deferToThread(
            python_client, lb.port, pki.ca_path, server_name="db.example.com"
        )
        assert after["cert"] == der(renewed)
        await round_trip(lab, before, b"still working")  # the old connection
        assert before.transport.getPeerCertificate().digest("sha256") == (
            Certificate.loadPEM(live.cert_pem).digest("sha256")
        )
        before.transport.loseConnection()
        await lab.wait(before.closed.wait(), 5, "client closed")
        await drained(lab, lb)

    @pytest_twisted.ensureDeferred
    async def test_bad_new_file_keeps_the_old_certificate(
        self, lab: Lab, pki: PKI, tmp_path: Path
    ) -> None:
        """A reload that finds a broken file logs an error and keeps serving the old."""
        material = TLSMaterial(tmp_path)
        live = material.write(pki.material.server("keep", "db.example.com"), "keep")
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend=tls_table(pki, first=live))
        other = pki.material.server("other", "db.example.com")
        assert live.key_path is not None
        live.key_path.write_bytes(other.key_pem)  # key no longer matches the cert
        with capture_logs() as logs:
            assert lb.service.reload_tls() == {"fe": False}
        (error,) = [e for e in logs if e["log_level"] == "error"]
        assert error["event"] == "tls reload failed, keeping the old certificates"
        assert error["key"] == "frontend.fe.tls.certificates[0].key"
        assert "does not match" in error["error"]
        result = await threads.deferToThread(
            python_client, lb.port, pki.ca_path, server_name="db.example.com"
        )
        assert result["cert"] == der(live)
        await drained(lab, lb)
