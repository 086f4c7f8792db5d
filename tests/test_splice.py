"""Zero-copy splicing (`l4lb.splice`): the switch, the pipe pool, and the fast path.

The data-path contract itself (bulk integrity, half-close, slow readers) runs
on both paths in `tests/test_integration.py` (``BOTH_PATHS``) and
`tests/test_e2e.py`; these tests cover what only the fast path has: when it is
used, that an idle connection holds no pipe, timeouts seeing spliced bytes, and
the copy fallback when no pipe can be made.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import reactor
from twisted.internet.testing import StringTransport

from l4lb import splice
from l4lb.config import ConfigError, GlobalConfig, parse_config
from l4lb.proxy import Session
from tests.loopback import CLOSE, HALF_CLOSE, Lab, MiB, Peer, config_text

pytestmark = pytest.mark.skipif(
    not splice.supported(), reason="no splice(2) on this system"
)


@pytest_twisted.async_yield_fixture
async def lab() -> Any:
    """The test's ports, services and connections; fails the test on leftovers.

    l4lb runs with its default (splice on) whatever L4LB_TEST_SPLICE says.
    """
    lab = Lab(reactor)
    lab.splice = None
    yield lab
    problems = await lab.teardown()
    assert not problems, "left behind by the test:\n" + "\n".join(problems)


def only_session(lb: Any) -> Session:
    (session,) = lb.frontend.sessions
    return session


def closed_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "connection closed"]


class TestConfig:
    def test_on_by_default(self) -> None:
        """Without a ``splice`` key the fast path is on."""
        cfg = parse_config(config_text({"b": "127.0.0.1:1"}), "x.toml")
        assert cfg.global_.splice is True
        assert GlobalConfig().splice is True

    @pytest.mark.parametrize("value", [True, False])
    def test_explicit_value(self, value: bool) -> None:
        """``splice = true|false`` is taken as written."""
        text = config_text({"b": "127.0.0.1:1"}, splice=value)
        assert parse_config(text, "x.toml").global_.splice is value

    def test_not_a_boolean(self) -> None:
        """A string is refused with the key path, not read as true."""
        text = config_text({"b": "127.0.0.1:1"}).replace(
            "[global]", '[global]\nsplice = "yes"'
        )
        with pytest.raises(ConfigError) as caught:
            parse_config(text, "x.toml")
        assert [str(p) for p in caught.value.problems] == [
            'x.toml: global.splice: expected a boolean (true or false), got string "yes"'
        ]


class TestPipePool:
    def test_reuses_empty_pipes_up_to_keep(self) -> None:
        """Returned pipes are kept for reuse up to ``keep``; the rest are closed."""
        pool = splice.PipePool(keep=1)
        first, second = pool.get(), pool.get()
        assert pool.in_use == 2
        pool.put(first)
        pool.put(second)
        assert (pool.in_use, pool.idle) == (0, 1)
        with pytest.raises(OSError):
            os.fstat(second[0])  # closed: beyond keep
        assert pool.get() == first
        pool.put(first)
        pool.clear()
        with pytest.raises(OSError):
            os.fstat(first[0])

    def test_discarded_pipe_is_closed(self) -> None:
        """A pipe still holding bytes is closed, not reused."""
        pool = splice.PipePool()
        pipe = pool.get()
        os.write(pipe[1], b"stale")
        pool.discard(pipe)
        assert (pool.in_use, pool.idle) == (0, 0)
        with pytest.raises(OSError):
            os.fstat(pipe[1])


class _NoPipes(splice.PipePool):
    """A pool at the descriptor limit: every new pipe fails with EMFILE."""

    def _make(self) -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")


class TestFastPath:
    @pytest_twisted.ensureDeferred
    async def test_used_by_default_and_counts_bytes(self, lab: Lab) -> None:
        """A plain TCP session is spliced; the log line counts both directions."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address})
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer(keep=True))
            await lab.until(lambda: lb.frontend.sessions, what="session")
            await lab.until(lambda: only_session(lb).server is not None, what="spliced")
            assert only_session(lb).splicer is not None
            client.send(b"x" * 100_000, then=HALF_CLOSE)
            await lab.wait(client.closed.wait(), 10, "client closed")
            await lab.until(lambda: not lb.frontend.sessions, what="session over")
        assert bytes(client.data) == b"x" * 100_000  # type: ignore[arg-type]
        (line,) = closed_lines(logs)
        assert line["bytes_from_client"] == line["bytes_from_server"] == 100_000
        assert line["reason"] == "client closed"
        assert splice.PIPES.in_use == 0

    @pytest_twisted.ensureDeferred
    async def test_off_uses_the_normal_path(self, lab: Lab) -> None:
        """``splice = false`` leaves the session on the copying path."""
        lab.splice = False
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address})
        client = await lab.connect(lb.port, lab.peer(keep=True))
        await lab.until(
            lambda: lb.frontend.sessions and only_session(lb).server is not None,
            what="connected",
        )
        assert only_session(lb).splicer is None
        client.send(b"ping", then=HALF_CLOSE)
        await lab.wait(client.closed.wait(), 10, "client closed")
        assert bytes(client.data) == b"ping"  # type: ignore[arg-type]
        await lab.until(lambda: not lb.frontend.sessions, what="session over")

    @pytest_twisted.ensureDeferred
    async def test_idle_connection_holds_no_pipe(self, lab: Lab) -> None:
        """Once the bytes have been passed on, both pipes are back in the pool."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address})
        client = await lab.connect(lb.port, lab.peer(keep=True))
        client.send(b"hello")
        await lab.until(lambda: client.received == 5, what="echo")
        splicer = only_session(lb).splicer
        assert splicer is not None
        assert (splicer.up.pipe, splicer.down.pipe) == (None, None)
        assert splice.PIPES.in_use == 0
        client.transport.loseConnection()
        await lab.until(lambda: not lb.frontend.sessions, what="session over")

    @pytest_twisted.ensureDeferred
    async def test_spliced_bytes_are_activity(self, lab: Lab) -> None:
        """Bytes moved by the kernel still push the idle timeout back."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend='idle_timeout = "1h"')
        client = await lab.connect(lb.port, lab.peer(keep=True))
        await lab.until(
            lambda: lb.frontend.sessions and only_session(lb).splicer is not None,
            what="spliced",
        )
        session = only_session(lb)
        before = session.last_activity
        await lab.until(lambda: reactor.seconds() > before, what="clock moved")
        client.send(b"tick")
        await lab.until(lambda: client.received == 4, what="echo")
        assert session.last_activity > before
        client.transport.loseConnection()
        await lab.until(lambda: not lb.frontend.sessions, what="session over")

    @pytest_twisted.ensureDeferred
    async def test_idle_timeout_closes_spliced_session(self, lab: Lab) -> None:
        """A spliced connection with no traffic is closed by the idle timeout."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address}, frontend='idle_timeout = "200ms"')
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer(close_on_eof=True))
            client.send(b"x")
            await lab.wait(client.closed.wait(), 10, "closed by l4lb")
            await lab.until(lambda: not lb.frontend.sessions, what="session over")
            await lab.until(lambda: not backend.live, what="backend closed")
        (line,) = closed_lines(logs)
        assert line["reason"] == "idle timeout"
        assert line["bytes_from_client"] == line["bytes_from_server"] == 1

    @pytest_twisted.ensureDeferred
    async def test_server_fin_after_slow_client_drains(self, lab: Lab) -> None:
        """Bytes stuck in a pipe reach a slow client before the server's FIN."""

        async def burst_then_fin(peer: Peer) -> None:
            await peer.send_random(16 * MiB, then=CLOSE)

        backend = lab.backend(lambda: lab.peer(burst_then_fin))
        lb = lab.l4lb({"b": backend.address})
        client = await lab.connect(lb.port, lab.peer(paused=True, close_on_eof=True))
        await lab.until(
            lambda: backend.peers and backend.peers[0].source is not None,
            what="sending",
        )
        server = backend.peers[0]
        await lab.settle(lambda: only_session(lb).bytes_from_server)
        assert only_session(lb).splicer.down.pending > 0  # type: ignore[union-attr]
        client.transport.resumeProducing()
        received = await lab.wait(client.eof.wait(), 30, "client EOF")
        await lab.wait(client.closed.wait(), 5, "client closed")
        await lab.until(lambda: not lb.frontend.sessions, what="session over")
        assert received == server.source.digest  # type: ignore[union-attr]


class _CountingPipes(splice.PipePool):
    """The process's pool, counting the pipes lent."""

    def __init__(self) -> None:
        super().__init__()
        self.lent = 0

    def get(self) -> tuple[int, int]:
        self.lent += 1
        return super().get()


class TestCopyFirst:
    @pytest_twisted.ensureDeferred
    async def test_small_chunks_are_copied_bulk_is_spliced(
        self, lab: Lab, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Request-sized chunks borrow no pipe; bulk switches to splicing, and back."""
        pipes = _CountingPipes()
        monkeypatch.setattr(splice, "PIPES", pipes)
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address})
        client = await lab.connect(lb.port, lab.peer(keep=True))
        await lab.until(
            lambda: lb.frontend.sessions and only_session(lb).splicer is not None,
            what="spliced",
        )
        splicer = only_session(lb).splicer
        assert splicer is not None
        for _ in range(3):
            before = client.received
            client.send(b"ping")
            await lab.until(lambda b=before: client.received == b + 4, what="echo")
        assert pipes.lent == 0
        assert splicer.up.copying and splicer.down.copying
        bulk = 4 * MiB
        client.send(b"x" * bulk)
        await lab.until(lambda: client.received == 12 + bulk, what="bulk echo")
        assert pipes.lent > 0  # the kernel moved the bulk
        client.send(b"tick")
        await lab.until(lambda: client.received == 16 + bulk, what="echo")
        assert splicer.up.copying and splicer.down.copying  # small again: copied
        assert bytes(client.data) == b"ping" * 3 + b"x" * bulk + b"tick"  # type: ignore[arg-type]
        assert pipes.in_use == 0
        client.transport.loseConnection()
        await lab.until(lambda: not lb.frontend.sessions, what="session over")


class TestNoPipeFallback:
    @pytest_twisted.ensureDeferred
    async def test_copies_when_no_pipe_can_be_made(
        self, lab: Lab, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """At the descriptor limit, chunks are copied in Python, intact and in order."""
        monkeypatch.setattr(splice, "PIPES", _NoPipes())
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address})
        client = await lab.connect(lb.port)
        await lab.until(
            lambda: lb.frontend.sessions and only_session(lb).splicer is not None,
            what="spliced",
        )
        sent = await lab.wait(client.send_random(8 * MiB, then=HALF_CLOSE), 30, "send")
        received = await lab.wait(client.eof.wait(), 30, "echo and FIN")
        await lab.wait(client.closed.wait(), 5, "client closed")
        await lab.until(lambda: not lb.frontend.sessions, what="session over")
        assert received == sent
        assert splice.PIPES.in_use == 0


class TestWhenUsed:
    def test_fakes_and_wrappers_are_not_spliced(self) -> None:
        """Only Twisted's own socket transports qualify (not fakes, not TLS wrappers)."""
        assert not splice.can_splice(StringTransport())

    @pytest_twisted.ensureDeferred
    async def test_bytes_pending_in_twisted_keep_the_normal_path(
        self, lab: Lab
    ) -> None:
        """A transport with bytes in its write buffer is not spliced."""
        backend = lab.backend(lab.echo)
        lb = lab.l4lb({"b": backend.address})
        client = await lab.connect(lb.port)
        await lab.until(lambda: lb.frontend.sessions, what="session")
        transport = only_session(lb).client.transport
        assert splice.can_splice(transport)
        transport._tempDataBuffer.append(b"x")  # as a write() before the switch
        transport._tempDataLen += 1
        assert not splice.can_splice(transport)
        transport._tempDataBuffer.clear()
        transport._tempDataLen = 0
        client.transport.loseConnection()
        await lab.until(lambda: not lb.frontend.sessions, what="session over")


class TestErrors:
    @pytest_twisted.ensureDeferred
    async def test_server_reset_mid_transfer(self, lab: Lab) -> None:
        """A backend that resets while the client sends: one line, no leaks."""

        async def reset_on_first_byte(peer: Peer) -> None:
            await lab.until(lambda: peer.received > 0, what="first byte")
            peer.transport.abortConnection()  # RST: unread bytes are dropped

        backend = lab.backend(lambda: lab.peer(reset_on_first_byte))
        lb = lab.l4lb({"b": backend.address})
        with capture_logs() as logs:
            client = await lab.connect(lb.port, lab.peer(close_on_eof=True))
            sending = client.send_random(64 * MiB)
            sending.addErrback(lambda f: None)  # the connection dies under it
            await lab.wait(client.closed.wait(), 30, "client closed")
            await lab.until(lambda: not lb.frontend.sessions, what="session over")
            await lab.until(lambda: not backend.live, what="backend closed")
        (line,) = closed_lines(logs)
        assert line["reason"] == "server closed"
        assert 0 < line["bytes_from_client"] < 64 * MiB
        assert splice.PIPES.in_use == 0
