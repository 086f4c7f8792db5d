"""One reactor timer for all the sessions of a clock, instead of one each.

A Twisted ``DelayedCall`` costs about 450 bytes (the object, its dict, three
bound methods, a ``kw`` dict), and every idle session holds one for its idle
deadline. `TimerQueue` keeps the sessions' deadlines in a heap of small
lists (about 150 bytes each) behind a single ``callLater`` for the earliest.

The semantics are a ``DelayedCall``'s: an entry fires its owner's
``_on_timer`` once, at (not before) its time; `TimerQueue.postpone` moves it
later lazily (as ``DelayedCall.reset`` does: the heap is re-sorted when the
old time comes); a cancelled entry never fires. When no entry is live, the
clock holds no timer at all (``getDelayedCalls() == []``).
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Owner(Protocol):
    def _on_timer(self) -> None:
        """The entry's time has come."""


# An entry: [heap time, sequence, owner (None once fired or cancelled), due time].
# A list, so that cancelling can drop the owner in place; compared in C by
# (heap time, sequence), never by owner.
Entry = list[Any]

# Stale (cancelled) entries are swept once they outnumber live ones by this.
_SWEEP_MIN = 64


class TimerQueue:
    """The deadlines of many owners behind one ``callLater`` (see module doc)."""

    __slots__ = (
        "__weakref__",
        "_call",
        "_clock",
        "_firing",
        "_heap",
        "_seq",
        "_stale",
        "live",
    )

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._heap: list[Entry] = []
        self._seq = itertools.count()
        self._call: IDelayedCall | None = None
        self._firing = False
        self._stale = 0
        self.live = 0

    def add(self, when: float, owner: Owner) -> Entry:
        """Call ``owner._on_timer()`` at ``when`` (unless cancelled or postponed)."""
        entry = [when, next(self._seq), owner, when]
        heap = self._heap
        heapq.heappush(heap, entry)
        self.live += 1
        if heap[0] is entry and not self._firing:
            self._arm()
        return entry

    @staticmethod
    def when(entry: Entry) -> float:
        """When the entry is due (its ``DelayedCall.getTime``)."""
        return entry[3]  # type: ignore[no-any-return]

    def postpone(self, entry: Entry, when: float) -> None:
        """Move a live entry later (``when`` >= its time), lazily."""
        entry[3] = when
        heap = self._heap
        if heap[0] is entry and not self._firing:
            entry[0] = when
            heapq.heapreplace(heap, entry)
            self._arm()

    def cancel(self, entry: Entry) -> None:
        """The entry will not fire (no-op if it has fired or was cancelled)."""
        if entry[2] is None:
            return
        entry[2] = None
        self.live -= 1
        self._stale += 1
        if self.live == 0:
            self._heap.clear()
            self._stale = 0
        elif self._stale > _SWEEP_MIN and self._stale > self.live:
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._stale = 0
        if not self._firing:
            self._arm()

    def _arm(self) -> None:
        """Point the one reactor timer at the earliest live entry, or drop it."""
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self._stale -= 1
        call = self._call
        if not heap:
            if call is not None:
                self._call = None
                call.cancel()
            return
        at = heap[0][0]
        if call is not None:
            if call.getTime() != at:
                call.reset(max(0.0, at - self._clock.seconds()))
            return
        self._call = self._clock.callLater(
            max(0.0, at - self._clock.seconds()), self._fire
        )

    def _fire(self) -> None:
        """Run the entries that are due, in time order, then re-arm."""
        self._call = None
        self._firing = True
        heap = self._heap
        # Entries added by the callbacks run on a later pass, as a new
        # DelayedCall would (the real reactor runs it on its next iteration).
        limit = next(self._seq)
        try:
            now = self._clock.seconds()
            while heap and heap[0][0] <= now and heap[0][1] < limit:
                entry = heap[0]
                owner = entry[2]
                if owner is None:
                    heapq.heappop(heap)
                    self._stale -= 1
                    continue
                if entry[3] > now:  # postponed: sort it in at its new time
                    entry[0] = entry[3]
                    heapq.heapreplace(heap, entry)
                    continue
                heapq.heappop(heap)
                entry[2] = None
                self.live -= 1
                owner._on_timer()
                heap = self._heap  # a sweep may have replaced it
        finally:
            self._firing = False
            if self.live == 0:
                self._heap.clear()
                self._stale = 0
            self._arm()


_QUEUES: weakref.WeakKeyDictionary[Any, TimerQueue] = weakref.WeakKeyDictionary()
_last: TimerQueue | None = None  # a process has one reactor: skip the weak lookup


def queue_for(clock: IReactorTime) -> TimerQueue:
    """The clock's one `TimerQueue` (made on first use)."""
    global _last
    last = _last
    if last is not None and last._clock is clock:
        return last
    queue = _QUEUES.get(clock)
    if queue is None:
        queue = _QUEUES[clock] = TimerQueue(clock)
    _last = queue
    return queue
