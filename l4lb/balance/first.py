"""First-fit: fill servers in config order, so spare servers stay idle."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from . import S, has_room


class First:
    """Pick the first server in config order that has room and is not avoided.

    Useful when later servers cost more (or should stay cold) and the earlier
    ones carry ``max_connections`` caps: traffic spills over only when full.
    """

    def pick(self, servers: Sequence[S], client: str, avoid: Collection[S]) -> S | None:
        """Return the first eligible server, or ``None``."""
        for server in servers:
            if server not in avoid and has_room(server):
                return server
        return None
