"""The ``send-expect`` check: steps of "send these bytes, expect a reply like this".

Each step's reply is matched against the bytes that arrive after its send:
``expect`` means the reply starts with those bytes, ``expect_regex`` means the
(bytes) pattern matches at the start of what has arrived. The check waits for
more bytes while a match is still possible and fails as soon as it is not, so
a wrong reply fails at once instead of at the timeout. Deciding "still
possible" for a regex needs partial matching, which the standard ``re`` lacks:
the well-kept ``regex`` module answers it exactly (``partial=True``). Leftover
bytes of one reply are dropped before the next step is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import regex
from twisted.internet.defer import Deferred

from l4lb.health.checks.conversation import (
    BadReplyError,
    Check,
    CheckResult,
    Conversation,
    Parser,
    probe,
    show,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

    from l4lb.config import CheckStep, HealthConfig


def expect_prefix(expected: bytes) -> Parser[bytes]:
    """A parser: the reply must start with ``expected``."""

    def parse(buffer: bytearray) -> tuple[bytes, int] | None:
        head = bytes(buffer[: len(expected)])
        if not expected.startswith(head):
            raise BadReplyError(f"expected {show(expected)}, got {show(buffer)}")
        if len(head) < len(expected):
            return None
        return head, len(buffer)

    return parse


def expect_pattern(pattern: regex.Pattern[bytes]) -> Parser[bytes]:
    """A parser: ``pattern`` must match at the start of the reply."""

    def parse(buffer: bytearray) -> tuple[bytes, int] | None:
        data = bytes(buffer)
        match = pattern.match(data, partial=True)
        if match is None:
            raise BadReplyError(
                f"expected /{pattern.pattern.decode('ascii', 'backslashreplace')}/,"
                f" got {show(data)}"
            )
        if match.partial:
            return None
        return match.group(0), len(buffer)

    return parse


def send_expect_check(config: HealthConfig, clock: IReactorTime) -> Check:
    """Run ``config.steps`` in order; success when every reply matches."""
    steps: list[tuple[CheckStep, Parser[bytes] | None]] = []
    for step in config.steps:
        if step.expect_regex is not None:
            parser = expect_pattern(regex.compile(step.expect_regex.encode("utf-8")))
        elif step.expect is not None:
            parser = expect_prefix(step.expect)
        else:
            parser = None
        steps.append((step, parser))

    async def exchange(conv: Conversation) -> CheckResult:
        for number, (step, parser) in enumerate(steps, 1):
            conv.buffer.clear()
            if step.send:
                conv.write(step.send)
            if parser is not None:
                what = f"the reply to step {number}" if len(steps) > 1 else "the reply"
                await conv.read(parser, what)
        return CheckResult(True, f"{len(steps)} step(s) matched")

    def check(endpoint: IStreamClientEndpoint) -> Deferred[CheckResult]:
        return probe(endpoint, exchange)

    return check
