"""Unit tests of the pool: tiers, slot accounting, the FIFO queue and its timeout."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from l4lb.config import PoolConfig, ServerAddress, ServerConfig
from l4lb.pool import NoServerError, Pool


def make_pool(servers: list[dict[str, Any]], **pool: Any) -> tuple[Pool, Clock]:
    clock = Clock()
    configs = tuple(
        ServerConfig(
            name=s.pop("name", f"s{i}"),
            address=ServerAddress(host="127.0.0.1", port=7000 + i),
            **s,
        )
        for i, s in enumerate(dict(s) for s in servers)
    )
    return Pool(PoolConfig(name="p", servers=configs, **pool), clock), clock


def result(d: Any) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


class TestTiers:
    def test_backups_unused_while_a_primary_is_usable(self) -> None:
        """Backup servers are not candidates while a non-backup server is usable."""
        pool, _ = make_pool([{"name": "a"}, {"name": "b", "backup": True}])
        assert [s.name for s in pool.candidates()] == ["a"]

    def test_backups_take_over_when_no_primary_is_usable(self) -> None:
        """With every primary unusable, the backups become the candidates."""
        pool, _ = make_pool([{"name": "a"}, {"name": "b", "backup": True}])
        pool.server("a").usable = False
        assert [s.name for s in pool.candidates()] == ["b"]
        pool.server("a").usable = True
        assert [s.name for s in pool.candidates()] == ["a"]

    def test_weight_zero_takes_no_new_connections(self) -> None:
        """A server drained to weight 0 is never a candidate."""
        pool, _ = make_pool([{"name": "a", "weight": 0}, {"name": "b"}])
        assert [s.name for s in pool.candidates()] == ["b"]

    def test_no_candidate_fails_with_no_server(self) -> None:
        """An empty tier fails at once with reason "no server"."""
        pool, _ = make_pool([{"weight": 0}])
        failure = result(pool.acquire("10.0.0.1"))
        assert failure.check(NoServerError)
        assert failure.value.reason == "no server"


class TestSlots:
    def test_acquire_reserves_and_release_frees(self) -> None:
        """A server handed out counts the connection until it is released."""
        pool, _ = make_pool([{}])
        server = result(pool.acquire("10.0.0.1"))
        assert (server.live, server.total) == (1, 1)
        pool.release(server)
        assert (server.live, server.total) == (0, 1)

    def test_avoid_is_a_preference(self) -> None:
        """A tried server is avoided while another has room, and used when none has."""
        pool, _ = make_pool([{"name": "a"}, {"name": "b", "max_connections": 1}])
        a, b = pool.server("a"), pool.server("b")
        assert result(pool.acquire("c", avoid=[a])) is b
        assert result(pool.acquire("c", avoid=[a])) is a  # b is full now


class TestQueue:
    def test_fifo_order(self) -> None:
        """Queued clients get freed slots in arrival order."""
        pool, _ = make_pool([{"max_connections": 1}], queue_timeout=5.0)
        first = result(pool.acquire("c0"))
        waiting = [pool.acquire(f"c{i}") for i in range(1, 4)]
        assert pool.queued == 3
        order = []
        for i, d in enumerate(waiting, 1):
            d.addCallback(lambda s, i=i: order.append(i) or s)
        pool.release(first)
        assert order == [1]
        pool.release(result(waiting[0]))
        assert order == [1, 2]

    def test_timeout_fails_with_reason_and_leaves_no_timer(self) -> None:
        """A client still queued after queue_timeout fails with "queue timeout"."""
        pool, clock = make_pool([{"max_connections": 1}], queue_timeout=2.0)
        result(pool.acquire("c0"))
        waiting = pool.acquire("c1")
        clock.advance(2.0)
        failure = result(waiting)
        assert failure.value.reason == "queue timeout"
        assert pool.queued == 0
        assert clock.getDelayedCalls() == []

    def test_cancel_leaves_the_queue(self) -> None:
        """Cancelling a queued acquire removes it and its timer."""
        pool, clock = make_pool([{"max_connections": 1}])
        held = result(pool.acquire("c0"))
        waiting = pool.acquire("c1")
        waiting.cancel()
        waiting.addErrback(lambda f: None)
        assert pool.queued == 0
        assert clock.getDelayedCalls() == []
        pool.release(held)
        assert held.live == 0

    @pytest.mark.parametrize(("queue_timeout", "max_queue"), [(0.0, 10), (5.0, 0)])
    def test_no_queue_refuses_at_once(
        self, queue_timeout: float, max_queue: int
    ) -> None:
        """With queueing off (timeout 0) or the queue full, the client fails at once."""
        pool, _ = make_pool(
            [{"max_connections": 1}], queue_timeout=queue_timeout, max_queue=max_queue
        )
        result(pool.acquire("c0"))
        failure = result(pool.acquire("c1"))
        assert failure.value.reason == "queue full"

    def test_newcomer_does_not_overtake_the_queue(self) -> None:
        """While clients queue, a newcomer joins the end even if a slot looks free."""
        pool, _ = make_pool([{"max_connections": 1}])
        held = result(pool.acquire("c0"))
        first = pool.acquire("c1")
        pool.release(held)  # serves c1
        assert result(first).live == 1
        second = pool.acquire("c2")
        assert not second.called
        second.cancel()
        second.addErrback(lambda f: None)

    def test_changed_serves_waiters(self) -> None:
        """When a server becomes usable again, waiting clients are served."""
        pool, _ = make_pool(
            [{"name": "a", "max_connections": 1}, {"name": "b", "backup": True}]
        )
        result(pool.acquire("c0"))
        pool.server("b").usable = False
        waiting = pool.acquire("c1")
        assert not waiting.called
        pool.server("a").usable = False
        pool.server("b").usable = True
        pool.changed()
        assert result(waiting).name == "b"
