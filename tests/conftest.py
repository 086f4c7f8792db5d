"""Fixtures shared by the test modules that drive l4lb in this process."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.loopback import Lab


@pytest_twisted.async_yield_fixture
async def lab(request: pytest.FixtureRequest) -> Any:
    """The test's ports, services and connections; fails the test on leftovers.

    Modules with their own ``lab`` (the health check tests' one also fails on
    errors Twisted only logs) override this one. Parametrised indirectly
    (``BOTH_PATHS`` in test_integration), a test runs with kernel splicing on
    and off; otherwise l4lb runs with its default (on).
    """
    lab = Lab(reactor, splice=getattr(request, "param", None))
    yield lab
    problems = await lab.teardown()
    assert not problems, "left behind by the test:\n" + "\n".join(problems)
