"""Cost of one pick for each balancing policy, and of a Maglev table build."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest

from l4lb.balance import POLICY_NAMES, make_policy
from l4lb.balance.maglev import build_table

SIZES = (10, 100, 1000)


@dataclass(eq=False)
class Server:
    """A stand-in with what a policy reads of the pool's server state."""

    name: str
    weight: int
    max_connections: int
    live: int


def servers(count: int) -> list[Server]:
    """``count`` busy servers with mixed weights, loads and caps (seeded)."""
    rng = random.Random(count)
    return [
        Server(
            name=f"s{i:04d}",
            weight=rng.choice((1, 1, 2, 5)),
            max_connections=rng.choice((0, 0, 500)),
            live=rng.randrange(1, 400),
        )
        for i in range(count)
    ]


class TestPick:
    @pytest.mark.parametrize("count", SIZES)
    @pytest.mark.parametrize("name", POLICY_NAMES)
    def test_pick(self, benchmark, name: str, count: int) -> None:
        """One pick among ``count`` servers, clients cycling over 256 addresses."""
        pool = servers(count)
        policy = make_policy(name, random.Random(1))
        clients = itertools.cycle([f"10.0.{i // 256}.{i % 256}" for i in range(256)])
        policy.pick(pool, "10.0.0.1", ())  # source-hash builds its table here

        def pick() -> object:
            return policy.pick(pool, next(clients), ())

        assert benchmark(pick) is not None

    @pytest.mark.parametrize("count", SIZES)
    @pytest.mark.parametrize("name", POLICY_NAMES)
    def test_pick_avoiding_one(self, benchmark, name: str, count: int) -> None:
        """A retry's pick: the first server tried is in ``avoid``."""
        pool = servers(count)
        policy = make_policy(name, random.Random(1))
        policy.pick(pool, "10.0.0.1", ())
        avoid = [pool[0]]
        assert benchmark(policy.pick, pool, "10.0.0.9", avoid) is not None


class TestMaglev:
    @pytest.mark.parametrize("count", SIZES)
    def test_build_table(self, benchmark, count: int) -> None:
        """Building the 65537-entry table for ``count`` servers of mixed weights."""
        pool = servers(count)
        names = [s.name for s in pool]
        weights = [s.weight for s in pool]
        table = benchmark.pedantic(
            build_table, (names, weights), rounds=5, iterations=1
        )
        assert len(table) == 65537
