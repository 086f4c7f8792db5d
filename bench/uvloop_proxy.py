"""A minimal asyncio + uvloop TCP proxy: the "other Python option" anchor.

Usage: ``python -m bench.uvloop_proxy LISTEN_PORT:HOST:PORT [...]``.  Each
argument forwards 127.0.0.1:LISTEN_PORT to HOST:PORT.  Flow control uses the
transports' write-buffer callbacks (pause the other side's reading while a
side's buffer is full), half-close passes EOF on, and bytes or an EOF that
arrive before the backend is connected are passed on once it is; nothing else.
"""

from __future__ import annotations

import asyncio
import sys


class Side(asyncio.Protocol):
    """One side of a proxied connection; ``peer`` is the other side."""

    def __init__(self, on_accept=None) -> None:  # type: ignore[no-untyped-def]
        self.on_accept = on_accept
        self.peer: Side | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.on_accept is not None:  # a client: hold it until the backend is up
            transport.pause_reading()  # type: ignore[attr-defined]
            asyncio.get_running_loop().create_task(self.on_accept(self))

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:  # backend still connecting (bytes read before the pause): keep them
            self.pending.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None:
            return True  # no backend yet: connect() passes the EOF on
        if peer.eof:  # both directions done
            peer.transport.close()
            return False
        peer.transport.write_eof()
        return True  # keep our write half open until the peer is done

    def connection_lost(self, exc: Exception | None) -> None:
        # Close each transport at most once: a first version that closed lost
        # transports again died with "double free" under redis-benchmark -k 0.
        self.transport = None
        peer = self.peer
        if (
            peer is not None
            and peer.transport is not None
            and not peer.transport.is_closing()
        ):
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.resume_reading()


async def serve(listen_port: int, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    async def connect(client: Side) -> None:
        try:
            _, server = await loop.create_connection(Side, host, port)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        client.peer, server.peer = server, client
        for chunk in client.pending:
            server.transport.write(chunk)  # type: ignore[union-attr]
        client.pending.clear()
        if client.transport is None or client.transport.is_closing():
            server.transport.close()  # type: ignore[union-attr]
        else:
            if client.eof:  # the client finished sending before we connected
                server.transport.write_eof()  # type: ignore[union-attr]
            client.transport.resume_reading()  # type: ignore[union-attr]

    return await loop.create_server(
        lambda: Side(connect), "127.0.0.1", listen_port, backlog=1024
    )


async def main(specs: list[str]) -> None:
    servers = []
    for spec in specs:
        listen, host, port = spec.split(":")
        servers.append(await serve(int(listen), host, int(port)))
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1:]))
