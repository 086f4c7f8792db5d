"""The ``redis`` check: ``PING`` must answer ``+PONG``; with ``role``, ``ROLE`` decides.

``role = "primary"`` wants ``ROLE`` to say ``master``; ``role = "replica"``
wants ``slave`` with the replication link in state ``connected``. A server
where ``ROLE`` is refused (renamed by ``rename-command``, an ACL) is asked
``INFO replication`` instead (``role:master``, or ``role:slave`` with
``master_link_status:up``). With ``password_file`` (and ``user`` for an ACL
user) the check sends ``AUTH`` first. It always ends with ``QUIT``, so the
server closes its side and keeps no client entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred

from l4lb.health.checks.conversation import (
    LIMIT,
    BadReplyError,
    Check,
    CheckResult,
    Conversation,
    probe,
    read_secret,
    role_verdict,
    show,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

    from l4lb.config import HealthConfig

MAX_DEPTH = 4  # ROLE on a master nests three deep
MAX_ITEMS = 1024  # replicas listed by ROLE, say


@attrs.frozen
class Simple:
    """A ``+`` status reply."""

    text: str


@attrs.frozen
class Error:
    """A ``-`` error reply."""

    text: str


def command(*words: str | bytes) -> bytes:
    """A RESP array of bulk strings, as a client sends commands."""
    out = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode("utf-8") if isinstance(word, str) else word
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def parse_reply(
    buffer: bytes | bytearray, pos: int = 0, depth: int = 0
) -> tuple[Any, int] | None:
    """One RESP2 value at ``pos``: (value, end) or None while incomplete.

    Bulk strings become bytes (None for nil), arrays lists; anything that is
    not RESP, or nests or counts beyond the bounds, raises `BadReplyError`.
    """
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, line = buffer[pos : pos + 1], bytes(buffer[pos + 1 : end])
    after = end + 2
    if kind == b"+":
        return Simple(line.decode("utf-8", "replace")), after
    if kind == b"-":
        return Error(line.decode("utf-8", "replace")), after
    if kind == b":":
        return _integer(line, buffer), after
    if kind == b"$":
        length = _integer(line, buffer)
        if length < 0:
            return None, after
        if length > LIMIT:
            raise BadReplyError(f"Redis reply of {length} bytes is too long")
        if len(buffer) < after + length + 2:
            return None
        return bytes(buffer[after : after + length]), after + length + 2
    if kind == b"*":
        count = _integer(line, buffer)
        if count < 0:
            return None, after
        if count > MAX_ITEMS or depth >= MAX_DEPTH:
            raise BadReplyError("Redis reply nests or counts too deep")
        items = []
        for _ in range(count):
            got = parse_reply(buffer, after, depth + 1)
            if got is None:
                return None
            item, after = got
            items.append(item)
        return items, after
    raise BadReplyError(f"not a Redis reply: {show(buffer[pos:])}")


def _integer(line: bytes, buffer: bytes | bytearray) -> int:
    try:
        return int(line)
    except ValueError:
        raise BadReplyError(f"not a Redis reply: {show(buffer)}") from None


def read_reply(buffer: bytearray) -> tuple[tuple[Any, bytes], int] | None:
    """A parser for `Conversation.read`: the value and its raw bytes."""
    got = parse_reply(buffer)
    if got is None:
        return None
    value, end = got
    return (value, bytes(buffer[:end])), end


def replication_role(reply: Any) -> tuple[str, bool]:
    """("primary" | "replica" | other, link up) from a ``ROLE`` reply."""
    if not isinstance(reply, list) or not reply or not isinstance(reply[0], bytes):
        raise BadReplyError(f"unexpected ROLE reply: {reply!r:.80}")
    role = reply[0].decode("utf-8", "replace")
    if role == "master":
        return "primary", True
    if role == "slave":
        state = reply[3] if len(reply) > 3 else b""
        return "replica", state == b"connected"
    return role, False


def info_role(text: bytes) -> tuple[str, bool]:
    """("primary" | "replica" | other, link up) from ``INFO replication``."""
    fields = {}
    for line in text.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    role = fields.get("role", "unknown")
    if role == "master":
        return "primary", True
    if role == "slave":
        return "replica", fields.get("master_link_status") == "up"
    return role, False


def redis_check(config: HealthConfig, clock: IReactorTime) -> Check:
    """PING (after AUTH when configured), then ROLE when the pool wants a role."""
    secret = read_secret(config.password_file)
    want = config.role

    async def exchange(conv: Conversation) -> CheckResult:
        if secret.problem is not None:
            return CheckResult(False, secret.problem)
        conv.goodbye = command("QUIT")
        if secret.value is not None:
            words = [config.user] if config.user else []
            conv.write(command("AUTH", *words, secret.value))
            reply, raw = await conv.read(read_reply, "the AUTH reply")
            if not isinstance(reply, Simple):
                return CheckResult(False, f"AUTH failed: {show(raw)}")
        conv.write(command("PING"))
        reply, raw = await conv.read(read_reply, "the PING reply")
        if reply != Simple("PONG"):
            return CheckResult(False, f'expected "+PONG", got {show(raw)}')
        if want == "any":
            return CheckResult(True, "PONG")
        conv.write(command("ROLE"))
        reply, raw = await conv.read(read_reply, "the ROLE reply")
        if isinstance(reply, Error):
            conv.write(command("INFO", "replication"))
            info, raw = await conv.read(read_reply, "the INFO replication reply")
            if not isinstance(info, bytes):
                return CheckResult(False, f"ROLE and INFO refused: {show(raw)}")
            role, link_up = info_role(info)
        else:
            role, link_up = replication_role(reply)
        return role_verdict(want, role, link_up)

    def check(endpoint: IStreamClientEndpoint) -> Deferred[CheckResult]:
        return probe(endpoint, exchange)

    return check
