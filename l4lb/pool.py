"""Runtime state of a pool: its servers' live counts and the FIFO of waiting clients.

The parsed config (`l4lb.config.PoolConfig`) never changes; everything that moves
at run time (connection counts, usability, effective weight) lives here, addressable
by pool and server name, so health checks, an admin API and reload can act on it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed

from l4lb.balance import Policy, make_policy
from l4lb.config import PoolConfig, ServerConfig

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime


class NoServerError(Exception):
    """No server can take this client; ``reason`` is the log line's termination reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@attrs.define(eq=False)
class ServerState:
    """One server of a pool at run time.

    ``weight`` and ``max_connections`` are the *effective* values the balancing
    policies read on every pick: health checking (slow start) and an admin API
    change them here, never in the config.
    """

    config: ServerConfig
    name: str
    weight: int
    max_connections: int
    backup: bool
    usable: bool = True
    live: int = 0  # connecting + established
    total: int = 0  # connections ever handed to this server
    failed_connects: int = 0
    # Established sessions, so health checking can close them (on_down = "close").
    sessions: set[Any] = attrs.Factory(set)

    @classmethod
    def from_config(cls, config: ServerConfig) -> ServerState:
        return cls(
            config=config,
            name=config.name,
            weight=config.weight,
            max_connections=config.max_connections,
            backup=config.backup,
        )


@attrs.define(eq=False)
class _Waiter:
    client: str
    avoid: Collection[ServerState]
    deferred: Deferred[ServerState]
    timer: IDelayedCall | None = None


class Pool:
    """Hands out servers: picks through the policy, queues when every server is full.

    A server returned by `acquire` already counts the new connection in its
    ``live``; the caller must `release` it exactly once when that connection
    (or connection attempt) is over.
    """

    def __init__(
        self, config: PoolConfig, clock: IReactorTime, policy: Policy | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.servers = [ServerState.from_config(s) for s in config.servers]
        self.policy = policy if policy is not None else make_policy(config.balance)
        self._clock = clock
        self._queue: deque[_Waiter] = deque()
        # Health checking's passive observation: told of every failed connect.
        self.on_connect_failed: Callable[[ServerState, str], None] | None = None
        # Told after every `changed` (the worker supervisor forwards health state).
        self.on_changed: Callable[[Pool], None] | None = None

    def server(self, name: str) -> ServerState:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def candidates(self) -> list[ServerState]:
        """The tier policies may pick from: usable primaries, else usable backups."""
        primaries = [
            s for s in self.servers if s.usable and s.weight > 0 and not s.backup
        ]
        if primaries:
            return primaries
        return [s for s in self.servers if s.usable and s.weight > 0 and s.backup]

    def acquire_now(
        self, client: str, avoid: Collection[ServerState] = ()
    ) -> ServerState | None:
        """`acquire` without a Deferred when a server has room and nobody waits.

        None means "ask `acquire`" (it queues, or fails with the reason); the
        common case, a free slot, costs no Deferred per connection.
        """
        if self._queue:
            return None
        candidates = self.candidates()
        if not candidates:
            return None
        server = self._pick(candidates, client, avoid)
        return self._reserve(server) if server is not None else None

    def acquire(
        self, client: str, avoid: Collection[ServerState] = ()
    ) -> Deferred[ServerState]:
        """A server with a slot reserved for ``client``, now or after queueing.

        Fails with `NoServerError` ("no server", "queue full", "queue
        timeout"). Cancelling the Deferred (the client left) takes the client out
        of the queue.
        """
        candidates = self.candidates()
        if not candidates and not self._any_down():
            return fail(
                NoServerError("no server", f"no usable server in pool {self.name}")
            )
        # While others wait, no server has room (each release serves the queue
        # first): join the end of the queue, first come first served.
        server = (
            None
            if self._queue or not candidates
            else self._pick(candidates, client, avoid)
        )
        if server is not None:
            return succeed(self._reserve(server))
        if self.config.queue_timeout <= 0 or len(self._queue) >= self.config.max_queue:
            if not candidates:
                return fail(self._no_server_up())
            return fail(
                NoServerError("queue full", f"pool {self.name}: every server is full")
            )

        def cancel(d: Deferred[ServerState]) -> None:
            self._forget(waiter)

        waiter = _Waiter(client, tuple(avoid), Deferred(cancel))
        waiter.timer = self._clock.callLater(
            self.config.queue_timeout, self._expire, waiter
        )
        self._queue.append(waiter)
        return waiter.deferred

    def release(self, server: ServerState) -> None:
        """A connection of ``server`` is over: free its slot and serve the queue."""
        server.live -= 1
        self._dispatch()

    def connect_failed(self, server: ServerState, why: str) -> None:
        """A client's connect to ``server`` failed (health checking may count it)."""
        server.failed_connects += 1
        if self.on_connect_failed is not None:
            self.on_connect_failed(server, why)

    def _any_down(self) -> bool:
        """Whether a server that takes traffic when up is down (it may come back)."""
        return any(not s.usable and s.config.weight > 0 for s in self.servers)

    def _no_server_up(self) -> NoServerError:
        return NoServerError(
            "no server up", f"every server of pool {self.name} is down"
        )

    def changed(self) -> None:
        """Usability or weights changed (health, admin): waiting clients may now fit."""
        self._dispatch()
        if self.on_changed is not None:
            self.on_changed(self)

    def _pick(
        self, candidates: list[ServerState], client: str, avoid: Collection[ServerState]
    ) -> ServerState | None:
        server = self.policy.pick(candidates, client, avoid)
        if server is None and avoid:
            # Every untried server is full: a tried one is better than waiting.
            server = self.policy.pick(candidates, client, ())
        return server

    def _reserve(self, server: ServerState) -> ServerState:
        server.live += 1
        server.total += 1
        return server

    def _dispatch(self) -> None:
        while self._queue:
            waiter = self._queue[0]
            candidates = self.candidates()
            server = (
                self._pick(candidates, waiter.client, waiter.avoid)
                if candidates
                else None
            )
            if server is None:
                return
            self._forget(waiter)
            waiter.deferred.callback(self._reserve(server))

    def _forget(self, waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        with contextlib.suppress(ValueError):  # already served or expired
            self._queue.remove(waiter)

    def _expire(self, waiter: _Waiter) -> None:
        waiter.timer = None
        self._forget(waiter)
        if not self.candidates():
            waiter.deferred.errback(self._no_server_up())
            return
        waiter.deferred.errback(
            NoServerError(
                "queue timeout",
                f"pool {self.name}: no slot within {self.config.queue_timeout:g}s",
            )
        )

    def __iter__(self) -> Iterator[ServerState]:
        return iter(self.servers)
