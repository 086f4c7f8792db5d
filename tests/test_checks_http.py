"""The http check against a small local Twisted web server playing Patroni, and fakes."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import TCP6ClientEndpoint
from twisted.web.resource import Resource
from twisted.web.server import Site

from l4lb.config import HealthConfig
from l4lb.health.checks import make_check
from l4lb.health.checks.conversation import LIMIT
from tests.checkpeers import Fake, endpoint, fake_server, lab, run_check, run_on_fake

__all__ = ["lab"]


class Patroni(Resource):
    """Patroni's REST API, as far as role checks go: /primary and /replica."""

    isLeaf = True

    def __init__(self, leader: bool) -> None:
        super().__init__()
        self.leader = leader
        self.requests: list[tuple[bytes, bytes | None, bytes | None]] = []

    def render_GET(self, request: Any) -> bytes:
        self.requests.append(
            (request.path, request.getHeader(b"host"), request.getHeader(b"connection"))
        )
        role = b"primary" if self.leader else b"replica"
        ok = request.path in (b"/" + role, b"/health")
        request.setResponseCode(200 if ok else 503)
        request.setHeader("content-type", "application/json")
        return b'{"state": "running", "role": "%s"}' % role


@pytest_twisted.async_yield_fixture
async def patroni(lab: Any) -> Any:
    """A leader and a replica REST API on ephemeral ports: (resource, port) each."""
    servers = []
    for leader in (True, False):
        resource = Patroni(leader)
        site = Site(resource)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        servers.append((resource, port))
    yield servers
    for _, port in servers:
        await port.stopListening()


def no_server_channels() -> bool:
    return not any(type(r).__name__ == "Server" for r in reactor.getReaders())


class TestPatroni:
    """Roles told apart by status codes, as Patroni does."""

    @pytest_twisted.ensureDeferred
    async def test_primary_path(self, lab: Any, patroni: Any) -> None:
        """/primary is 200 on the leader and 503 on a replica; the request closes."""
        (leader, leader_port), (replica, replica_port) = patroni
        config = HealthConfig(type="http", path="/primary")
        port = leader_port.getHost().port
        result = await run_check(config, endpoint(port))
        assert (result.ok, result.reason) == (True, "HTTP status 200")
        result = await run_check(config, endpoint(replica_port.getHost().port))
        assert (result.ok, result.reason) == (False, "HTTP status 503, expected 200")
        assert leader.requests == [
            (b"/primary", f"127.0.0.1:{port}".encode(), b"close")
        ]
        await lab.until(lambda: no_server_channels(), 5, "server channels closed")

    @pytest_twisted.ensureDeferred
    async def test_expect_status_list(self, lab: Any, patroni: Any) -> None:
        """Any status in the list passes; the reason lists them when none matches."""
        (_, leader_port), _ = patroni
        config = HealthConfig(type="http", path="/replica", expect_status=(200, 503))
        result = await run_check(config, endpoint(leader_port.getHost().port))
        assert (result.ok, result.reason) == (True, "HTTP status 503")
        config = HealthConfig(type="http", path="/replica", expect_status=(200, 204))
        result = await run_check(config, endpoint(leader_port.getHost().port))
        assert result.reason == "HTTP status 503, expected 200 or 204"
        await lab.until(lambda: no_server_channels(), 5, "server channels closed")

    @pytest_twisted.ensureDeferred
    async def test_server_name_is_the_host(self, lab: Any, patroni: Any) -> None:
        """With server_name the Host header names it."""
        (leader, leader_port), _ = patroni
        config = HealthConfig(type="http", path="/primary", server_name="db1.example")
        result = await run_check(config, endpoint(leader_port.getHost().port))
        assert result.ok
        assert leader.requests[-1][1] == b"db1.example"
        await lab.until(lambda: no_server_channels(), 5, "server channels closed")


class TestHostHeader:
    """The Host header names the server the way HTTP wants it."""

    @pytest_twisted.ensureDeferred
    async def test_ipv6_in_brackets(self, lab: Any) -> None:
        """An IPv6 server address is bracketed, with its port."""
        seen: list[bytes] = []

        async def script(fake: Fake) -> None:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += await fake.take(1)
            seen.append(head)
            fake.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            fake.transport.loseConnection()

        server = fake_server(lab, script, host="::1")
        port = server.port.getHost().port
        ep = TCP6ClientEndpoint(reactor, "::1", port)
        result = await run_check(HealthConfig(type="http"), ep)
        assert (result.ok, result.reason) == (True, "HTTP status 200")
        assert seen[0].startswith(b"GET / HTTP/1.1\r\n")
        assert f"\r\nhost: [::1]:{port}\r\n".encode() in seen[0].lower()
        await lab.until(lambda: not server.live, 5, "closed")


class TestBadServers:
    """Servers that are not healthy HTTP servers give reasons, never errors."""

    @pytest_twisted.ensureDeferred
    async def test_not_http(self, lab: Any) -> None:
        """A server that answers in another protocol fails as not HTTP."""

        async def script(fake: Fake) -> None:
            await fake.take(1)
            fake.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

        result = await run_on_fake(
            lab, fake_server(lab, script), HealthConfig(type="http")
        )
        assert not result.ok
        assert result.reason.startswith("not an HTTP response")

    @pytest_twisted.ensureDeferred
    async def test_close_before_response(self, lab: Any) -> None:
        """A server that closes after the request is a failure in words."""

        async def script(fake: Fake) -> None:
            await fake.take(1)
            fake.transport.loseConnection()

        result = await run_on_fake(
            lab, fake_server(lab, script), HealthConfig(type="http")
        )
        assert (result.ok, result.reason) == (
            False,
            "server closed the connection while waiting for the HTTP response",
        )

    @pytest_twisted.ensureDeferred
    async def test_header_flood(self, lab: Any) -> None:
        """Endless headers fail at the byte limit."""

        async def script(fake: Fake) -> None:
            await fake.take(1)
            fake.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(2000):
                if not fake.is_connected:
                    return
                fake.write(b"X-Padding-%d: %s\r\n" % (i, b"x" * 100))

        result = await run_on_fake(
            lab, fake_server(lab, script), HealthConfig(type="http")
        )
        assert (result.ok, result.reason) == (
            False,
            f"HTTP response longer than {LIMIT} bytes",
        )

    @pytest_twisted.ensureDeferred
    async def test_cancel_silent_server(self, lab: Any) -> None:
        """Cancelling while the server is silent aborts the connection."""

        async def script(fake: Fake) -> None:
            await fake.take(1)

        server = fake_server(lab, script)
        d = make_check(HealthConfig(type="http"), reactor)(
            endpoint(server.port.getHost().port)
        )
        await lab.until(lambda: bool(server.live), 5, "connected")
        d.cancel()
        with pytest.raises(CancelledError):
            await d
        await lab.until(lambda: not server.live, 5, "closed")
