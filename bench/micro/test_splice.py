"""Per-chunk cost of the data path: 16 KiB chunks through a spliced `Session`.

Uses the unit tests' `Harness` (a frontend and pool on a fake reactor with
`StringTransport`s), so this is the Python cost per chunk alone: no syscalls.
"""

from __future__ import annotations

import pytest

from tests.fakes import Harness

CHUNK = bytes(16 * 1024)
BATCH = 64  # chunks per timed call; the transport buffer is emptied between calls


@pytest.fixture
def spliced():
    harness = Harness(1)
    client, client_transport, server, server_transport = harness.connected_pair()
    yield client, client_transport, server, server_transport
    client_transport.lose()
    server_transport.lose()


class TestSplice:
    def test_client_to_server(self, benchmark, spliced) -> None:
        """64 chunks from the client, written to the server transport."""
        client, _, _, server_transport = spliced

        def feed() -> None:
            server_transport.clear()
            for _ in range(BATCH):
                client.dataReceived(CHUNK)

        benchmark.extra_info["chunks_per_round"] = BATCH
        benchmark(feed)
        assert len(server_transport.value()) == BATCH * len(CHUNK)

    def test_server_to_client(self, benchmark, spliced) -> None:
        """64 chunks from the server, written to the client transport."""
        _, client_transport, server, _ = spliced

        def feed() -> None:
            client_transport.clear()
            for _ in range(BATCH):
                server.dataReceived(CHUNK)

        benchmark.extra_info["chunks_per_round"] = BATCH
        benchmark(feed)
        assert len(client_transport.value()) == BATCH * len(CHUNK)
