"""Fixtures shared by the test modules that drive l4lb in this process."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor

from tests.loopback import Lab


@pytest_twisted.async_yield_fixture
async def lab() -> Any:
    """The test's ports, services and connections; fails the test on leftovers.

    Modules with their own ``lab`` (the health check tests' one also fails on
    errors Twisted only logs) override this one.
    """
    lab = Lab(reactor)
    yield lab
    problems = await lab.teardown()
    assert not problems, "left behind by the test:\n" + "\n".join(problems)
