"""Keep Twisted transports' attributes in CPython's compact per-instance form.

CPython 3.11 keeps an instance's attributes in a small values array indexed by
keys its class shares among all its instances, as long as every name the
instance gets is in those shared keys. A name that is not in them turns that
instance's attributes into a full dict: for a backend transport (`tcp.Client`
and its subclasses) 832 bytes instead of about 250.

The shared keys only take a new name while they have room, and every new
instance of the class shrinks that room by one (CPython 3.11 sizes the values
array to what earlier instances used). Names that a transport only gets once
connected (``connected``, ``realAddress``, ``logstr``, set when ``connect(2)``
completes) are therefore lost for good when many connects start before the
first one completes, which is how a proxy opens its backend connections under
load: measured in l4lb, every idle backend transport then held a full dict.

`prime` sets the names on one throwaway instance right after the class is
defined, so they are in the shared keys before any real instance exists. It
changes nothing but memory: other Python versions (or names not listed) only
lose the saving. The name lists are what Twisted's transports set during a
connection's life (``tests/test_shapes.py`` fails if Twisted starts setting
others on an idle connection).
"""

from __future__ import annotations

from collections.abc import Iterable

# What `abstract.FileDescriptor` and `tcp.Connection` set on an idle
# connection of either kind, on the copy path (``producer`` … ``offset``)
# too, and what `l4lb.hook` adds. Names that only appear while closing are
# left out: each listed name costs 8 bytes in every instance's values array.
_CONNECTION = (
    "reactor",
    "_tempDataBuffer",
    "_tempDataLen",
    "socket",
    "fileno",
    "protocol",
    "connected",
    "producer",
    "streamingProducer",
    "dataBuffer",
    "offset",
    "_l4lb_handler",
)

TCP_CLIENT: tuple[str, ...] = (
    "connector",
    "addr",
    "_requiresResolution",
    *_CONNECTION[:6],
    "_start",  # l4lb.connector._Client
    "doWrite",  # doConnect's stand-ins while connecting
    "doRead",
    "realAddress",
    *_CONNECTION[6:],
    "logstr",
)
"""Instance attribute names of `tcp.Client` (and l4lb's subclass) in an idle connection."""

TCP_SERVER: tuple[str, ...] = (
    *_CONNECTION[:6],
    "server",
    "client",
    "sessionno",
    "hostname",
    *_CONNECTION[6:],
)
"""Instance attribute names of `tcp.Server` (as `l4lb.accept.Server` sets them)."""


def prime(cls: type, names: Iterable[str]) -> None:
    """Put ``names`` in the shared instance keys of ``cls`` (call right after defining it).

    Names the class defines as data descriptors (properties) never go into an
    instance's attributes and are skipped.
    """
    obj = cls.__new__(cls)  # type: ignore[call-overload]
    for name in names:
        if hasattr(getattr(cls, name, None), "__set__"):
            continue
        object.__setattr__(obj, name, None)
