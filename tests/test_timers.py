"""`l4lb.timers.TimerQueue`: DelayedCall semantics behind one reactor timer."""

from __future__ import annotations

from twisted.internet.task import Clock

from l4lb.timers import TimerQueue, queue_for


class _Owner:
    def __init__(self, clock: Clock, fired: list[tuple[str, float]], name: str) -> None:
        self.clock = clock
        self.fired = fired
        self.name = name
        self.then: object = None  # called from _on_timer

    def _on_timer(self) -> None:
        self.fired.append((self.name, self.clock.seconds()))
        if callable(self.then):
            self.then()


def _setup() -> tuple[Clock, TimerQueue, list[tuple[str, float]]]:
    clock = Clock()
    return clock, TimerQueue(clock), []


class TestTimerQueue:
    def test_fires_in_time_order_at_not_before_the_time(self) -> None:
        clock, q, fired = _setup()
        q.add(5.0, _Owner(clock, fired, "b"))
        q.add(2.0, _Owner(clock, fired, "a"))
        q.add(5.0, _Owner(clock, fired, "c"))
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(1.999)
        assert fired == []
        clock.advance(0.001)
        assert fired == [("a", 2.0)]
        clock.advance(3)
        assert fired == [("a", 2.0), ("b", 5.0), ("c", 5.0)]
        assert clock.getDelayedCalls() == [] and q.live == 0

    def test_postpone_moves_later_without_firing_early(self) -> None:
        clock, q, fired = _setup()
        other = q.add(3.0, _Owner(clock, fired, "other"))
        entry = q.add(1.0, _Owner(clock, fired, "x"))  # the head
        q.postpone(entry, 2.5)
        q.postpone(other, 4.0)  # not the head: lazily
        assert q.when(entry) == 2.5 and q.when(other) == 4.0
        clock.advance(2.4)
        assert fired == []
        clock.advance(0.1)
        assert fired == [("x", 2.5)]
        clock.advance(0.5)  # other's old time: nothing
        assert fired == [("x", 2.5)]
        clock.advance(1)
        assert fired == [("x", 2.5), ("other", 4.0)]
        assert clock.getDelayedCalls() == []

    def test_postpone_and_when_are_the_entrys_due_time(self) -> None:
        """`Session._schedule` reads ``entry[3]`` instead of calling `when`:
        this fails if the entry layout changes."""
        clock, q, fired = _setup()
        entry = q.add(1.0, _Owner(clock, fired, "x"))
        other = q.add(2.0, _Owner(clock, fired, "y"))
        assert q.when(entry) == entry[3] == 1.0
        q.postpone(entry, 4.0)
        q.postpone(other, 5.0)
        assert q.when(entry) == entry[3] == 4.0 and q.when(other) == other[3] == 5.0
        clock.advance(4.0)
        assert fired == [("x", 4.0)]
        clock.advance(1.0)
        assert fired == [("x", 4.0), ("y", 5.0)]

    def test_cancelled_entries_never_fire_and_leave_no_timer(self) -> None:
        clock, q, fired = _setup()
        a = q.add(1.0, _Owner(clock, fired, "a"))
        b = q.add(2.0, _Owner(clock, fired, "b"))
        q.cancel(a)
        q.cancel(a)  # twice: no-op
        assert [c.getTime() for c in clock.getDelayedCalls()] == [2.0]
        q.cancel(b)
        assert clock.getDelayedCalls() == [] and q.live == 0
        clock.advance(10)
        assert fired == []

    def test_a_callback_cancelling_a_due_entry_stops_it(self) -> None:
        clock, q, fired = _setup()
        first = _Owner(clock, fired, "first")
        second_entry = q.add(1.0, _Owner(clock, fired, "second"))
        q.add(1.0, first)
        # All due at 1.0, run in the order added: "second" cancels "third".
        third_entry = q.add(1.0, _Owner(clock, fired, "third"))
        second = second_entry[2]
        second.then = lambda: q.cancel(third_entry)
        clock.advance(1)
        assert [name for name, _ in fired] == ["second", "first"]
        assert clock.getDelayedCalls() == []

    def test_entries_added_while_firing_run_on_a_later_pass(self) -> None:
        clock, q, fired = _setup()
        owner = _Owner(clock, fired, "a")
        again = _Owner(clock, fired, "again")
        owner.then = lambda: q.add(clock.seconds(), again)  # due at once
        q.add(1.0, owner)
        clock.advance(1)  # task.Clock runs a due call within the same advance
        assert fired == [("a", 1.0), ("again", 1.0)]
        assert clock.getDelayedCalls() == []

    def test_many_cancels_are_swept(self) -> None:
        clock, q, fired = _setup()
        keep = q.add(1000.0, _Owner(clock, fired, "keep"))
        entries = [q.add(500.0 + i, _Owner(clock, fired, str(i))) for i in range(300)]
        for e in entries:
            q.cancel(e)
        assert len(q._heap) < 100  # swept, not held until their times
        assert q.when(keep) == 1000.0
        clock.advance(1000)
        assert fired == [("keep", 1000.0)]

    def test_one_queue_per_clock(self) -> None:
        a, b = Clock(), Clock()
        assert queue_for(a) is queue_for(a)
        assert queue_for(a) is not queue_for(b)
        assert queue_for(b) is queue_for(b) and queue_for(a) is queue_for(a)
