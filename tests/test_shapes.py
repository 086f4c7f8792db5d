"""`l4lb.shapes`: transports' attribute names primed into their class's shared keys."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol

from l4lb import accept
from l4lb.connector import DirectTCPEndpoint
from l4lb.shapes import TCP_CLIENT, TCP_SERVER, prime

CPYTHON_311 = sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11)


def _late_name_dict_size(primed: bool) -> int:
    """Size of one instance's attributes when names first appear after 40 instances.

    CPython 3.11 leaves room for one more name in the shared keys once many
    instances exist: the second late name is the one that does not fit.
    """

    class Transport:
        pass

    names = [f"name{i}" for i in range(12)]
    if primed:
        prime(Transport, [*names, "late1", "late2"])
    early = []
    for _ in range(40):
        obj = Transport()
        for name in names:
            setattr(obj, name, 1)
        early.append(obj)
    late = Transport()
    for name in names:
        setattr(late, name, 1)
    late.late1 = late.late2 = 1  # type: ignore[attr-defined]
    return sys.getsizeof(late.__dict__)


class TestPrime:
    @pytest.mark.skipif(not CPYTHON_311, reason="CPython 3.11's instance layout")
    def test_late_name_keeps_the_compact_form(self) -> None:
        """Unprimed, a late name makes a full dict; primed, it stays in the values array."""
        unprimed = _late_name_dict_size(primed=False)
        primed = _late_name_dict_size(primed=True)
        assert primed < unprimed
        assert primed <= 48 + 8 * 30  # dict object + a values array, no keys table

    def test_skips_properties_and_leaves_instances_alone(self) -> None:
        calls = []

        class WithProperty:
            @property
            def logstr(self) -> str:
                return "made on demand"

            @logstr.setter
            def logstr(self, value: str) -> None:
                calls.append(value)

        prime(WithProperty, ("logstr", "fileno"))
        assert calls == []
        obj = WithProperty()
        assert obj.logstr == "made on demand"
        assert "fileno" not in vars(obj)


class _Echo(Protocol):
    made: list[_Echo] = []

    def connectionMade(self) -> None:
        _Echo.made.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class _Sender(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def connectionMade(self) -> None:
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data


async def _until(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await task.deferLater(reactor, 0.01, lambda: None)


class TestTwistedNames:
    @pytest_twisted.ensureDeferred
    async def test_idle_transports_hold_only_primed_names(self) -> None:
        """Fails if Twisted starts setting other names on a live connection.

        Both transports have done what a proxied session does on the copy
        path (written, been given a producer) and been hooked, as a spliced
        session's are. A name missing from the lists only costs memory, but
        the lists should then be updated.
        """
        _Echo.made = []
        port = reactor.listenTCP(0, Factory.forProtocol(_Echo), interface="127.0.0.1")
        assert accept.lean(port)
        sender = _Sender()
        try:
            done: defer.Deferred[None] = defer.Deferred()
            DirectTCPEndpoint(reactor, "127.0.0.1", port.getHost().port).connect_direct(
                sender, lambda: done.callback(None), done.errback
            )
            await done
            await _until(lambda: sender.data == b"ping" and _Echo.made)
            client: Any = sender.transport
            server: Any = _Echo.made[0].transport
            assert type(server) is accept.Server
            client.registerProducer(server, True)
            server.registerProducer(client, True)
            client._l4lb_handler = server._l4lb_handler = None  # as l4lb.hook does
            assert set(vars(client)) <= set(TCP_CLIENT)
            assert set(vars(server)) <= set(TCP_SERVER)
            client.unregisterProducer()
            server.unregisterProducer()
        finally:
            if sender.transport is not None:
                sender.transport.loseConnection()
            await port.stopListening()
            await _until(lambda: all(not e.transport.connected for e in _Echo.made))


_PRIMED_CHECK = """
import subprocess
import sys
from l4lb.accept import Server
from l4lb.connector import _Client
from l4lb.shapes import TCP_CLIENT, TCP_SERVER
for cls, names in ((Server, TCP_SERVER), (_Client, TCP_CLIENT)):
    crowd = [cls.__new__(cls) for _ in range(40)]
    obj = cls.__new__(cls)
    for name in names:
        if not hasattr(getattr(cls, name, None), "__set__"):
            object.__setattr__(obj, name, None)
    print(sys.getsizeof(obj.__dict__))
"""


@pytest.mark.skipif(not CPYTHON_311, reason="CPython 3.11's instance layout")
def test_l4lb_transports_are_primed() -> None:
    """In a fresh process, after many instances, every listed name still fits."""
    out = subprocess.run(
        [sys.executable, "-c", _PRIMED_CHECK],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(out) == 2
    assert all(int(size) <= 48 + 8 * 30 for size in out), out
