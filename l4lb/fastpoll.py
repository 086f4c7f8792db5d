"""A cheaper dispatch loop for Twisted's epoll reactor (l4lb's processes only).

For every readiness event, ``EPollReactor.doPoll`` calls the selectable
through ``twisted.python.log.callWithLogger``: it asks the selectable for its
``logPrefix``, copies and updates the legacy log-context dictionary and
pushes it with ``twisted.python.context``. That is about 15 Python calls
per event, only to put a ``system`` prefix on legacy Twisted log messages
emitted while the event is handled. A proxied request costs two events, so
this was a third of the Python calls per request on a kept-alive
connection, and about 120 of the ~725 per new connection (cProfile counts,
docs/performance.md). l4lb logs through structlog, which does not use that
context.

`install` replaces the instance's ``doIteration`` with `do_poll`: Twisted's
own ``doPoll`` without that wrapper. Each event still goes through the
reactor's ``_doReadOrWrite``, which catches and logs a failing
``doRead``/``doWrite`` and disconnects that selectable; an exception from a
disconnect handler is logged here, as ``callWithLogger`` does, and the loop
goes on. The cost is that Twisted's own error lines logged during I/O carry
the system ``-`` instead of the protocol's name.

Only the exact ``EPollReactor`` class is changed (not subclasses, not other
reactors), and only where l4lb runs the reactor itself: ``twistd l4lb`` and
worker processes, never the test suite's shared reactor.
"""

from __future__ import annotations

import errno
import functools
from typing import Any

from twisted.python import log

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # not Linux
    EPollReactor = None  # type: ignore[assignment,misc]


def install(reactor: Any) -> bool:
    """Use `do_poll` for ``reactor`` if it is Twisted's epoll reactor; True if so."""
    if EPollReactor is None or type(reactor) is not EPollReactor:
        return False
    reactor.doIteration = functools.partial(do_poll, reactor)
    return True


def do_poll(reactor: Any, timeout: float | None) -> None:
    """``EPollReactor.doPoll`` without ``callWithLogger`` around each event."""
    if timeout is None:
        timeout = -1  # wait indefinitely
    selectables = reactor._selectables
    try:
        events = reactor._poller.poll(timeout, len(selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    do_read_or_write = reactor._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            do_read_or_write(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.err(None, f"error handling an event on {selectable!r}")
