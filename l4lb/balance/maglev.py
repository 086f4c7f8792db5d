"""Source hash: Maglev consistent hashing (Eisenbud et al., NSDI 2016).

A client address maps to the same server for as long as the pool is
unchanged, and to the same server on every l4lb instance with the same pool
(hashes are blake2b, never Python's per-process salted ``hash()``).  When a
server leaves, Maglev moves mostly the clients that were on it; the rest stay
put, which is the point of consistent hashing.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections.abc import Collection, Sequence

from . import S, has_room

TABLE_SIZE = 65537  # prime, as Maglev requires; ~650 entries/server even at 100

_CACHE_SIZE = 4  # tables kept: e.g. the primary tier and the backup tier


def _digest(data: str, person: bytes) -> bytes:
    return hashlib.blake2b(data.encode(), digest_size=16, person=person).digest()


def offset_skip(name: str, size: int = TABLE_SIZE) -> tuple[int, int]:
    """Where ``name``'s permutation of the table starts, and its stride.

    Derived from the name alone, so a server keeps its preferences when other
    servers come and go (that is what limits disruption).
    """
    d = _digest(name, b"l4lb-maglev-srv")
    offset = int.from_bytes(d[:8], "big") % size
    skip = int.from_bytes(d[8:], "big") % (size - 1) + 1
    return offset, skip


def client_slot(client: str, size: int = TABLE_SIZE) -> tuple[int, int]:
    """``client``'s table slot, and its stride for walking past ineligible ones.

    Both are stable across processes and hosts.
    """
    d = _digest(client, b"l4lb-maglev-cli")
    slot = int.from_bytes(d[:8], "big") % size
    stride = int.from_bytes(d[8:], "big") % (size - 1) + 1
    return slot, stride


def turn_order(weights: Sequence[int], size: int = TABLE_SIZE) -> list[int]:
    """The first ``size`` turns of weighted Maglev, as indices into ``weights``.

    Turns come in rounds; in each round every server gains ``weight`` credit
    and takes a turn (claims one table entry) when its credit reaches the
    largest weight, so a server of weight ``w`` takes ``w / max_weight`` turns
    per round and ends up with a share of the table proportional to ``w``.
    Within a round servers go in the order given.  A server's ``k``-th turn is
    therefore in round ``ceil(k * max_weight / w)``; with very uneven weights
    most servers sit most rounds out, so a heap on that round number is used
    instead of visiting every server every round.
    """
    n = len(weights)
    wmax = max(weights)
    if wmax < 1:  # policies get weights >= 1; do not loop forever if not
        weights, wmax = [1] * n, 1
    order: list[int] = []
    if n * wmax <= 3 * sum(weights):
        credit = [0] * n
        while len(order) < size:
            for i, w in enumerate(weights):
                c = credit[i] + w
                if c >= wmax:
                    c -= wmax
                    order.append(i)
                credit[i] = c
        del order[size:]
        return order
    heap = [(-(-wmax // w), i, 1) for i, w in enumerate(weights) if w > 0]
    heapq.heapify(heap)
    for _ in range(size):
        _, i, k = heap[0]
        order.append(i)
        k += 1
        heapq.heapreplace(heap, (-(-k * wmax // weights[i]), i, k))
    return order


def build_table(
    names: Sequence[str], weights: Sequence[int], size: int = TABLE_SIZE
) -> list[int]:
    """Weighted Maglev lookup table: ``size`` entries of indices into ``names``.

    Servers are taken in name order, not the order given, so the table depends
    only on the set of (name, weight) pairs: two instances whose configs list
    the same servers in a different order still agree.
    """
    by_name = sorted(range(len(names)), key=names.__getitem__)
    pos: list[int] = []
    skips: list[int] = []
    for i in by_name:
        offset, skip = offset_skip(names[i], size)
        pos.append(offset)
        skips.append(skip)
    table = [-1] * size
    for j in turn_order([weights[i] for i in by_name], size):
        # Walk server j's permutation (offset, offset + skip, ...) to its
        # next free entry; skip is in [1, size) and size is prime, so the
        # walk visits every entry and always finds one.
        p = pos[j]
        skip = skips[j]
        while table[p] >= 0:
            p += skip
            if p >= size:
                p -= size
        table[p] = j
        p += skip
        if p >= size:
            p -= size
        pos[j] = p
    return [by_name[j] for j in table]


class _Table:
    """A built table plus which server indices appear in it."""

    __slots__ = ("entries", "present")

    def __init__(self, entries: list[int]) -> None:
        self.entries = array("I", entries)
        self.present = frozenset(entries)


class SourceHash:
    """Map each client address to a server with weighted Maglev hashing.

    The table is built lazily and cached under the tuple of (name, weight) of
    ``servers``, so it is rebuilt only when the pool or a weight changes (a
    build takes tens of milliseconds).  The last few tables are kept, so a pool
    switching between its primary and backup tiers does not rebuild each time.
    ``size`` must be prime; anything but the default is for tests.

    When the client's server is avoided or full, the lookup walks forward
    through the table from the client's slot, in steps of a per-client stride,
    to the first entry whose server is eligible.  This is deterministic (every
    instance sends the client to the same fallback) and spreads a full
    server's clients over the others in proportion to their table shares.  A
    stride of 1 would not: neighbouring Maglev entries are correlated (each
    server fills arithmetic progressions), and with 5 servers up to half of
    one server's overflow landed on a single neighbour.
    """

    def __init__(self, size: int = TABLE_SIZE) -> None:
        self._size = size
        self._tables: dict[tuple[tuple[str, int], ...], _Table] = {}

    def table_for(self, servers: Sequence[S]) -> array[int]:
        """The lookup table for ``servers`` (indices into it), built if needed."""
        return self._table(servers).entries

    def _table(self, servers: Sequence[S]) -> _Table:
        key = tuple((s.name, s.weight) for s in servers)
        tables = self._tables
        table = tables.pop(key, None)
        if table is None:
            names = [name for name, _ in key]
            table = _Table(build_table(names, [w for _, w in key], self._size))
            if len(tables) >= _CACHE_SIZE:
                del tables[next(iter(tables))]  # least recently used
        tables[key] = table  # (re)insert as most recently used
        return table

    def pick(self, servers: Sequence[S], client: str, avoid: Collection[S]) -> S | None:
        """Return ``client``'s server, or the next eligible one, or ``None``."""
        if not servers:
            return None
        table = self._table(servers)
        entries = table.entries
        size = self._size
        slot, stride = client_slot(client, size)
        server = servers[entries[slot]]
        if server not in avoid and has_room(server):
            return server
        ok = [s not in avoid and has_room(s) for s in servers]
        if not any(i in table.present for i, good in enumerate(ok) if good):
            # Only servers too light to own any entry are eligible (extreme
            # weight ratios): choose among them by the slot, deterministically.
            eligible = [s for s, good in zip(servers, ok, strict=True) if good]
            return eligible[slot % len(eligible)] if eligible else None
        # size is prime, so the walk reaches every entry before repeating.
        p = slot
        while True:
            p += stride
            if p >= size:
                p -= size
            i = entries[p]
            if ok[i]:
                return servers[i]
