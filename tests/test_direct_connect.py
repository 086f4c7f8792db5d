"""The session's fast connect path (`Session._connect_direct`): same behaviour.

Every connect, half-close, timeout and queue test of ``test_proxy`` runs
again with endpoints that offer ``connect_direct`` (callbacks, no Deferred),
as `l4lb.connector.DirectTCPEndpoint` does on a real reactor.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import fakes, test_proxy
from tests.fakes import Harness


@pytest.fixture(autouse=True)
def _direct_endpoints(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(fakes.Harness, "direct", True)
    yield


class TestConnectDirect(test_proxy.TestConnect):
    def test_no_coroutine_on_the_fast_path(self) -> None:
        """A server with room is connected through ``connect_direct``."""
        h = Harness()
        client, _ = h.accept()
        assert type(client.session._connecting).__name__ == "_DirectAttempt"
        h.complete()
        assert client.session._connecting is None
        assert client.session.connect_time is not None

    def test_timeout_then_retry_through_the_coroutine(self) -> None:
        """After a timed-out direct attempt, the retry is `Session.connect`'s."""
        h = Harness(servers=2, pool={"connect_timeout": 1.0, "retries": 1})
        client, client_transport = h.accept()
        first, _, _ = h.only_attempt()
        h.clock.advance(1.5)
        second, _, _ = h.only_attempt()
        assert second != first
        assert client.session.retries == 1
        assert type(client.session._connecting).__name__ == "Deferred"
        h.complete()
        assert not client_transport.disconnecting

    def test_closing_while_connecting_releases_the_server(self) -> None:
        """`Session.close` during a direct attempt cancels it and frees the slot."""
        h = Harness()
        client, client_transport = h.accept()
        name, _, _ = h.only_attempt()
        client.session.close("stopping")
        assert h.endpoints[name].cancelled == 1
        assert all(s.live == 0 for s in h.pool.servers)
        assert client.session._connecting is None
        client_transport.lose()
        assert h.cap.live == 0


class TestHalfCloseDirect(test_proxy.TestHalfClose):
    pass


class TestTimeoutsDirect(test_proxy.TestTimeouts):
    pass


class TestQueueDirect(test_proxy.TestQueue):
    pass


class TestLogLineDirect(test_proxy.TestLogLine):
    pass


class TestEndpointDeclines:
    def test_none_from_connect_direct_means_the_coroutine(self) -> None:
        """``connect_direct`` returning None (a fake reactor): `Session.connect`
        connects the server already picked, with the endpoint's ``connect``."""
        h = Harness(servers=1)
        endpoint = h.endpoints["s0"]
        endpoint.connect_direct = lambda *args: None  # type: ignore[method-assign]
        client, client_transport = h.accept()
        assert type(client.session._connecting).__name__ == "Deferred"
        assert h.pool.servers[0].live == 1  # reserved once, not twice
        h.complete()
        assert not client_transport.disconnecting
        assert client.session.server_state is h.pool.servers[0]
