"""Property test of the session state machine: any order of peer events ends cleanly.

Hypothesis drives one session through a random sequence of what peers and time
can do (connect results, bytes, FINs, resets, clock jumps). Whatever the order,
once the peers are gone the session must have logged exactly one line, given
back its server slot and its place under the caps, and left no timer behind;
every byte read from one side must have been written to the other, in order.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from twisted.internet import error

from tests.fakes import FakeTransport, Harness

ACTIONS = st.sampled_from(
    [
        "complete",
        "refuse",
        "client_data",
        "server_data",
        "client_eof",
        "server_eof",
        "client_reset",
        "server_reset",
        "tick",
        "long_wait",
    ]
)


class World:
    """One client through a two-server pool, with the fake peers' state."""

    def __init__(self) -> None:
        self.h = Harness(
            servers=2,
            pool={"retries": 2, "connect_timeout": 3.0},
            frontend={"idle_timeout": 30.0, "half_closed_timeout": 10.0},
        )
        self.client, self.client_transport = self.h.accept()
        self.server_transport: FakeTransport | None = None
        self.sent_by_client = b""
        self.sent_by_server = b""
        self.n = 0

    @property
    def session(self):
        return self.client.session

    def server(self):
        return self.session.server

    def can_send(self, transport: FakeTransport | None, eof: bool) -> bool:
        return (
            transport is not None
            and transport.connected
            and not transport.disconnecting
            and not eof
            and transport.producerState != "paused"
        )

    def apply(self, action: str) -> None:
        h, s = self.h, self.session
        if action in ("complete", "refuse") and h.pending_attempts():
            if action == "complete":
                _, _, self.server_transport = h.complete()
            else:
                h.refuse()
        elif action == "client_data" and self.can_send(
            self.client_transport, s._client_eof
        ):
            self.n += 1
            data = b"c%d;" % self.n
            self.sent_by_client += data
            self.client.dataReceived(data)
        elif action == "server_data" and self.can_send(
            self.server_transport, s._server_eof
        ):
            self.n += 1
            data = b"s%d;" % self.n
            self.sent_by_server += data
            self.server().dataReceived(data)
        elif (
            action == "client_eof"
            and self.can_send(self.client_transport, s._client_eof)
            and s.server is not None
        ):
            self.client_transport.peer_sends_eof()
        elif action == "server_eof" and self.can_send(
            self.server_transport, s._server_eof
        ):
            self.server_transport.peer_sends_eof()
        elif action == "client_reset":
            self.client_transport.lose(error.ConnectionLost)
        elif action == "server_reset" and self.server_transport is not None:
            self.server_transport.lose(error.ConnectionLost)
        elif action == "tick":
            h.clock.advance(1)
        elif action == "long_wait":
            h.clock.advance(15)

    def settle(self) -> None:
        """Let every close that was asked for complete, as real transports would."""
        for _ in range(200):
            transports = [self.client_transport, self.server_transport]
            closing = [
                t
                for t in transports
                if t is not None and t.connected and t.disconnecting
            ]
            for transport in closing:
                transport.lose()
            if self.h.pending_attempts():
                self.h.refuse()
                continue
            if not closing:
                if self.client_transport.connected:
                    self.client_transport.lose()  # the client goes away in the end
                    continue
                if (
                    self.server_transport is not None
                    and self.server_transport.connected
                ):
                    self.server_transport.lose()
                    continue
                return
        raise AssertionError("session never settled")


@settings(max_examples=300, deadline=None)
@given(actions=st.lists(ACTIONS, max_size=25))
def test_any_event_order_ends_cleanly(actions: list[str]) -> None:
    """Whatever peers and time do, the session ends with one line and nothing leaked."""
    with capture_logs() as logs:
        world = World()
        for action in actions:
            world.apply(action)
        world.settle()
    h = world.h
    lines = [e for e in logs if e["event"] == "connection closed"]
    assert len(lines) == 1, lines
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert [s.live for s in h.pool.servers] == [0, 0]
    assert h.pool.queued == 0
    assert h.cap.live == 0
    assert not h.frontend.sessions
    assert h.clock.getDelayedCalls() == []
    # No byte lost or reordered on the way: what one side read, the other got.
    if world.server_transport is not None:
        assert world.server_transport.value() == world.sent_by_client
    assert world.client_transport.value() == world.sent_by_server
    line = lines[0]
    assert line["bytes_from_client"] == len(world.sent_by_client)
    assert line["bytes_from_server"] == len(world.sent_by_server)
    assert line["reason"] in {
        "client closed",
        "server closed",
        "idle timeout",
        "half-closed timeout",
        "connect failed",
    }
