"""Listening sockets shared by worker processes through ``SO_REUSEPORT``.

Each worker opens its own listening socket on the frontend's address with
``SO_REUSEPORT``; the kernel then spreads new connections over the workers'
sockets by a hash of the client's address and port, and each worker accepts
from its own queue (no thundering herd, no shared accept lock). Twisted's
endpoints cannot set that option, so l4lb makes the socket itself and hands
it to the reactor with ``adoptStreamPort``, which gives back an ordinary
``tcp.Port`` (pausable, ``numberAccepts``) like ``endpoint.listen`` would.

The supervisor *binds* (without listening) one such socket per frontend before
starting the workers: that checks the address at start-up (a clear error
instead of N crashing workers), resolves port 0 to one real port that every
worker then shares, and holds the port across worker restarts. A bound socket
that is not listening takes no connections, so it does not skew the spread.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from l4lb.config import _listen  # the parsed form of a frontend's ``listen``

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort, IProtocolFactory

    from l4lb.config import FrontendConfig


@attrs.frozen
class BindAddress:
    """Where a frontend's TCP socket binds."""

    family: socket.AddressFamily
    host: str
    port: int


def bind_address(config: FrontendConfig, port: int | None = None) -> BindAddress:
    """The address ``config.listen`` binds, with ``port`` in place of its own if given.

    Only TCP listeners have one (config refuses others when ``workers > 1``).
    ``":6380"`` binds 0.0.0.0 like Twisted's ``tcp:6380`` does.
    """
    parsed = _listen(config.listen)
    if parsed.bind[0] != "tcp":
        raise ValueError(
            f"frontend.{config.name}: {config.listen} is not a TCP address"
        )
    _, ip, own_port = parsed.bind
    if parsed.kind == "tcp6":
        family, host = socket.AF_INET6, "::" if ip is None else str(ip)
    else:
        family, host = socket.AF_INET, "0.0.0.0" if ip is None else str(ip)
        if ip is not None and ip.version == 6:
            family = socket.AF_INET6
    return BindAddress(family, host, own_port if port is None else port)


def reuseport_socket(address: BindAddress, backlog: int | None = None) -> socket.socket:
    """A socket bound to ``address`` with ``SO_REUSEPORT``; listening if ``backlog``.

    Non-blocking, as the reactor needs. The caller owns (and closes) it.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
        if backlog is not None:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A server endpoint listening on a fresh ``SO_REUSEPORT`` socket.

    ``port`` overrides the configured port (the one the supervisor resolved
    when the config says port 0).
    """

    def __init__(
        self, reactor: Any, config: FrontendConfig, port: int | None = None
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.address = bind_address(config, port)

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        address = self.address
        try:
            sock = reuseport_socket(address, self.config.backlog)
        except OSError as error:
            return fail(CannotListenError(address.host, address.port, error))
        try:
            # adoptStreamPort duplicates the descriptor: ours is closed below.
            port = self.reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
        finally:
            sock.close()
        return succeed(port)
