"""``twistd -n l4lb --demo``: three small echo backends behind one frontend.

A newcomer sees balancing and the log line without setting anything up. Each
backend greets a client with its name and echoes lines back prefixed by it.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

BACKENDS = ("backend-1", "backend-2", "backend-3")


@implementer(IHalfCloseableProtocol)
class NamedEcho(LineReceiver):
    delimiter = b"\n"

    def readConnectionLost(self) -> None:
        # `nc -N` / socat send a line then FIN: answer it before closing.
        self.transport.loseConnection()

    def connectionMade(self) -> None:
        self.sendLine(b"hello from " + self.factory.name.encode())

    def lineReceived(self, line: bytes) -> None:
        self.sendLine(self.factory.name.encode() + b": " + line.rstrip(b"\r"))


class NamedEchoFactory(ServerFactory):
    protocol = NamedEcho
    noisy = False

    def __init__(self, name: str) -> None:
        self.name = name


class DemoBackends(Service):
    """Listens at once (so the config can name the ports); stops with the service."""

    name = "demo-backends"

    def __init__(self, reactor: Any) -> None:
        self.ports = [
            reactor.listenTCP(0, NamedEchoFactory(name), interface="127.0.0.1")
            for name in BACKENDS
        ]

    def config_text(self, listen: str) -> str:
        servers = "".join(
            f'[[pool.demo.server]]\nname = "{name}"\n'
            f'address = "127.0.0.1:{port.getHost().port}"\n\n'
            for name, port in zip(BACKENDS, self.ports, strict=True)
        )
        return (
            '[global]\nlog_format = "console"\nshutdown_grace = "2s"\n\n'
            f'[frontend.demo]\nlisten = "{listen}"\npool = "demo"\n\n'
            '[pool.demo]\nbalance = "least-connections"\n\n' + servers
        )

    def stopService(self) -> Any:
        super().stopService()
        from twisted.internet.defer import gatherResults

        return gatherResults([port.stopListening() for port in self.ports])
