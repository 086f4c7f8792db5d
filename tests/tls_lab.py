"""Lab helpers for TLS tests: TLS backends, TLS clients, l4lb from any TOML.

Backends terminate TLS with Twisted's own TLS layer around the usual test
peers; clients are Twisted TLS clients (`wrapClientTLS`) around a `Peer`.
Everything is registered with the `Lab`, so its teardown checks apply.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from l4lb.config import parse_config
from l4lb.service import L4LBService
from tests.loopback import L4LB, Backend, Echo, Lab, Peer, _Once
from tests.tls_material import CA, Issued, server_options


@implementer(IHandshakeListener)
class Greeter(Echo):
    """An echo server that first says its name (so a test sees who answered).

    It speaks once the handshake is done: a write before that would make
    the TLS layer pause its producer, which for `Echo` is its own transport,
    and the handshake would never be read.
    """

    def __init__(self, name: bytes, **kw: Any) -> None:
        super().__init__(**kw)
        self.name = name

    def handshakeCompleted(self) -> None:
        self.transport.write(b"I am " + self.name + b"\n")


def tls_backend(
    lab: Lab, issued: Issued, make: Any, client_ca: CA | None = None
) -> Backend:
    """A TLS server on 127.0.0.1 with ``issued``'s certificate.

    Plain `TLSMemoryBIOProtocol`, not the buffering one: the buffering one
    can send close_notify before the echo it buffered in the same turn.
    """
    backend = Backend(make)
    factory = TLSMemoryBIOFactory(server_options(issued, client_ca), False, backend)
    factory.protocol = TLSMemoryBIOProtocol
    backend.port = lab.reactor.listenTCP(0, factory, interface="127.0.0.1")
    port = backend.port.getHost().port
    backend.address = f"127.0.0.1:{port}"
    lab.tcp_ports.append(("127.0.0.1", port))
    lab.backends.append(backend)
    return backend


async def tls_connect(
    lab: Lab,
    port: int,
    peer: Peer,
    server_name: str | None,
    ca: CA | None = None,
) -> Peer:
    """A TLS client to 127.0.0.1:``port`` sending ``server_name`` as SNI.

    With ``ca`` the server certificate is verified for ``server_name``;
    without a name no SNI is sent and nothing is verified.
    """
    if server_name is None:
        creator: Any = CertificateOptions()
    else:
        creator = optionsForClientTLS(
            server_name, trustRoot=ca.twisted_cert() if ca else None
        )
    endpoint = wrapClientTLS(
        creator, TCP4ClientEndpoint(lab.reactor, "127.0.0.1", port, timeout=5)
    )
    lab.clients.append(peer)
    await lab.wait(endpoint.connect(_Once(peer)), 5, f"TLS connect to port {port}")
    return peer


def start_l4lb(lab: Lab, text: str, frontend: str = "fe") -> L4LB:
    """Parse ``text``, build and start l4lb; ``frontend`` is the one to watch."""
    config = parse_config(text, "<test>")
    service = L4LBService(config, lab.reactor)
    service.startService()
    for fe in service.frontends.values():
        assert fe.port is not None
        lab.tcp_ports.append((fe.port.getHost().host, fe.port.getHost().port))
    watched = service.frontends[frontend]
    lb = L4LB(service, watched, watched.port.getHost().port)
    lab.services.append(lb)
    return lb


def pools_text(pools: dict[str, list[str]], extra: dict[str, str] | None = None) -> str:
    """[pool.X] tables for ``pools`` (name → server addresses), plus extra lines."""
    text = ""
    for name, addresses in pools.items():
        text += f"[pool.{name}]\n{(extra or {}).get(name, '')}\n"
        for i, address in enumerate(addresses):
            text += (
                f'[[pool.{name}.server]]\nname = "{name}{i}"\naddress = "{address}"\n'
            )
    return text
