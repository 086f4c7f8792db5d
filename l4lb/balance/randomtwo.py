"""Power of two random choices."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from . import S, has_room


class RandomTwo:
    """Draw two distinct eligible servers at random; keep the less loaded one.

    Nearly as even as least-connections, but with no herd effect when several
    balancers (or a burst of connections) see the same stale counts: they do
    not all pile onto the single least-loaded server.  Load is compared as
    ``(live + 1) / weight`` (the load after taking this connection) by
    cross-multiplication; on a tie the first server drawn wins.  The draw is
    ``rng.sample(eligible, 2)`` so a seeded ``random.Random`` makes it
    reproducible in tests.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def pick(self, servers: Sequence[S], client: str, avoid: Collection[S]) -> S | None:
        """Return the lesser-loaded of two random eligible servers, or ``None``."""
        eligible = [s for s in servers if s not in avoid and has_room(s)]
        if len(eligible) <= 1:
            return eligible[0] if eligible else None
        a, b = self._rng.sample(eligible, 2)
        if (b.live + 1) * a.weight < (a.live + 1) * b.weight:
            return b
        return a
