"""A leaner main loop for Twisted's epoll reactor (l4lb's processes only).

Each pass of Twisted's ``ReactorBase.mainLoop`` enters a ``_topHandler``
context manager and calls ``runUntilCurrent`` and ``timeout``: two more
Python frames, ``_insertNewDelayedCalls`` twice, the clock twice, ``min``
and ``max``, even when no thread call is queued and no timer is due, which
is nearly always. With few clients (pgbench's 8) a pass handles one to
three events, so this bookkeeping was about 40% of the Python frames per
proxied transaction (cProfile counts, docs/perf-notes/loop.md).

`main_loop` looks at the same state first and calls Twisted's own
``runUntilCurrent`` and ``timeout`` only when one of them has something to
do: a thread call queued (``callFromThread``, and so every signal handler
and ``reactor.stop`` from a signal), a timer added since the last pass, the
first timer due, enough cancelled timers for Twisted to compact its heap, or
a ``reactor.stop()`` whose shutdown triggers must fire. Otherwise the poll
timeout is computed as ``timeout`` does: ``None`` without timers, else the
time to the first one, at most ``_LONGEST`` seconds. Timers, thread calls
and shutdown therefore run in Twisted's code and order; an exception escaping
a pass is logged as "Unexpected error in main loop" (critical) and the loop
goes on, as with ``_topHandler``. The poll itself is still the reactor's
``doIteration`` (`l4lb.fastpoll` when installed).

It reads the reactor's private attributes ``_started``, ``_justStopped``,
``_newTimedCalls``, ``_pendingTimedCalls`` (a heap of ``DelayedCall``, ``.time``
of the first), ``_cancellations`` and ``threadCallQueue``;
tests/test_runloop.py fails loudly if Twisted changes them or the loop they
come from. Only the exact ``EPollReactor`` class is changed, and only where
l4lb runs the reactor itself (``twistd l4lb`` and worker processes).
"""

from __future__ import annotations

import functools
from typing import Any

from twisted.logger import Logger, LogLevel

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # not Linux
    EPollReactor = None  # type: ignore[assignment,misc]

# Twisted's own bound on a poll timeout (2**31 ms, epoll_wait takes an int).
_LONGEST = 2147483

_log = Logger(namespace="twisted.internet.base")


def install(reactor: Any) -> bool:
    """Run ``reactor`` with `main_loop` if it is Twisted's epoll reactor; True if so."""
    if EPollReactor is None or type(reactor) is not EPollReactor:
        return False
    reactor.mainLoop = functools.partial(main_loop, reactor)
    return True


def main_loop(reactor: Any) -> None:
    """``ReactorBase.mainLoop``, skipping ``runUntilCurrent``/``timeout`` when idle."""
    seconds = reactor.seconds
    while reactor._started:
        # try costs nothing on Python 3.11+ until something is raised, so it
        # is set up once, not once per pass as Twisted's ``with`` block is.
        try:
            while reactor._started:
                pending = reactor._pendingTimedCalls  # rebuilt on compaction
                cancelled = reactor._cancellations
                if (
                    reactor.threadCallQueue
                    or reactor._newTimedCalls
                    or reactor._justStopped
                    or (cancelled > 50 and cancelled > len(pending) >> 1)
                ):
                    reactor.runUntilCurrent()
                    timeout = reactor.timeout()
                elif pending:
                    delay = pending[0].time - seconds()
                    if delay <= 0:  # a timer is due
                        reactor.runUntilCurrent()
                        timeout = reactor.timeout()
                    else:
                        timeout = delay if delay < _LONGEST else _LONGEST
                else:
                    timeout = None
                reactor.doIteration(reactor.running and timeout)
        except BaseException:
            _log.failure("Unexpected error in main loop", level=LogLevel.critical)
    _log.info("Main loop terminated.")
