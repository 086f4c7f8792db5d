"""Health checking: HAProxy's counter, the probe loop on a fake clock, and what
state changes do to the pool (usable, queue, backups, on_down, slow start)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import attrs
import pytest
from structlog.testing import capture_logs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from l4lb.config import HealthConfig, parse_config
from l4lb.health.checks import CheckResult
from l4lb.health.counter import DOWN, GOING_DOWN, GOING_UP, UP, HealthCounter
from l4lb.health.monitor import SLOW_START_STEPS, WEIGHT_SCALE, PoolMonitor
from l4lb.service import L4LBService
from tests.fakes import Harness

# -- the counter ---------------------------------------------------------------


def run(counter: HealthCounter, results: str) -> list[bool]:
    """Feed "+"/"-" results; the up flag after each."""
    ups = []
    for r in results:
        counter.record(r == "+")
        ups.append(counter.up)
    return ups


class TestCounter:
    @pytest.mark.parametrize(("rise", "fall"), [(1, 1), (2, 3), (3, 2), (5, 5)])
    def test_down_server_needs_rise_successes(self, rise: int, fall: int) -> None:
        """From fully down, exactly ``rise`` successes in a row mark the server up."""
        counter = HealthCounter.start(rise, fall, "down")
        assert run(counter, "+" * rise) == [False] * (rise - 1) + [True]
        assert counter.health == rise + fall - 1
        assert counter.state == UP

    @pytest.mark.parametrize(("rise", "fall"), [(1, 1), (2, 3), (3, 2), (5, 5)])
    def test_up_server_needs_fall_failures(self, rise: int, fall: int) -> None:
        """From full health, exactly ``fall`` failures in a row mark the server down."""
        counter = HealthCounter(rise, fall, rise + fall - 1)
        assert run(counter, "-" * fall) == [True] * (fall - 1) + [False]
        assert counter.health == 0
        assert counter.state == DOWN

    def test_success_while_up_restores_full_health(self) -> None:
        """One success after failures that did not mark it down restores full health."""
        counter = HealthCounter(2, 3, 4)
        run(counter, "--+")
        assert counter.health == 4
        assert run(counter, "--") == [True, True]  # still needs all 3 failures

    def test_failure_while_going_up_starts_over(self) -> None:
        """A failure below ``rise`` drops the counter to 0: the rise starts again."""
        counter = HealthCounter.start(3, 2, "down")
        run(counter, "++-")
        assert counter.health == 0
        assert run(counter, "+++") == [False, False, True]

    def test_initial_up_goes_down_on_one_failure(self) -> None:
        """``initial_state = "up"`` puts the counter at ``rise``: one failure marks down."""
        counter = HealthCounter.start(2, 3, "up")
        assert counter.up and counter.health == 2
        assert counter.record(False) is True
        assert not counter.up

    def test_states_between(self) -> None:
        """Between the ends the state says which way the server is moving."""
        counter = HealthCounter.start(3, 3, "down")
        assert counter.state == DOWN
        counter.record(True)
        assert counter.state == GOING_UP
        run(counter, "++")
        assert counter.state == UP
        counter.record(False)
        assert counter.state == GOING_DOWN

    def test_record_reports_only_flips(self) -> None:
        """`record` is True exactly when the server changes between up and down."""
        counter = HealthCounter.start(2, 2, "down")
        flips = [counter.record(r == "+") for r in "+++---"]
        assert flips == [False, True, False, False, True, False]


# -- the monitor on a fake clock ------------------------------------------------


class FakeCheck:
    """A check the test scripts: per server, "ok", "fail" or "hang"."""

    def __init__(self) -> None:
        self.mode: dict[str, str] = {}
        self.calls: list[tuple[float, str]] = []
        self.cancelled: list[str] = []
        self.clock: Any = None

    def __call__(self, endpoint: Any) -> Deferred[CheckResult]:
        name = endpoint  # the tests' endpoint_for returns the server name
        self.calls.append((self.clock.seconds(), name))
        mode = self.mode.get(name, "ok")
        if mode == "ok":
            return succeed(CheckResult(True, "connected"))
        if mode == "fail":
            return succeed(CheckResult(False, "connect refused"))
        return Deferred(lambda d: self.cancelled.append(name))

    def times(self, name: str) -> list[float]:
        return [t for t, n in self.calls if n == name]


def health(**kw: Any) -> HealthConfig:
    return HealthConfig(**{"jitter": 0.0, **kw})


def monitored(
    servers: Any = 2, *, pool: dict[str, Any] | None = None, **kw: Any
) -> tuple[Harness, PoolMonitor, FakeCheck]:
    """A Harness pool watched by a monitor with a scripted check on its clock."""
    config = health(**kw)
    h = Harness(servers, pool={**(pool or {}), "health": config})
    check = FakeCheck()
    check.clock = h.clock
    monitor = PoolMonitor(
        h.pool,
        config,
        h.clock,
        lambda server: server.name,
        check=check,
        rng=random.Random(7),
    )
    return h, monitor, check


def tick(clock: Any, seconds: float, step: float = 0.05) -> None:
    """Advance ``clock`` in small steps, so each timer runs at its own time."""
    end = clock.seconds() + seconds + 1e-6  # float sums of steps fall short
    while clock.seconds() < end - 1e-9:
        clock.advance(min(step, end - clock.seconds()))


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


class TestIntervals:
    def test_interval_follows_state(self) -> None:
        """Fully up: interval; going down or up: fast_interval; fully down: down_interval."""
        h, monitor, check = monitored(
            1, interval=10, fast_interval=1, down_interval=30, rise=2, fall=2
        )
        monitor.start()
        h.clock.advance(2)  # first check (spread over fast_interval: at rise)
        assert len(check.times("s0")) == 1  # success → fully up
        h.clock.advance(10)
        assert len(check.times("s0")) == 2
        check.mode["s0"] = "fail"
        h.clock.advance(10)  # third check fails: going down
        assert len(check.times("s0")) == 3
        h.clock.advance(1)  # fast: fourth fails, down
        assert len(check.times("s0")) == 4
        assert not h.pool.server("s0").usable
        h.clock.advance(29.9)
        assert len(check.times("s0")) == 4
        h.clock.advance(0.1)
        assert len(check.times("s0")) == 5
        check.mode["s0"] = "ok"
        h.clock.advance(30)  # success: going up
        assert len(check.times("s0")) == 6
        h.clock.advance(1)  # fast again
        assert len(check.times("s0")) == 7
        assert h.pool.server("s0").usable
        gaps = [b - a for a, b in itertools.pairwise(check.times("s0"))]
        assert gaps == pytest.approx([10, 10, 1, 30, 30, 1])
        monitor.stop()

    def test_jitter_stays_within_bounds(self) -> None:
        """With jitter 20%, every gap between checks is within ±20% of the interval."""
        h, monitor, check = monitored(1, interval=10, jitter=0.2, rise=1, fall=1)
        monitor.start()
        for _ in range(200):
            tick(h.clock, 0.5)
        times = check.times("s0")
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) >= 8
        assert all(8 - 1e-9 <= g <= 12 + 1e-9 for g in gaps), gaps
        assert len({round(g, 6) for g in gaps}) > 1  # it does vary
        monitor.stop()

    def test_first_checks_are_staggered(self) -> None:
        """The first checks of a pool's servers are spread over the first interval."""
        h, monitor, check = monitored(5, interval=10, fast_interval=10, rise=1, fall=1)
        monitor.start()
        tick(h.clock, 10)
        firsts = sorted(check.times(f"s{i}")[0] for i in range(5))
        assert all(0 <= t <= 10 for t in firsts)
        # One in each fifth of the interval: never all at once.
        assert [int(t // 2) for t in firsts] == [0, 1, 2, 3, 4], firsts
        monitor.stop()


class TestStateChanges:
    def test_one_log_line_per_change_with_reason(self) -> None:
        """Going down and back up logs one line each, with pool, server, states, reason."""
        h, monitor, check = monitored(2, rise=2, fall=2, interval=1, fast_interval=1)
        monitor.start()
        tick(h.clock, 1)
        with capture_logs() as logs:
            check.mode["s1"] = "fail"
            for _ in range(5):
                tick(h.clock, 1)
            check.mode["s1"] = "ok"
            for _ in range(5):
                tick(h.clock, 1)
        changes = [e for e in logs if e["event"] in ("server down", "server up")]
        assert [e["event"] for e in changes] == ["server down", "server up"]
        down, up = changes
        assert down["pool"] == "p" and down["server"] == "s1"
        assert (down["old_state"], down["new_state"]) == ("up", "down")
        assert down["reason"] == "connect refused"
        assert (up["old_state"], up["new_state"], up["reason"]) == (
            "down",
            "up",
            "connected",
        )
        monitor.stop()

    def test_timeout_cancels_the_check(self) -> None:
        """A check that does not answer within ``timeout`` is cancelled and fails."""
        h, monitor, check = monitored(1, rise=1, fall=1, timeout=1, interval=5)
        monitor.start()
        check.mode["s0"] = "hang"
        with capture_logs() as logs:
            tick(h.clock, 5)
            tick(h.clock, 1)
        assert check.cancelled == ["s0"]
        (down,) = events(logs, "server down")
        assert down["reason"] == "timed out after 1s"
        assert not h.pool.server("s0").usable
        monitor.stop()

    def test_down_server_gets_no_new_connections(self) -> None:
        """Clients go only to servers that are up."""
        h, monitor, check = monitored(2, rise=1, fall=1)
        check.mode["s0"] = "fail"
        monitor.start()
        tick(h.clock, 1)
        assert not h.pool.server("s0").usable
        for _ in range(4):
            h.accept()
            name, _, _ = h.complete()
            assert name == "s1"
        monitor.stop()


class TestQueue:
    def test_all_down_queues_then_dispatches_when_one_comes_up(self) -> None:
        """With every server down a client waits, and gets the first that comes up."""
        h, monitor, check = monitored(
            2, initial_state="down", rise=1, fall=1, pool={"queue_timeout": 60}
        )
        check.mode.update(s0="fail", s1="fail")
        monitor.start()
        h.accept()
        assert h.pending_attempts() == []
        assert h.pool.queued == 1
        check.mode["s1"] = "ok"
        tick(h.clock, 5)
        name, _, _ = h.only_attempt()
        assert name == "s1"
        assert h.pool.queued == 0
        monitor.stop()

    def test_all_down_closes_after_queue_timeout_saying_no_server_up(self) -> None:
        """Nobody comes back within queue_timeout: the client is closed, "no server up"."""
        h, monitor, check = monitored(
            2, rise=1, fall=1, interval=1, pool={"queue_timeout": 3}
        )
        check.mode.update(s0="fail", s1="fail")
        monitor.start()
        with capture_logs() as logs:
            tick(h.clock, 1)
            assert not any(s.usable for s in h.pool.servers)
            _, client = h.accept()
            assert h.pool.queued == 1
            tick(h.clock, 3)
            assert client.disconnecting
            client.lose()
        (pool_down,) = events(logs, "no server up")
        assert pool_down["pool"] == "p"
        (closed,) = events(logs, "connection closed")
        assert closed["reason"] == "no server up"
        assert "pool p" in closed["detail"]
        monitor.stop()

    def test_all_down_without_queue_closes_at_once(self) -> None:
        """With ``queue_timeout = 0`` a client of an all-down pool is closed at once."""
        h, monitor, _ = monitored(
            1, initial_state="down", rise=1, fall=1, pool={"queue_timeout": 0}
        )
        monitor.start()
        with capture_logs() as logs:
            _, client = h.accept()
            assert client.disconnecting
            client.lose()
        assert events(logs, "connection closed")[0]["reason"] == "no server up"
        monitor.stop()

    def test_queued_client_goes_to_server_coming_back(self) -> None:
        """A client queued because every server is full is served when one comes up."""
        h, monitor, check = monitored(
            [{"max_connections": 1}, {"max_connections": 1}], rise=1, fall=1
        )
        check.mode["s1"] = "fail"
        monitor.start()
        tick(h.clock, 2)
        assert not h.pool.server("s1").usable
        h.connected_pair()  # s0 is now full
        h.accept()
        assert h.pool.queued == 1
        check.mode["s1"] = "ok"
        tick(h.clock, 5)
        name, _, _ = h.only_attempt()
        assert name == "s1"
        monitor.stop()

    def test_weight_zero_pool_still_refuses_at_once(self) -> None:
        """Servers drained to weight 0 are not "down": clients are refused at once."""
        h, monitor, _ = monitored([{"weight": 0}], rise=1, fall=1)
        monitor.start()
        with capture_logs() as logs:
            _, client = h.accept()
            assert client.disconnecting
            assert h.pool.queued == 0
            client.lose()
        assert events(logs, "connection closed")[0]["reason"] == "no server"
        monitor.stop()


class TestBackup:
    def test_backup_takes_over_while_primary_down_and_gives_back(self) -> None:
        """The backup gets new clients only while no primary is up."""
        h, monitor, check = monitored(
            [{"name": "primary"}, {"name": "spare", "backup": True}],
            rise=1,
            fall=1,
            interval=1,
        )
        monitor.start()
        tick(h.clock, 1)
        h.accept()
        assert h.complete()[0] == "primary"
        check.mode["primary"] = "fail"
        tick(h.clock, 1)
        h.accept()
        assert h.complete()[0] == "spare"
        check.mode["primary"] = "ok"
        tick(h.clock, 5)
        h.accept()
        assert h.complete()[0] == "primary"
        monitor.stop()


class TestOnDown:
    @pytest.mark.parametrize("on_down", ["keep", "close"])
    def test_live_sessions(self, on_down: str) -> None:
        """ "keep" leaves the down server's sessions open; "close" closes them."""
        h, monitor, check = monitored(
            [{"name": "a"}], rise=1, fall=1, interval=1, on_down=on_down
        )
        monitor.start()
        tick(h.clock, 1)
        _, client, _, server = h.connected_pair()
        check.mode["a"] = "fail"
        with capture_logs() as logs:
            tick(h.clock, 1)
            if on_down == "close":
                assert client.disconnecting and server.disconnecting
                client.lose()
                server.lose()
                (closed,) = events(logs, "connection closed")
                assert closed["reason"] == "server down"
            else:
                assert not client.disconnecting and not server.disconnecting
        (down,) = events(logs, "server down")
        assert down["live_connections"] == 1
        monitor.stop()

    def test_close_catches_a_connect_in_flight(self) -> None:
        """A connect that completes after its server went down is closed too."""
        h, monitor, check = monitored(
            [{"name": "a"}], rise=1, fall=1, interval=1, on_down="close"
        )
        monitor.start()
        tick(h.clock, 1)
        _, client = h.accept()
        check.mode["a"] = "fail"
        tick(h.clock, 1)
        assert not h.pool.server("a").usable
        with capture_logs() as logs:
            _, _, server = h.complete()
            assert client.disconnecting and server.disconnecting
            client.lose()
            server.lose()
        (closed,) = events(logs, "connection closed")
        assert closed["reason"] == "server down"
        monitor.stop()


class TestObserve:
    def test_failed_client_connects_count(self) -> None:
        """``fall`` failed client connects mark a server down between probes."""
        h, monitor, check = monitored(
            [{"name": "a"}, {"name": "b"}],
            pool={"retries": 0},
            rise=1,
            fall=2,
            interval=100,
            fast_interval=1,
            initial_state="up",
        )
        monitor.start()
        tick(h.clock, 50)  # first checks done: full health
        before = len(check.calls)
        with capture_logs() as logs:
            for _ in range(4):
                h.accept()
                name = h.pending_attempts()[0][0]
                if name == "a":
                    h.refuse()
                else:
                    h.complete()
        (down,) = events(logs, "server down")
        assert down["server"] == "a"
        assert down["reason"] == "client connect failed: connection refused"
        assert len(check.calls) == before  # no probe needed
        monitor.stop()

    def test_failed_connect_brings_next_probe_forward(self) -> None:
        """After a failed client connect the next probe comes after fast_interval."""
        h, monitor, check = monitored(
            [{"name": "a"}],
            pool={"retries": 0},
            rise=1,
            fall=3,
            interval=100,
            fast_interval=1,
        )
        monitor.start()
        tick(h.clock, 50)
        n = len(check.times("a"))
        h.accept()
        h.refuse()
        tick(h.clock, 1)
        assert len(check.times("a")) == n + 1

    def test_observe_off(self) -> None:
        """With ``observe = false`` failed client connects do not count."""
        h, monitor, _ = monitored(
            [{"name": "a"}], pool={"retries": 0}, rise=1, fall=1, observe=False
        )
        monitor.start()
        tick(h.clock, 1)
        h.accept()
        h.refuse()
        assert h.pool.server("a").usable
        monitor.stop()


class TestSlowStart:
    def test_not_at_process_start(self) -> None:
        """Servers up at start carry their full (scaled) weight at once."""
        h, monitor, _ = monitored([{"weight": 3, "max_connections": 40}], slow_start=20)
        monitor.start()
        tick(h.clock, 1)
        server = h.pool.servers[0]
        assert server.weight == 3 * WEIGHT_SCALE
        assert server.max_connections == 40
        monitor.stop()

    def test_first_rise_from_initial_down_is_not_slow(self) -> None:
        """A server that starts down and passes its first checks is not ramped."""
        h, monitor, _ = monitored(1, slow_start=20, initial_state="down", rise=2)
        monitor.start()
        tick(h.clock, 20)
        server = h.pool.servers[0]
        assert server.usable and server.weight == WEIGHT_SCALE
        assert not h.clock.getDelayedCalls() or all(
            c.func.__name__ == "_probe" for c in h.clock.getDelayedCalls()
        )
        monitor.stop()

    def test_ramp_after_coming_back(self) -> None:
        """After down→up weight and max_connections grow linearly in ≤5% steps."""
        h, monitor, check = monitored(
            [{"weight": 2, "max_connections": 100}],
            slow_start=20,
            rise=1,
            fall=1,
            interval=1,
            fast_interval=1,
            down_interval=1,
        )
        monitor.start()
        server = h.pool.servers[0]
        check.mode["s0"] = "fail"
        tick(h.clock, 1)
        assert not server.usable
        check.mode["s0"] = "ok"
        with capture_logs() as logs:
            tick(h.clock, 1)
            assert server.usable
            up_at = h.clock.seconds()
            samples = [(server.weight, server.max_connections)]
            while h.clock.seconds() < up_at + 21:
                h.clock.advance(0.25)
                samples.append((server.weight, server.max_connections))
        full = 2 * WEIGHT_SCALE
        weights = [w for w, _ in samples]
        maxes = [m for _, m in samples]
        assert weights[0] == full // SLOW_START_STEPS  # 5%: near 0, not 0
        assert maxes[0] == 5
        assert weights[-1] == full and maxes[-1] == 100
        steps = [b - a for a, b in itertools.pairwise(weights)]
        assert all(0 <= s <= full * 0.05 for s in steps)
        assert all(0 <= b - a <= 5 for a, b in itertools.pairwise(maxes))
        # Linear: halfway through it is at half weight.
        assert samples[40][0] == pytest.approx(full / 2, abs=full * 0.05)
        assert len(events(logs, "slow start finished")) == 1
        (up,) = events(logs, "server up")
        assert up["slow_start"] == 20
        monitor.stop()

    def test_going_down_mid_ramp_stops_it(self) -> None:
        """A server that fails during its ramp stops ramping and must rise again."""
        h, monitor, check = monitored(
            1, slow_start=20, rise=1, fall=1, interval=1, down_interval=1
        )
        monitor.start()
        check.mode["s0"] = "fail"
        tick(h.clock, 1)
        check.mode["s0"] = "ok"
        tick(h.clock, 1)
        tick(h.clock, 3)
        check.mode["s0"] = "fail"
        tick(h.clock, 1)
        server = h.pool.servers[0]
        assert not server.usable
        monitor.stop()
        assert h.clock.getDelayedCalls() == []


class TestStop:
    def test_stop_leaves_nothing_scheduled(self) -> None:
        """Stopping cancels probe timers, in-flight checks and slow-start timers."""
        h, monitor, check = monitored(
            3, slow_start=10, rise=1, fall=1, interval=1, timeout=5
        )
        monitor.start()
        check.mode["s0"] = "fail"
        tick(h.clock, 1)
        check.mode["s0"] = "ok"
        check.mode["s1"] = "hang"
        tick(h.clock, 1.5)  # s0 ramping, s1's check in flight
        assert "s1" in [n for _, n in check.calls]
        monitor.stop()
        assert check.cancelled == ["s1"]
        assert h.clock.getDelayedCalls() == []
        tick(h.clock, 100)
        assert h.clock.getDelayedCalls() == []


def test_health_config_is_frozen() -> None:
    """The monitor reads a frozen config; it never changes it."""
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        health().interval = 3  # type: ignore[misc]


class TestService:
    CONFIG = """
[frontend.f]
listen = "127.0.0.1:0"
pool = "p"
[pool.p]
[[pool.p.server]]
name = "a"
address = "127.0.0.1:7001"
[[pool.p.server]]
name = "b"
address = "127.0.0.1:7002"
[pool.p.health]
port = 8008
[pool.q]
[[pool.q.server]]
address = "127.0.0.1:7003"
"""

    def test_monitors_probe_the_check_port_and_stop_clean(self) -> None:
        """Pools with a health table get a monitor; probes use ``port``; stop
        leaves no timer and no connect attempt behind."""
        reactor = MemoryReactorClock()
        service = L4LBService(parse_config(self.CONFIG, "x.toml"), reactor)
        assert set(service.monitors) == {"p"}
        service.privilegedStartService()
        service.startService()
        tick(reactor, 2.5)
        probes = [(host, port) for host, port, *_ in reactor.tcpClients]
        assert sorted(probes) == [("127.0.0.1", 8008), ("127.0.0.1", 8008)]
        d = service.stopService()
        assert d.called
        assert reactor.getDelayedCalls() == []
        assert all(c.stoppedConnecting for c in reactor.connectors)
