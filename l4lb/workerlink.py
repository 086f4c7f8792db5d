"""What the supervisor and its workers tell each other: one JSON object per line.

Supervisor → worker (the worker's stdin): server states, as
``{"servers": [[pool, server, usable, weight, max_connections], ...]}``. The
first line a worker reads is a snapshot of every server; later lines carry
only the servers that changed. Health probes run once, in the supervisor;
workers only follow these lines, so every worker sees the same servers up.

Worker → supervisor (the worker's descriptor 3): passive observations,
``{"connect_failed": [pool, server, why]}``, which the supervisor counts as
failed checks exactly as a single process would.

Pure: no Twisted, so both ends are tested as plain functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from l4lb.pool import Pool, ServerState

State = tuple[bool, int, int]  # usable, effective weight, effective max_connections


def state_of(server: ServerState) -> State:
    return (server.usable, server.weight, server.max_connections)


class StateTracker:
    """The supervisor's record of what it last told workers, to send only changes."""

    def __init__(self, pools: Mapping[str, Pool]) -> None:
        self.pools = pools
        self._sent: dict[tuple[str, str], State] = {}

    def snapshot(self) -> bytes:
        """Every server's state: the first line for a (re)started worker."""
        rows = [(pool.name, server) for pool in self.pools.values() for server in pool]
        for pool_name, server in rows:
            self._sent[(pool_name, server.name)] = state_of(server)
        return _line({"servers": [_row(name, s) for name, s in rows]})

    def changes(self, pool: Pool) -> bytes | None:
        """The servers of ``pool`` whose state moved since last sent, or None."""
        changed = []
        for server in pool:
            key = (pool.name, server.name)
            state = state_of(server)
            if self._sent.get(key) != state:
                self._sent[key] = state
                changed.append(_row(pool.name, server))
        return _line({"servers": changed}) if changed else None


def _row(pool: str, server: ServerState) -> list[Any]:
    return [pool, server.name, *state_of(server)]


def _line(message: object) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def apply_states(
    pools: Mapping[str, Pool], message: Mapping[str, Any]
) -> tuple[list[Pool], list[ServerState]]:
    """Set the servers' states a supervisor line carries.

    Returns the pools touched (to call ``changed()`` on once each, after every
    state is set) and the servers that went from usable to not (whose live
    sessions ``on_down = "close"`` closes). Unknown names are skipped: the
    supervisor and worker read the same config file, so they only differ if
    it was edited between the two reads.
    """
    touched: dict[str, Pool] = {}
    went_down: list[ServerState] = []
    for pool_name, server_name, usable, weight, max_connections in message.get(
        "servers", ()
    ):
        pool = pools.get(pool_name)
        if pool is None:
            continue
        try:
            server = pool.server(server_name)
        except KeyError:
            continue
        if server.usable and not usable:
            went_down.append(server)
        server.usable = bool(usable)
        server.weight = int(weight)
        server.max_connections = int(max_connections)
        touched[pool_name] = pool
    return list(touched.values()), went_down


def connect_failed_line(pool: str, server: str, why: str) -> bytes:
    return _line({"connect_failed": [pool, server, why]})


def parse_line(line: bytes) -> dict[str, Any] | None:
    """One message, or None for a line that is not a JSON object."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


class LineBuffer:
    """Splits a byte stream into complete lines (the last partial one is kept)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> Iterable[bytes]:
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        return [line for line in lines if line]
