"""Balancing policies: pure functions of the pool's servers, no Twisted.

Every policy has one signature, ``pick(servers, client, avoid)``:

- ``servers`` is the tier the pool may use right now, in config order (the pool
  has already left out servers that are down, drained to weight 0, or backups
  while a non-backup server is usable);
- ``client`` is the client's IP address as text (only source-hash uses it);
- ``avoid`` holds servers already tried for this client.

A policy never returns a server in ``avoid`` or one at its ``max_connections``;
it returns ``None`` when nothing is left, and the pool decides what that means
(retry without ``avoid``, queue, or refuse).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """What a policy may read of a server (the pool's runtime server state)."""

    name: str  # unique within the pool, stable for the process lifetime
    weight: int  # effective weight, >= 1 for servers handed to a policy
    max_connections: int  # effective cap; 0 means unlimited
    live: int  # connections connecting or established right now


S = TypeVar("S", bound=Candidate)


class Policy(Protocol):
    def pick(self, servers: Sequence[S], client: str, avoid: Collection[S]) -> S | None:
        """Choose a server for ``client`` or ``None`` when none may take it."""


def has_room(server: Candidate) -> bool:
    """True when ``server`` is below its connection cap (0 = no cap)."""
    return server.max_connections == 0 or server.live < server.max_connections


POLICY_NAMES = (
    "least-connections",
    "round-robin",
    "random-two",
    "source-hash",
    "first",
)


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    """A new policy object for ``name`` (one of ``POLICY_NAMES``).

    Each pool gets its own object: policies keep per-pool state (pick order,
    round-robin counters, the Maglev table).  ``rng`` is used by random-two
    only; by default it gets its own ``random.Random()``.
    """
    # Imported here: the modules import ``has_room`` from this package.
    from .first import First
    from .leastconn import LeastConnections
    from .maglev import SourceHash
    from .randomtwo import RandomTwo
    from .roundrobin import RoundRobin

    if name == "least-connections":
        return LeastConnections()
    if name == "round-robin":
        return RoundRobin()
    if name == "random-two":
        return RandomTwo(rng)
    if name == "source-hash":
        return SourceHash()
    if name == "first":
        return First()
    choices = ", ".join(POLICY_NAMES)
    raise ValueError(f"unknown balancing policy {name!r}; choose from {choices}")
