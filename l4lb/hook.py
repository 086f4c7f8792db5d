"""Redirect the reactor's ``doRead``/``doWrite`` calls on a Twisted transport.

The reactor calls a transport's ``doRead`` when its socket is readable and
``doWrite`` when it is writable. The fast path (`l4lb.splice`) and the
departure watch (`l4lb.proxy.DepartureWatch`) need those calls while leaving
the rest of the transport (registration, closing, ``connectionLost``) to
Twisted.

`hook` switches the transport's class to a subclass, made once per class, with
the same layout (one base, empty ``__slots__``), whose ``doRead``/``doWrite``
call the ``on_read``/``on_write`` methods of one handler, kept in the
transport's own ``__dict__`` (``_l4lb_handler``). Setting bound methods on the
instance, as Twisted's ``abortConnection`` does, would work too, but costs two
method objects per transport. One more key in a Twisted transport's dict
costs nothing (it has room), where an entry in a table keyed by transport cost
about 37 bytes. The class switch itself costs 64 bytes (CPython makes the
instance's dict a real dict object). `unhook` restores the class.
"""

from __future__ import annotations

from typing import Any, Protocol


class Handler(Protocol):
    def on_read(self) -> Exception | None:
        """The transport's socket is readable (instead of its ``doRead``)."""

    def on_write(self) -> Exception | None:
        """The transport's socket is writable (instead of its ``doWrite``)."""


_classes: dict[type, type] = {}
_hooked: set[type] = set()


def _do_read(transport: Any) -> Exception | None:
    return transport._l4lb_handler.on_read()  # type: ignore[no-any-return]


def _do_write(transport: Any) -> Exception | None:
    return transport._l4lb_handler.on_write()  # type: ignore[no-any-return]


def hook(transport: Any, handler: Handler) -> None:
    """Send the reactor's calls on ``transport`` to ``handler``."""
    if type(transport) in _hooked:
        unhook(transport)
    cls = type(transport)
    hooked = _classes.get(cls)
    if hooked is None:
        namespace = {
            "__slots__": (),
            "__module__": __name__,
            "doRead": _do_read,
            "doWrite": _do_write,
        }
        hooked = _classes[cls] = type(f"Hooked{cls.__name__}", (cls,), namespace)
        _hooked.add(hooked)
    transport._l4lb_handler = handler
    transport.__class__ = hooked


def unhook(transport: Any) -> None:
    """Give the transport its own ``doRead``/``doWrite`` back (no-op if not hooked)."""
    cls = type(transport)
    if cls in _hooked:
        transport.__class__ = cls.__mro__[1]
        del transport._l4lb_handler


def original_do_write(transport: Any) -> Exception | None:
    """Twisted's own ``doWrite`` of a hooked (or unhooked) transport."""
    cls = type(transport)
    if cls in _hooked:
        cls = cls.__mro__[1]
    return cls.doWrite(transport)  # type: ignore[no-any-return]
