"""The TLS-bulk backend (a discard server) and the TLS-bulk client.

No packaged client pushes bulk data through a TLS listener and reports a
rate (``openssl s_time -reuse`` measures small page fetches, iperf3 has no
TLS), so the benchmark uses Python's own ``ssl`` module on the client side,
which is OpenSSL doing the crypto, and a uvloop discard server behind the
proxy.  Run ``python -m bench.sink PORT`` for the server.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
import time

CHUNK = 256 * 1024


class Discard(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # close our side too


def tls_bulk_send(host: str, port: int, seconds: float) -> dict[str, float]:
    """Send zeros over TLS for ``seconds``; the rate the client achieved.

    Counts bytes handed to the TLS socket; what sits in socket buffers at the
    end (a few MiB against GiBs sent) is the error bar.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    payload = bytes(CHUNK)
    sent = 0
    with (
        socket.create_connection((host, port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        start = time.monotonic()
        deadline = start + seconds
        while time.monotonic() < deadline:
            tls.sendall(payload)
            sent += CHUNK
        elapsed = time.monotonic() - start
    return {"bytes": float(sent), "seconds": elapsed}


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Discard, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(_serve(int(sys.argv[1])))
    except ImportError:
        asyncio.run(_serve(int(sys.argv[1])))
