"""Least connections: send each new connection where it adds the least load."""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence

from . import Candidate, S, has_room


class LeastConnections:
    """Pick the eligible server with the lowest ``(live + 1) / weight``, idle ones first.

    An idle server (``live == 0``) is preferred to any busy one, so every
    server gets traffic before a heavy one is stacked further. Otherwise
    ``(live + 1) / weight``, the load the server would carry after taking this
    connection, decides; it is compared by cross-multiplication (exact ints).
    Among ties the one this policy picked least recently wins, so equal
    servers take new connections in turn instead of the first in the list
    winning every tie (with short connections it would otherwise get them all).
    """

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        # name -> sequence number of this policy's last pick of it (0 = never).
        self._last_pick: dict[str, int] = {}

    def pick(self, servers: Sequence[S], client: str, avoid: Collection[S]) -> S | None:
        """Return the least-loaded eligible server, or ``None``."""
        last = self._last_pick
        best: S | None = None
        best_seq = 0
        for server in servers:
            if server in avoid or not has_room(server):
                continue
            seq = last.get(server.name, 0)
            if best is None or _better(server, seq, best, best_seq):
                best, best_seq = server, seq
        if best is not None:
            last[best.name] = next(self._counter)
        return best


def _better(a: Candidate, a_seq: int, b: Candidate, b_seq: int) -> bool:
    """True when ``a`` should be preferred over the current best ``b``."""
    a_idle, b_idle = a.live == 0, b.live == 0
    if a_idle != b_idle:
        return a_idle
    # (a.live + 1) / a.weight  vs  (b.live + 1) / b.weight, without floats.
    lhs = (a.live + 1) * b.weight
    rhs = (b.live + 1) * a.weight
    if lhs != rhs:
        return lhs < rhs
    return a_seq < b_seq
