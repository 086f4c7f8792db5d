"""Smooth weighted round robin (nginx's algorithm)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from . import S, has_room


class RoundRobin:
    """Smooth weighted round robin, as in nginx's upstream module.

    Each pick adds every eligible server's weight to its running value, takes
    the server with the highest value (first in config order on ties) and
    subtracts the total eligible weight from it.  Weights 5, 1, 1 give
    ``a a b a c a a``: heavy servers are interleaved with light ones rather
    than picked in bursts, and over a cycle of ``sum(weights)`` picks each
    server is picked exactly ``weight`` times.

    Weights are read on every pick, so runtime changes (slow start) take effect
    at once.  Servers skipped for a pick (full or avoided) do not accumulate
    for it, so a full server does not build up a burst to unleash later.
    """

    def __init__(self) -> None:
        self._current: dict[str, int] = {}  # name -> running value

    def pick(self, servers: Sequence[S], client: str, avoid: Collection[S]) -> S | None:
        """Return the next server in the smooth weighted sequence, or ``None``."""
        current = self._current
        best: S | None = None
        best_value = 0
        total = 0
        for server in servers:
            if server in avoid or not has_room(server):
                continue
            value = current.get(server.name, 0) + server.weight
            current[server.name] = value
            total += server.weight
            if best is None or value > best_value:
                best, best_value = server, value
        if best is not None:
            current[best.name] = best_value - total
        return best
