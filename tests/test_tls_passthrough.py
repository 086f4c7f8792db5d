"""SNI passthrough over real sockets: routing by name, refusals, limits.

The backends terminate TLS themselves (Twisted TLS servers with certificates
made at test time); l4lb only reads the ClientHello and forwards bytes, so a
client that verifies the certificate it got proves the backend's own
certificate came through untouched.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from structlog.testing import capture_logs

from tests.loopback import Lab, Peer
from tests.test_clienthello import python_hello
from tests.tls_lab import Greeter, pools_text, start_l4lb, tls_backend, tls_connect
from tests.tls_material import CA, peer_common_name


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


def closed_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "connection closed"]


class Site:
    """Two routed pools and a default one, each with one named TLS backend."""

    def __init__(
        self,
        lab: Lab,
        ca: CA,
        *,
        default: bool = True,
        frontend: str = "",
        extra: str = "",
    ) -> None:
        self.backends = {
            name: tls_backend(
                lab,
                ca.issue(f"{name}.example.com", f"*.{name}.example.com", *extra),
                lambda name=name: Greeter(name.encode(), on_error=lab.record_error),
            )
            for name, extra in (("a", ()), ("b", ()), ("default", ("*.example.com",)))
        }
        text = (
            '[frontend.fe]\nlisten = "127.0.0.1:0"\n'
            'route_by_sni = { "a.example.com" = "pa", "*.b.example.com" = "pb",'
            ' "b.example.com" = "pb" }\n'
            + ('pool = "pdefault"\n' if default else "")
            + frontend
            + "\n"
            + pools_text({f"p{n}": [b.address] for n, b in self.backends.items()})
            + extra
        )
        self.lb = start_l4lb(lab, text)

    def connections(self) -> dict[str, int]:
        return {name: len(b.peers) for name, b in self.backends.items()}


async def greeting(lab: Lab, peer: Peer) -> bytes:
    await lab.until(lambda: peer.data and peer.data.endswith(b"\n"), 5, "greeting")
    return bytes(peer.data or b"")


async def close(lab: Lab, peer: Peer) -> None:
    peer.transport.loseConnection()
    await lab.wait(peer.closed.wait(), 5, "client closed")


async def finished(lab: Lab, site: Site) -> None:
    await lab.until(lambda: not site.lb.frontend.sessions, 5, "sessions finished")


class TestRouting:
    @pytest_twisted.ensureDeferred
    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("a.example.com", "a"),
            ("A.EXAMPLE.COM", "a"),
            ("b.example.com", "b"),
            ("eu.b.example.com", "b"),
            ("c.example.com", "default"),
        ],
    )
    async def test_sni_picks_the_pool(
        self, lab: Lab, ca: CA, name: str, expected: str
    ) -> None:
        """Each name reaches its pool's server, whose own certificate the client verifies."""
        site = Site(lab, ca)
        with capture_logs() as logs:
            client = await tls_connect(lab, site.lb.port, lab.peer(keep=True), name, ca)
            assert await greeting(lab, client) == f"I am {expected}\n".encode()
            assert peer_common_name(client.transport) == f"{expected}.example.com"
            client.transport.write(b"ping")
            await lab.until(lambda: client.data.endswith(b"ping"), 5, "echo")
            await close(lab, client)
            await finished(lab, site)
        assert site.connections() == {
            n: int(n == expected) for n in ("a", "b", "default")
        }
        [line] = closed_lines(logs)
        assert line["pool"] == f"p{expected}"
        assert line["sni"] == name.lower()

    @pytest_twisted.ensureDeferred
    async def test_two_names_two_pools_at_once(self, lab: Lab, ca: CA) -> None:
        """Concurrent clients for a and b are served by different backends."""
        site = Site(lab, ca)
        a = await tls_connect(
            lab, site.lb.port, lab.peer(keep=True), "a.example.com", ca
        )
        b = await tls_connect(
            lab, site.lb.port, lab.peer(keep=True), "b.example.com", ca
        )
        assert await greeting(lab, a) == b"I am a\n"
        assert await greeting(lab, b) == b"I am b\n"
        await close(lab, a)
        await close(lab, b)
        await finished(lab, site)

    @pytest_twisted.ensureDeferred
    async def test_no_sni_goes_to_the_default_pool(self, lab: Lab, ca: CA) -> None:
        """A client that sends no server name is served by the default pool."""
        site = Site(lab, ca)
        with capture_logs() as logs:
            client = await tls_connect(lab, site.lb.port, lab.peer(keep=True), None)
            assert await greeting(lab, client) == b"I am default\n"
            await close(lab, client)
            await finished(lab, site)
        assert closed_lines(logs)[0]["sni"] is None


class TestRefusals:
    @pytest_twisted.ensureDeferred
    @pytest.mark.parametrize(
        ("name", "detail"),
        [
            ("c.example.com", "SNI 'c.example.com' matches no route"),
            (None, "the client sent no SNI"),
        ],
    )
    async def test_unrouted_client_refused_without_default(
        self, lab: Lab, ca: CA, name: str | None, detail: str
    ) -> None:
        """Without a default pool an unmatched or absent SNI is closed and logged."""
        site = Site(lab, ca, default=False)
        with capture_logs() as logs:
            # The TLS client is connected once TCP is; its handshake never ends.
            client = await tls_connect(lab, site.lb.port, lab.peer(), name, ca)
            await lab.wait(client.closed.wait(), 5, "refused client closed")
            await finished(lab, site)
        assert site.connections() == {"a": 0, "b": 0, "default": 0}
        [line] = closed_lines(logs)
        assert line["reason"] == "no route"
        assert line["detail"] == f"{detail} and the frontend has no default pool"
        assert line["pool"] is None and line["server"] is None

    @pytest_twisted.ensureDeferred
    @pytest.mark.parametrize(
        ("data", "reason", "detail"),
        [
            (
                b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
                "malformed client hello",
                "first handshake message has type 2, not ClientHello",
            ),
            (b"GET / HTTP/1.1\r\n\r\n", "not tls", "first byte 0x47"),
        ],
    )
    async def test_bad_hello_closed_and_logged(
        self, lab: Lab, ca: CA, data: bytes, reason: str, detail: str
    ) -> None:
        """Malformed or non-TLS first bytes close the client; the frontend goes on."""
        site = Site(lab, ca)
        with capture_logs() as logs:
            client = await lab.connect(site.lb.port, lab.peer(close_on_eof=True))
            client.transport.write(data)
            await lab.wait(client.closed.wait(), 5, "bad client closed")
            await finished(lab, site)
            good = await tls_connect(
                lab, site.lb.port, lab.peer(keep=True), "a.example.com", ca
            )
            assert await greeting(lab, good) == b"I am a\n"
            await close(lab, good)
            await finished(lab, site)
        assert site.connections() == {"a": 1, "b": 0, "default": 0}
        bad = closed_lines(logs)[0]
        assert bad["reason"] == reason
        assert bad["pool"] is None
        assert detail in bad["detail"]

    @pytest_twisted.ensureDeferred
    async def test_silent_client_times_out(self, lab: Lab, ca: CA) -> None:
        """A client that sends half a hello is closed at handshake_timeout."""
        site = Site(lab, ca, frontend='handshake_timeout = "300ms"\n')
        hello = python_hello("a.example.com")
        with capture_logs() as logs:
            client = await lab.connect(site.lb.port, lab.peer(close_on_eof=True))
            client.transport.write(hello[:40])
            await lab.wait(client.closed.wait(), 5, "slow client closed")
            await finished(lab, site)
        assert site.connections() == {"a": 0, "b": 0, "default": 0}
        [line] = closed_lines(logs)
        assert line["reason"] == "client hello timeout"
        assert line["detail"] == "no complete ClientHello within 0.3s (got 40 bytes)"
        assert 0.3 <= line["duration"] < 3

    @pytest_twisted.ensureDeferred
    async def test_no_server_connection_before_the_hello(
        self, lab: Lab, ca: CA
    ) -> None:
        """A hello arriving in pieces is forwarded whole once complete, not before."""
        site = Site(lab, ca)
        hello = python_hello("b.example.com")
        client = await lab.connect(site.lb.port, lab.peer(keep=True))
        for start in range(0, len(hello) - 1, 100):
            client.transport.write(hello[start : min(start + 100, len(hello) - 1)])
            await lab.settle(lambda: len(site.lb.frontend.sessions), polls=3)
            assert site.connections() == {"a": 0, "b": 0, "default": 0}
        client.transport.write(hello[-1:])
        await lab.until(lambda: site.connections()["b"] == 1, 5, "backend b reached")
        # The backend got a real ClientHello and answered with its handshake.
        await lab.until(lambda: client.received > 0, 5, "ServerHello forwarded")
        assert client.data[:1] == b"\x16"
        await close(lab, client)
        await finished(lab, site)

    @pytest_twisted.ensureDeferred
    async def test_client_leaving_mid_hello(self, lab: Lab, ca: CA) -> None:
        """A client that half-closes during its hello ends the session quietly."""
        site = Site(lab, ca)
        with capture_logs() as logs:
            client = await lab.connect(site.lb.port, lab.peer())
            client.transport.write(python_hello("a.example.com")[:30])
            client.transport.loseWriteConnection()
            await lab.wait(client.closed.wait(), 5, "client closed")
            await finished(lab, site)
        [line] = closed_lines(logs)
        assert line["reason"] == "client closed"
        assert site.connections() == {"a": 0, "b": 0, "default": 0}

    @pytest_twisted.ensureDeferred
    async def test_stop_while_a_client_sends_its_hello(self, lab: Lab, ca: CA) -> None:
        """A graceful stop closes a client still in its hello, leaving no timer behind."""
        site = Site(lab, ca, extra='[global]\nshutdown_grace = "100ms"\n')
        client = await lab.connect(site.lb.port, lab.peer(close_on_eof=True))
        client.transport.write(python_hello("a.example.com")[:40])
        await lab.until(lambda: len(site.lb.frontend.sessions) == 1, 5, "session")
        with capture_logs() as logs:
            await lab.wait(site.lb.service.stopService(), 5, "l4lb stopped")
            await lab.wait(client.closed.wait(), 5, "client closed")
        [line] = closed_lines(logs)
        assert line["reason"] == "shutdown"
        assert site.connections() == {"a": 0, "b": 0, "default": 0}
