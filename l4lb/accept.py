"""A listening TCP port that costs less per accepted client.

Twisted's ``tcp.Port.doRead`` accepts through a generator, inside a log
buffering context, with ``socket.accept``, which converts the listening
socket's family and type to enums for each client. Each ``tcp.Server`` then
formats two strings (``logstr``, ``repstr``) that are only read when Twisted
logs about that connection, or when it is printed. `lean` switches a
listening ``tcp.Port`` to `Port`, whose ``doRead`` accepts directly and
builds `Server` transports that format those strings only when asked.
Anything unusual (``EMFILE``, ``EPERM``, other ``accept`` errors) goes to
Twisted's own ``doRead``, which knows how to recover.

Both `Server` and `l4lb.connector`'s client transport close without
``shutdown(2)`` first (``_shouldShutdown``): Twisted's own comment calls it
unnecessary, as sockets are close-on-exec and l4lb forks only to exec
(``spawnProcess``), so the ``close`` is the last reference and sends the FIN.

Private Twisted attributes used here (``Port.sessionno``,
``numberAccepts``, ``_realPortNumber``, ``_addressType``, ``_buildAddr``,
``_shouldShutdown``, ``Server``'s attributes) are checked by
``tests/test_accept.py``.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import address, tcp
from twisted.python import log

from l4lb.shapes import TCP_SERVER, prime

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)

# The transport `Port.doRead` is handing to its protocol, until it starts
# reading (None once the protocol stopped reading during makeConnection).
_unstarted: Server | None = None


class Server(tcp.Server):
    """``tcp.Server`` with its log strings made on demand, closed without ``shutdown``."""

    _shouldShutdown = False

    def __init__(
        self,
        sock: socket.socket,
        protocol: Any,
        client: tuple[Any, ...],
        server: Any,
        sessionno: int,
        reactor: Any,
    ) -> None:
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.connected = 1
        # Reading starts after makeConnection (`Port.doRead`) unless the
        # protocol stopped it: see `stopReading`.

    def stopReading(self) -> None:
        """Twisted's; also cancels the start of reading `Port.doRead` would make.

        ``tcp.Server`` starts reading before ``makeConnection``; a protocol that
        pauses its client at once (l4lb's session, when the client's bytes
        already wait for a backend) then costs an epoll register and an
        unregister for nothing. `Server` starts reading after
        ``makeConnection`` instead, unless the protocol stopped reading (or
        closed) meanwhile: the state is the same as with Twisted's order.
        """
        global _unstarted
        if self is _unstarted:
            _unstarted = None
        super().stopReading()

    @property  # type: ignore[override]
    def logstr(self) -> str:
        logstr = self.__dict__.get("_logstr")
        if logstr is None:
            prefix = self._getLogPrefix(self.protocol)
            logstr = f"{prefix},{self.sessionno},{self.hostname}"
        return logstr

    @logstr.setter
    def logstr(self, value: str) -> None:
        self.__dict__["_logstr"] = value

    @property  # type: ignore[override]
    def repstr(self) -> str:
        repstr = self.__dict__.get("_repstr")
        if repstr is None:
            name = self.protocol.__class__.__name__
            repstr = f"<{name} #{self.sessionno} on {self.server._realPortNumber}>"
        return repstr

    @repstr.setter
    def repstr(self, value: str) -> None:
        self.__dict__["_repstr"] = value


prime(Server, TCP_SERVER)


class Port(tcp.Port):
    """``tcp.Port`` whose ``doRead`` accepts with less work per client."""

    transport = Server

    def doRead(self) -> None:
        global _unstarted
        listener = self.socket
        accept = listener._accept
        family, kind, proto = int(listener.family), int(listener.type), listener.proto
        build = self.factory.buildProtocol
        build_addr = self._buildAddr
        reactor = self.reactor
        limit = self.numberAccepts
        accepted = 0
        try:
            while accepted < limit:
                try:
                    fd, addr = accept()
                except OSError as e:
                    if e.errno in _AGAIN:
                        break
                    # EMFILE recovery and the rest: Twisted's own accept loop.
                    self.numberAccepts = max(1, limit - accepted)
                    super().doRead()
                    return
                accepted += 1
                skt = socket.socket(family, kind, proto, fileno=fd)
                if len(addr) == 4:
                    host = socket.getnameinfo(
                        addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
                    )
                    addr = (host[0], *addr[1:])
                protocol = build(build_addr(addr))
                if protocol is None:
                    skt.close()
                    continue
                s = self.sessionno
                self.sessionno = s + 1
                transport = self.transport(skt, protocol, addr, self, s, reactor)
                _unstarted = transport
                try:
                    protocol.makeConnection(transport)
                finally:
                    if _unstarted is transport:
                        _unstarted = None
                        transport.startReading()
            if accepted == limit:
                self.numberAccepts = limit + 20
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:
            log.deferr()


def lean(port: object) -> bool:
    """Switch a listening Twisted ``tcp.Port`` (exactly) to `Port`; True if done."""
    if type(port) is not tcp.Port:
        return False
    port.__class__ = Port
    return True
