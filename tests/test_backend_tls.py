"""TLS from l4lb to the servers ([pool.X.tls]) over real sockets.

Plain-TCP clients talk to l4lb, which re-encrypts to Twisted TLS servers made
with certificates from a test CA: integrity of a bulk transfer, verification
(name, CA) as a failed connect that is retried and logged, client
certificates (mTLS), unverified mode, closing without half-close, and the
start/--check loading of the certificate files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from l4lb.config import ConfigError, parse_config
from l4lb.tls.backend import CLOSE_LINGER, TLSClientEndpoint, check_backend_tls
from tests.loopback import CLOSE, HALF_CLOSE, Backend, Lab, MiB, Peer, _Once
from tests.tls_lab import Greeter, pools_text, start_l4lb, tls_backend
from tests.tls_material import CA, server_options

BULK = 64 * MiB


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def greeter(lab: Lab, name: str) -> Any:
    return lambda: Greeter(name.encode(), on_error=lab.record_error)


def config(servers: list[str], tls: str, pool: str = "") -> str:
    return (
        '[frontend.fe]\nlisten = "127.0.0.1:0"\npool = "p"\n'
        + pools_text({"p": servers}, {"p": pool})
        + f"[pool.p.tls]\n{tls}\n"
    )


async def round_trip(lab: Lab, port: int, message: bytes = b"ping") -> bytes:
    """Connect, read the greeting, send ``message``, read its echo, close."""
    client = await lab.connect(port, lab.peer(keep=True))
    await lab.until(lambda: client.data.endswith(b"\n"), 5, "greeting")
    client.send(message)
    await lab.until(lambda: client.data.endswith(message), 5, "echo")
    client.transport.loseConnection()
    await lab.wait(client.closed.wait(), 5, "client closed")
    return bytes(client.data)


def verified(ca: CA, tmp_path: Path, server_name: str) -> str:
    """[pool.p.tls] lines that verify servers against ``ca`` for ``server_name``."""
    return f'ca = "{ca.write(tmp_path)}"\nserver_name = "{server_name}"'


async def finished(lab: Lab, lb: Any) -> None:
    await lab.until(lambda: not lb.frontend.sessions, 10, "sessions finished")


class TestVerifiedTLS:
    @pytest_twisted.ensureDeferred
    async def test_verified_round_trip(self, lab: Lab, ca: CA, tmp_path: Path) -> None:
        """A server whose certificate chains to ca and names server_name is used."""
        good = tls_backend(lab, ca.issue("redis.internal"), greeter(lab, "good"))
        lb = start_l4lb(
            lab,
            config(
                [good.address],
                verified(ca, tmp_path, "redis.internal"),
            ),
        )
        with capture_logs() as logs:
            assert await round_trip(lab, lb.port) == b"I am good\nping"
            await finished(lab, lb)
        [line] = events(logs, "connection closed")
        assert (line["server"], line["retries"]) == ("p0", 0)

    @pytest_twisted.ensureDeferred
    async def test_server_host_is_the_default_name(
        self, lab: Lab, ca: CA, tmp_path: Path
    ) -> None:
        """Without server_name the server's own host (here an IP) is verified."""
        good = tls_backend(lab, ca.issue("127.0.0.1"), greeter(lab, "ip"))
        lb = start_l4lb(lab, config([good.address], f'ca = "{ca.write(tmp_path)}"'))
        assert await round_trip(lab, lb.port) == b"I am ip\nping"
        await finished(lab, lb)

    @pytest_twisted.ensureDeferred
    @pytest.mark.parametrize(
        ("bad_cert", "words"),
        [
            (
                "wrong-name",
                "TLS certificate verification failed: the certificate is not"
                " valid for 'redis.internal'",
            ),
            (
                "unknown-ca",
                "TLS handshake failed: certificate verify failed (the server"
                " certificate is not signed by a trusted CA",
            ),
        ],
    )
    async def test_bad_certificate_is_a_failed_connect(
        self, lab: Lab, ca: CA, tmp_path: Path, bad_cert: str, words: str
    ) -> None:
        """A certificate that fails verification is retried on another server and logged."""
        issued = (
            ca.issue("other.internal")
            if bad_cert == "wrong-name"
            else CA("stranger").issue("redis.internal")
        )
        bad = tls_backend(lab, issued, greeter(lab, "bad"))
        good = tls_backend(lab, ca.issue("redis.internal"), greeter(lab, "good"))
        lb = start_l4lb(
            lab,
            config(
                [bad.address, good.address],
                verified(ca, tmp_path, "redis.internal"),
                pool='balance = "first"',
            ),
        )
        with capture_logs() as logs:
            assert await round_trip(lab, lb.port) == b"I am good\nping"
            await finished(lab, lb)
        [failure] = events(logs, "server connect failed")
        assert failure["server"] == "p0"
        assert words in failure["error"], failure["error"]
        [line] = events(logs, "connection closed")
        assert (line["server"], line["retries"]) == ("p1", 1)
        assert lb.service.pools["p"].servers[0].failed_connects == 1
        # The bad server never got a byte of the client's.
        assert all(peer.received == 0 for peer in bad.peers)

    @pytest_twisted.ensureDeferred
    async def test_only_bad_servers_refuse_the_client(
        self, lab: Lab, ca: CA, tmp_path: Path
    ) -> None:
        """When every server fails verification the client is closed with the reason."""
        bad = tls_backend(lab, ca.issue("other.internal"), greeter(lab, "bad"))
        lb = start_l4lb(
            lab,
            config(
                [bad.address],
                verified(ca, tmp_path, "redis.internal"),
                pool="retries = 1",
            ),
        )
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer(keep=True, close_on_eof=True))
            await lab.wait(client.closed.wait(), 5, "client closed")
            await finished(lab, lb)
        assert client.data == b""
        [line] = events(logs, "connection closed")
        assert line["reason"] == "connect failed"
        assert "TLS certificate verification failed" in line["detail"]


class TestClientCertificate:
    @pytest_twisted.ensureDeferred
    async def test_mtls_to_a_server_that_requires_it(
        self, lab: Lab, ca: CA, tmp_path: Path
    ) -> None:
        """With cert and key, a server requiring a client certificate serves."""
        clients_ca = CA("clients")
        server = tls_backend(
            lab, ca.issue("db.internal"), greeter(lab, "mtls"), client_ca=clients_ca
        )
        cert, key = clients_ca.issue(client=True).write(tmp_path, "l4lb-client")
        lb = start_l4lb(
            lab,
            config(
                [server.address],
                verified(ca, tmp_path, "db.internal")
                + f'\ncert = "{cert}"\nkey = "{key}"',
            ),
        )
        client = await lab.connect(lb.port, lab.peer(keep=True))
        await lab.until(lambda: client.data == b"I am mtls\n", 5, "greeting")
        [peer] = server.peers
        subject = peer.transport.getPeerCertificate().to_cryptography().subject
        assert subject.rfc4514_string() == "CN=l4lb test client"
        client.transport.loseConnection()
        await lab.wait(client.closed.wait(), 5, "client closed")
        await finished(lab, lb)

    @pytest_twisted.ensureDeferred
    async def test_without_a_client_certificate_the_server_refuses(
        self, lab: Lab, ca: CA, tmp_path: Path
    ) -> None:
        """Without cert/key such a server closes; the client gets nothing and is closed."""
        server = tls_backend(
            lab, ca.issue("db.internal"), greeter(lab, "mtls"), client_ca=CA("x")
        )
        lb = start_l4lb(
            lab,
            config(
                [server.address],
                verified(ca, tmp_path, "db.internal"),
                pool="retries = 0",
            ),
        )
        client = await lab.connect(lb.port, lab.peer(keep=True, close_on_eof=True))
        await lab.wait(client.closed.wait(), 5, "client closed")
        assert client.data == b""
        await finished(lab, lb)


class TestUnverified:
    @pytest_twisted.ensureDeferred
    async def test_verify_false_accepts_any_certificate(
        self, lab: Lab, tmp_path: Path
    ) -> None:
        """verify = false encrypts to a server no CA vouches for, with a warning at start."""
        server = tls_backend(lab, CA("nobody").issue("x.invalid"), greeter(lab, "any"))
        with capture_logs() as logs:
            lb = start_l4lb(lab, config([server.address], "verify = false"))
        [warning] = events(logs, "TLS to the servers is not verified")
        assert warning["pool"] == "p"
        assert await round_trip(lab, lb.port) == b"I am any\nping"
        await finished(lab, lb)


class TestBulkAndClosing:
    @pytest_twisted.ensureDeferred
    async def test_64_mib_each_way(self, lab: Lab, ca: CA, tmp_path: Path) -> None:
        """64 MiB of random bytes go to a TLS echo server and back, SHA-256 equal."""
        echo = tls_backend(lab, ca.issue("echo.internal"), lab.echo)
        lb = start_l4lb(
            lab,
            config(
                [echo.address],
                verified(ca, tmp_path, "echo.internal"),
            ),
        )
        client = await lab.connect(lb.port, lab.peer())
        sent = await lab.wait(client.send_random(BULK), 300, "client sent 64 MiB")
        await lab.until(lambda: client.received >= BULK, 300, "64 MiB echoed")
        [server] = echo.peers
        assert server.digest == sent
        assert client.digest == sent
        client.transport.loseConnection()
        await lab.wait(client.closed.wait(), 5, "client closed")
        await finished(lab, lb)

    @pytest_twisted.ensureDeferred
    async def test_client_fin_becomes_close_notify(
        self, lab: Lab, ca: CA, tmp_path: Path
    ) -> None:
        """A client's FIN closes the TLS side cleanly; the reply still arrives, nothing hangs."""
        echo = tls_backend(lab, ca.issue("echo.internal"), lab.echo)
        lb = start_l4lb(
            lab,
            config(
                [echo.address],
                verified(ca, tmp_path, "echo.internal"),
            ),
        )
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer(keep=True))
            client.send(b"request", then=HALF_CLOSE)
            await lab.wait(client.closed.wait(), 5, "client closed")
            await finished(lab, lb)
        assert client.data == b"request"
        [server] = echo.peers
        assert not server.is_connected
        [line] = events(logs, "connection closed")
        assert line["reason"] == "client closed"
        assert line["bytes_from_server"] == len(b"request")

    @pytest_twisted.ensureDeferred
    async def test_client_close_closes_the_server(
        self, lab: Lab, ca: CA, tmp_path: Path
    ) -> None:
        """A client that closes outright gets its server connection closed too."""
        server = tls_backend(lab, ca.issue("s.internal"), greeter(lab, "s"))
        lb = start_l4lb(
            lab,
            config(
                [server.address],
                verified(ca, tmp_path, "s.internal"),
            ),
        )
        client = await lab.connect(lb.port, lab.peer(keep=True))
        await lab.until(lambda: client.data == b"I am s\n", 5, "greeting")
        client.send(b"bye", then=CLOSE)
        await lab.wait(client.closed.wait(), 5, "client closed")
        [peer] = server.peers
        await lab.wait(peer.closed.wait(), 5, "server side closed")
        await finished(lab, lb)


class TestFiles:
    def test_missing_and_mismatched_files(self, ca: CA, tmp_path: Path) -> None:
        """--check and start report unreadable CA files and keys not matching certs."""
        cert, _ = ca.issue(client=True).write(tmp_path, "one")
        _, other_key = ca.issue(client=True).write(tmp_path, "two")
        (tmp_path / "junk.pem").write_text("not a certificate\n")
        text = (
            '[frontend.f]\nlisten = ":1"\npool = "a"\n'
            '[pool.a]\n[[pool.a.server]]\naddress = "h:1"\n'
            f'[pool.a.tls]\nca = "{tmp_path}/missing.pem"\n'
            '[pool.b]\n[[pool.b.server]]\naddress = "h:1"\n'
            f'[pool.b.tls]\ncert = "{cert}"\nkey = "{other_key}"\n'
            '[pool.c]\n[[pool.c.server]]\naddress = "h:1"\n'
            f'[pool.c.tls]\nca = "{tmp_path}/junk.pem"\n'
            f'cert = "{tmp_path}/gone.pem"\nkey = "{tmp_path}/junk.pem"\n'
            '[pool.d]\n[[pool.d.server]]\naddress = "h:1"\n'
            f'[pool.d.tls]\ncert = "{cert}"\nkey = "{tmp_path}/junk.pem"\n'
        )
        with pytest.raises(ConfigError) as caught:
            check_backend_tls(parse_config(text, "edge.toml"))
        assert [str(p) for p in caught.value.problems] == [
            f"edge.toml: pool.a.tls.ca: cannot read '{tmp_path}/missing.pem':"
            " No such file or directory",
            f"edge.toml: pool.b.tls.key: '{other_key}' does not match the"
            f" certificate in '{cert}'",
            f"edge.toml: pool.c.tls.ca: '{tmp_path}/junk.pem' holds no PEM certificate",
            f"edge.toml: pool.c.tls.cert: cannot read '{tmp_path}/gone.pem':"
            " No such file or directory",
            f"edge.toml: pool.d.tls.key: '{tmp_path}/junk.pem' holds no usable PEM"
            " private key",
        ]

    def test_good_files_pass(self, ca: CA, tmp_path: Path) -> None:
        """Matching files load without problems."""
        cert, key = ca.issue(client=True).write(tmp_path, "client")
        text = (
            '[frontend.f]\nlisten = ":1"\npool = "a"\n'
            '[pool.a]\n[[pool.a.server]]\naddress = "h:1"\n'
            f'[pool.a.tls]\nca = "{ca.write(tmp_path)}"\ncert = "{cert}"\nkey = "{key}"\n'
        )
        check_backend_tls(parse_config(text, "edge.toml"))


class TestHandshakeLimits:
    @pytest_twisted.ensureDeferred
    async def test_silent_server_times_out_in_the_handshake(
        self, lab: Lab, ca: CA, tmp_path: Path
    ) -> None:
        """A server that accepts TCP but never answers TLS costs connect_timeout, then the next."""
        silent = lab.backend(lab.peer)  # plain TCP, reads the ClientHello, says nothing
        good = tls_backend(lab, ca.issue("redis.internal"), greeter(lab, "good"))
        lb = start_l4lb(
            lab,
            config(
                [silent.address, good.address],
                verified(ca, tmp_path, "redis.internal"),
                pool='balance = "first"\nconnect_timeout = "300ms"',
            ),
        )
        with capture_logs() as logs:
            assert await round_trip(lab, lb.port) == b"I am good\nping"
            await finished(lab, lb)
            await lab.until(lambda: not silent.live, 5, "silent server released")
        [failure] = events(logs, "server connect failed")
        assert (failure["server"], failure["error"]) == ("p0", "timed out after 0.3s")
        assert [s.live for s in lb.service.pools["p"].servers] == [0, 0]

    @pytest_twisted.ensureDeferred
    async def test_client_leaving_during_the_handshake(
        self, lab: Lab, ca: CA, tmp_path: Path
    ) -> None:
        """A client that leaves while l4lb handshakes with the server cancels it cleanly."""
        silent = lab.backend(lab.peer)
        lb = start_l4lb(
            lab,
            config(
                [silent.address],
                verified(ca, tmp_path, "redis.internal"),
                pool='connect_timeout = "30s"',
            ),
        )
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer())
            await lab.until(lambda: silent.peers and silent.peers[0].received > 0, 5)
            client.transport.loseConnection()
            await lab.wait(client.closed.wait(), 5, "client closed")
            await finished(lab, lb)
            await lab.until(lambda: not silent.live, 5, "server connection aborted")
        [line] = events(logs, "connection closed")
        assert line["reason"] == "client closed"
        assert lb.service.pools["p"].servers[0].live == 0


@implementer(IHandshakeListener)
class _StopsReading(Peer):
    """A TLS server that stops reading once the handshake is done."""

    def handshakeCompleted(self) -> None:
        self.transport.pauseProducing()


class TestCloseLinger:
    @pytest_twisted.ensureDeferred
    async def test_close_to_a_server_that_stopped_reading_is_aborted(
        self, lab: Lab, ca: CA
    ) -> None:
        """A full close that cannot flush is aborted CLOSE_LINGER seconds later."""
        server = tls_backend(lab, ca.issue("s.internal"), _StopsReading)
        clock = task.Clock()
        endpoint = TLSClientEndpoint(
            TCP4ClientEndpoint(reactor, "127.0.0.1", server.port.getHost().port),
            optionsForClientTLS("s.internal", trustRoot=ca.twisted_cert()),
            clock,
        )
        client = lab.peer()
        lab.clients.append(client)
        await lab.wait(endpoint.connect(_Once(client)), 5, "TLS connect")
        for _ in range(16):  # far more than the socket buffers hold
            client.transport.write(b"x" * MiB)
        client.transport.loseConnection()
        await lab.settle(lambda: client.is_connected, polls=5)
        assert client.is_connected, "closed before the linger ran out"
        clock.advance(CLOSE_LINGER)
        await lab.wait(client.closed.wait(), 5, "aborted after the linger")
        [peer] = server.peers
        peer.transport.resumeProducing()  # to read the reset
        await lab.wait(peer.closed.wait(), 5, "server side gone")


class TestUnixServers:
    @pytest_twisted.ensureDeferred
    async def test_tls_over_a_unix_socket(
        self, lab: Lab, ca: CA, tmp_path: Path
    ) -> None:
        """A unix: server is reached over TLS and verified against server_name."""
        path = str(tmp_path / "tls.sock")
        backend = Backend(greeter(lab, "unix"))
        factory = TLSMemoryBIOFactory(
            server_options(ca.issue("sock.internal")), False, backend
        )
        factory.protocol = TLSMemoryBIOProtocol
        backend.port = reactor.listenUNIX(path, factory)
        lab.unix_paths.append(path)
        lab.backends.append(backend)
        lb = start_l4lb(
            lab,
            config(
                [f"unix:{path}"],
                verified(ca, tmp_path, "sock.internal"),
            ),
        )
        assert await round_trip(lab, lb.port) == b"I am unix\nping"
        await finished(lab, lb)
