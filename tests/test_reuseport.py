"""SO_REUSEPORT listening sockets: addresses, sharing, and errors."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ServerFactory

from l4lb.config import parse_config
from l4lb.reuseport import (
    BindAddress,
    ReusePortEndpoint,
    bind_address,
    reuseport_socket,
)

TEXT = """\
[frontend.f]
listen = {listen}
pool = "p"
[pool.p]
[[pool.p.server]]
address = "127.0.0.1:1"
"""


def frontend(listen: str) -> object:
    return parse_config(TEXT.format(listen=listen), "x.toml").frontends[0]


class TestBindAddress:
    @pytest.mark.parametrize(
        ("listen", "expected"),
        [
            ('"127.0.0.1:7000"', BindAddress(socket.AF_INET, "127.0.0.1", 7000)),
            ('":7000"', BindAddress(socket.AF_INET, "0.0.0.0", 7000)),
            ('"[::1]:7000"', BindAddress(socket.AF_INET6, "::1", 7000)),
            (
                '"tcp:7000:interface=127.0.0.2"',
                BindAddress(socket.AF_INET, "127.0.0.2", 7000),
            ),
            ('"tcp6:7000"', BindAddress(socket.AF_INET6, "::", 7000)),
        ],
    )
    def test_forms(self, listen: str, expected: BindAddress) -> None:
        """Every TCP listen form binds what Twisted's own endpoint would."""
        assert bind_address(frontend(listen)) == expected  # type: ignore[arg-type]

    def test_port_override(self) -> None:
        """The supervisor's port replaces port 0."""
        assert bind_address(frontend('"127.0.0.1:0"'), 4242).port == 4242  # type: ignore[arg-type]

    def test_unix_refused(self) -> None:
        """A unix: listener has no TCP address."""
        with pytest.raises(ValueError, match="not a TCP address"):
            bind_address(frontend('"unix:/tmp/x.sock"'))  # type: ignore[arg-type]


class TestSharing:
    def test_reserved_port_is_shared_by_listeners(self) -> None:
        """A bound, not listening socket reserves a port that two listeners then share."""
        reserve = reuseport_socket(BindAddress(socket.AF_INET, "127.0.0.1", 0))
        try:
            port = reserve.getsockname()[1]
            address = BindAddress(socket.AF_INET, "127.0.0.1", port)
            one = reuseport_socket(address, backlog=8)
            two = reuseport_socket(address, backlog=8)
            try:
                assert not one.getblocking()
                with socket.create_connection(("127.0.0.1", port), timeout=5):
                    pass
            finally:
                one.close()
                two.close()
        finally:
            reserve.close()

    def test_taken_port_fails_with_cannot_listen(self) -> None:
        """A port held without SO_REUSEPORT gives CannotListenError, not a crash."""
        from twisted.internet.testing import MemoryReactor

        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        try:
            port = holder.getsockname()[1]
            endpoint = ReusePortEndpoint(
                MemoryReactor(),
                frontend(f'"127.0.0.1:{port}"'),  # type: ignore[arg-type]
            )
            failures: list[object] = []
            endpoint.listen(ServerFactory()).addErrback(failures.append)
            assert failures[0].check(CannotListenError)  # type: ignore[attr-defined]
        finally:
            holder.close()

    def test_adopts_into_the_reactor(self) -> None:
        """The socket is handed to ``adoptStreamPort`` with its family and the factory."""
        adopted: list[tuple[int, int, object]] = []

        class Reactor:
            def adoptStreamPort(self, fd: int, family: int, factory: object) -> str:
                adopted.append((fd, family, factory))
                return "port"

        factory = ServerFactory()
        endpoint = ReusePortEndpoint(Reactor(), frontend('"127.0.0.1:0"'))  # type: ignore[arg-type]
        results: list[object] = []
        endpoint.listen(factory).addCallback(results.append)
        assert results == ["port"]
        assert adopted[0][1:] == (socket.AF_INET, factory)
