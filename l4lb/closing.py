"""Close a plain TCP transport without waiting for one more writable event.

Twisted's ``loseConnection`` always watches the socket for writability and
closes from ``doWrite``, even when nothing is left to send, and
``loseWriteConnection`` does the same before ``shutdown(SHUT_WR)``. For a
proxy that closes both sides of every session, that is one more epoll change
and one more readiness event per side (three per ``-k 0`` connection).

`lose_connection` and `lose_write_connection` take that shortcut when it
cannot change what the peer sees: a plain (not TLS) ``tcp.Connection`` with
an empty write buffer, no producer, and (for a spliced session) empty pipes,
as the caller says with ``pending``. Otherwise they call Twisted's own method.

- The half-close happens at once: ``shutdown(SHUT_WR)`` and the protocol's
  ``writeConnectionLost``, as Twisted's ``doWrite`` would do it.
- The close stops reading at once (as Twisted does) and happens after the
  current batch of events: `drain` does what the reactor's
  ``_disconnectSelectable`` does after ``doWrite`` returned
  ``CONNECTION_DONE`` (``removeReader``, ``removeWriter``, then
  ``connectionLost`` with a ``ConnectionDone`` failure), in one call:
  ``connectionLost`` itself stops reading and writing, so the two removes are
  repeats, and the failure it gets answers ``check`` from a cache (`_Done`). Closing from inside the caller would call the
  protocol's ``connectionLost`` (and so the session's) from inside the
  session's own callbacks. `l4lb.fastpoll` drains the queue after its event
  loop (and before polling, for closes asked by timers); other reactors get
  one ``callLater(0)`` per batch.

Relies on Twisted internals (``FileDescriptor.disconnecting``,
``_writeDisconnecting``/``_writeDisconnected``, ``dataBuffer``/``offset``/
``_tempDataLen``, ``_aborting``, ``tcp.Connection._closeWriteConnection``,
``PosixReactorBase._disconnectSelectable``'s steps,
``FileDescriptor.connectionLost`` stopping reading and writing);
``tests/test_closing.py`` fails loudly if any of them changes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error, main, tcp
from twisted.python import failure, log


class _Done(failure.Failure):
    """The ``ConnectionDone`` failure handed to closed transports, ``check`` cached.

    ``tcp.Connection.connectionLost`` asks ``reason.check(ConnectionAborted)``
    on every close, and ``Failure.check`` qualifies the class name each time
    (five Python calls). The answer depends only on the arguments and the
    failure's type, which never changes; one instance is shared, as the
    reactor shares its own ``ConnectionDone`` failure.
    """

    def __init__(self, exc_value: BaseException) -> None:
        super().__init__(exc_value)
        self._checked: dict[tuple[Any, ...], Any] = {}

    def check(self, *errorTypes: Any) -> Any:
        """``Failure.check``, remembered per argument tuple."""
        checked = self._checked
        try:
            return checked[errorTypes]
        except KeyError:
            result = checked[errorTypes] = super().check(*errorTypes)
            return result
        except TypeError:  # unhashable argument
            return super().check(*errorTypes)


# What the reactor's _disconnectSelectable hands over for CONNECTION_DONE.
_DONE = _Done(main.CONNECTION_DONE)
assert isinstance(main.CONNECTION_DONE, error.ConnectionDone)

# Transports whose close waits for the end of the current batch of events.
_pending: list[Any] = []
# The reactor whose loop drains `_pending` itself (l4lb.fastpoll), if any.
_loop_drains: Any = None
# A callLater(0) drain is scheduled (reactors that do not drain in their loop).
_scheduled = False


def loop_drains(reactor: Any) -> None:
    """``reactor``'s loop calls `drain` after each batch of events (`l4lb.fastpoll`)."""
    global _loop_drains
    _loop_drains = reactor


def pending() -> bool:
    """Whether closes wait for `drain`."""
    return bool(_pending)


def _idle(transport: Any) -> bool:
    """A connected plain TCP transport with nothing to send and no producer."""
    return (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and transport.producer is None
        and len(transport.dataBuffer) == transport.offset
        and not transport._tempDataLen
        and not transport._aborting
    )


def lose_connection(transport: Any, pending: int = 0) -> None:
    """``transport.loseConnection()``, without the writable round trip if nothing is buffered.

    ``pending``: bytes still on their way to ``transport`` outside Twisted's
    buffer (a splice pipe); any makes this Twisted's ``loseConnection``.
    """
    if pending or not _idle(transport):
        transport.loseConnection()
        return
    transport.stopReading()
    transport.disconnecting = 1  # as Twisted: later loseConnection calls do nothing
    _pending.append(transport)
    reactor = transport.reactor
    if reactor is not _loop_drains:
        global _scheduled
        if not _scheduled:
            _scheduled = True
            reactor.callLater(0, drain)


def lose_write_connection(transport: Any, pending: int = 0) -> None:
    """``transport.loseWriteConnection()``: ``shutdown(SHUT_WR)`` at once if nothing is buffered."""
    if pending or not _idle(transport) or transport._writeDisconnecting:
        transport.loseWriteConnection()
        return
    # The state Twisted's doWrite leaves behind, then what it calls.
    transport._writeDisconnecting = True
    transport._writeDisconnected = True
    transport._closeWriteConnection()


def drain() -> None:
    """Close the transports `lose_connection` queued, as Twisted's ``doWrite`` would."""
    global _scheduled
    while _pending:
        batch = _pending[:]
        _pending.clear()  # connectionLost callbacks may queue more
        for transport in batch:
            if not transport.connected or transport._aborting:
                continue  # lost meanwhile, or aborted (its own close is on its way)
            if len(transport.dataBuffer) > transport.offset or transport._tempDataLen:
                transport.startWriting()  # written to since: Twisted flushes, closes
                continue
            try:
                # _disconnectSelectable(transport, CONNECTION_DONE, False) minus
                # its removeReader/removeWriter, which connectionLost repeats.
                transport.connectionLost(_DONE)
            except Exception:
                log.err(None, f"error closing {transport!r}")
    _scheduled = False
