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

The same ``install`` gives the reactor leaner ``addReader``/``addWriter``/
``removeReader``/``removeWriter`` (`_lean_interest`), and makes the loop
close the transports `l4lb.closing` queued, after each batch of events.

Only the exact ``EPollReactor`` class is changed (not subclasses, not other
reactors), and only where l4lb runs the reactor itself: ``twistd l4lb`` and
worker processes, never the test suite's shared reactor.
"""

from __future__ import annotations

import errno
import functools
import sys
from typing import Any

from twisted.python import log

from l4lb import closing

try:
    from select import EPOLLIN, EPOLLOUT

    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # not Linux
    EPollReactor = None  # type: ignore[assignment,misc]


def install(reactor: Any) -> bool:
    """Use `do_poll` for ``reactor`` if it is Twisted's epoll reactor; True if so."""
    if EPollReactor is None or type(reactor) is not EPollReactor:
        return False
    reactor.doIteration = functools.partial(do_poll, reactor)
    _lean_interest(reactor)
    closing.loop_drains(reactor)
    return True


def _lean_interest(reactor: Any) -> None:
    """``addReader``/``addWriter``/``removeReader``/``removeWriter`` in fewer calls.

    A new connection changes the reactor's interest in its sockets about 20
    times, and half of those are no-ops (``connectionLost`` stops reading and
    writing that already stopped). Twisted's methods first ask the
    ``_continuousPolling`` fallback (regular files, which epoll refuses),
    then go through ``_add``/``_remove``: about five Python calls each. These
    do the same bookkeeping (``_reads``, ``_writes``, ``_selectables``, then
    the same ``epoll_ctl``) in one, and hand the rare cases (a descriptor
    epoll refuses, a selectable whose ``fileno()`` is already -1) to
    Twisted's own methods. Twisted's private attributes used here are
    checked by ``tests/test_fastpoll.py``.
    """
    reads: set[int] = reactor._reads
    writes: set[int] = reactor._writes
    selectables: dict[int, Any] = reactor._selectables
    poller = reactor._poller
    add_reader, add_writer = reactor.addReader, reactor.addWriter
    remove_reader, remove_writer = reactor.removeReader, reactor.removeWriter
    both = EPOLLIN | EPOLLOUT

    def addReader(reader: Any) -> None:
        fd = reader.fileno()
        if fd in reads:
            return
        if fd in writes:
            poller.modify(fd, both)
        else:
            try:
                poller.register(fd, EPOLLIN)
            except OSError:
                add_reader(reader)  # EPERM: continuous polling; else it raises
                return
        reads.add(fd)
        selectables[fd] = reader

    def addWriter(writer: Any) -> None:
        fd = writer.fileno()
        if fd in writes:
            return
        if fd in reads:
            poller.modify(fd, both)
        else:
            try:
                poller.register(fd, EPOLLOUT)
            except OSError:
                add_writer(writer)
                return
        writes.add(fd)
        selectables[fd] = writer

    def removeReader(reader: Any) -> None:
        fd = reader.fileno()
        if fd in reads:
            if fd in writes:
                poller.modify(fd, EPOLLOUT)
            else:
                del selectables[fd]
                poller.unregister(fd)
            reads.remove(fd)
        elif fd == -1 or reactor._continuousPolling._readers:
            remove_reader(reader)

    def removeWriter(writer: Any) -> None:
        fd = writer.fileno()
        if fd in writes:
            if fd in reads:
                poller.modify(fd, EPOLLIN)
            else:
                del selectables[fd]
                poller.unregister(fd)
            writes.remove(fd)
        elif fd == -1 or reactor._continuousPolling._writers:
            remove_writer(writer)

    reactor.addReader = addReader
    reactor.addWriter = addWriter
    reactor.removeReader = removeReader
    reactor.removeWriter = removeWriter


def do_poll(reactor: Any, timeout: float | None) -> None:
    """``EPollReactor.doPoll`` without ``callWithLogger`` around each event.

    Closes queued by `l4lb.closing` are made after the batch of events, and
    before polling (those asked by timers): the poll then does not block.
    """
    if timeout is None:
        timeout = -1  # wait indefinitely
    if closing._pending:
        closing.drain()
        timeout = 0  # the closes may have scheduled calls for now
    selectables = reactor._selectables
    try:
        events = reactor._poller.poll(timeout, len(selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    do_read_or_write = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            if event == EPOLLIN and selectable.fileno() != -1:
                # Readable and nothing else (most events): _doReadOrWrite's
                # own steps for that case, without its frame.
                try:
                    why = selectable.doRead()
                except BaseException:
                    why = sys.exc_info()[1]
                    log.err()
                if why:
                    disconnect(selectable, why, True)
            else:
                do_read_or_write(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.err(None, f"error handling an event on {selectable!r}")
    if closing._pending:
        closing.drain()
