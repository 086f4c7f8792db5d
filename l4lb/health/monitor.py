"""Active health checking of one pool: a probe loop per server on an injected clock.

Each server has a `HealthCounter` (HAProxy's rise/fall counter) and one timer.
A probe goes through the same server-connection seam as client traffic, is
cancelled after ``timeout``, and its result moves the counter; the next probe
is scheduled by the counter's state (``interval`` fully up, ``down_interval``
fully down, ``fast_interval`` in between) with ``jitter``. The first probes of
a pool's servers are spread over their first interval instead of firing
together.

What a state change does to the pool, in one place (`PoolMonitor._went_down`,
`_went_up`): ``usable`` flips, live sessions are closed for ``on_down =
"close"``, slow start ramps the effective weight and max_connections back in,
exactly one log line says what happened and why, and ``pool.changed()`` lets
waiting clients through.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import structlog
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from l4lb.health.checks import Check, CheckResult, make_check
from l4lb.health.counter import DOWN, UP, HealthCounter

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IDelayedCall,
        IReactorTime,
        IStreamClientEndpoint,
    )

    from l4lb.config import HealthConfig
    from l4lb.pool import Pool, ServerState

log = structlog.get_logger("l4lb.health")

# Slow start moves in steps of 1/SLOW_START_STEPS (5%). Effective weights of a
# pool with slow start are kept WEIGHT_SCALE times the configured ones (as
# HAProxy's BE_WEIGHT_SCALE does): policies only compare weights with each
# other, so the scale changes nothing but lets a weight-1 server ramp in 5%
# steps instead of jumping from 1 to 1.
SLOW_START_STEPS = 20
WEIGHT_SCALE = SLOW_START_STEPS


@attrs.define(eq=False)
class _Probe:
    """The health state of one server of the pool."""

    server: ServerState
    counter: HealthCounter
    timer: IDelayedCall | None = None
    in_flight: Deferred[CheckResult] | None = None
    failed_before: bool = False  # slow start only for a server seen failing
    ramp_step: int = 0  # 0: not ramping
    ramp_timer: IDelayedCall | None = None


class PoolMonitor:
    """Probes every server of ``pool`` and keeps its ``usable``/weights current.

    ``endpoint_for`` gives the endpoint a probe connects through (the service's
    seam, with the check ``port`` applied); ``check`` defaults to the one
    ``config.type`` names; ``rng`` draws jitter and stagger (tests seed it).
    """

    def __init__(
        self,
        pool: Pool,
        config: HealthConfig,
        clock: IReactorTime,
        endpoint_for: Callable[[ServerState], IStreamClientEndpoint],
        check: Check | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.config = config
        self.clock = clock
        self.endpoint_for = endpoint_for
        self.check = check if check is not None else make_check(config, clock)
        self.rng = rng if rng is not None else random.Random()
        self.running = False
        self.probes = {
            server: _Probe(
                server,
                HealthCounter.start(config.rise, config.fall, config.initial_state),
            )
            for server in pool.servers
        }
        for probe in self.probes.values():
            server = probe.server
            server.usable = probe.counter.up
            server.weight = self._full_weight(server)
        if config.observe:
            pool.on_connect_failed = self.observe

    # -- life cycle ------------------------------------------------------

    def start(self) -> None:
        """Schedule every server's first probe, spread over its first interval."""
        self.running = True
        count = len(self.probes)
        for index, probe in enumerate(self.probes.values()):
            base = self._interval(probe)
            delay = base * (index + self.rng.random()) / count
            probe.timer = self.clock.callLater(delay, self._probe, probe)
        self.pool.changed()

    def stop(self) -> None:
        """Cancel every timer and in-flight probe: nothing is left scheduled."""
        self.running = False
        for probe in self.probes.values():
            if probe.timer is not None and probe.timer.active():
                probe.timer.cancel()
            probe.timer = None
            self._stop_ramp(probe)
            if probe.in_flight is not None:
                in_flight, probe.in_flight = probe.in_flight, None
                in_flight.cancel()

    # -- probing ---------------------------------------------------------

    def _interval(self, probe: _Probe) -> float:
        state = probe.counter.state
        if state == UP:
            return self.config.interval
        if state == DOWN:
            return self.config.down_interval
        return self.config.fast_interval

    def _jittered(self, seconds: float) -> float:
        """``seconds`` moved at random by up to ``jitter`` of itself, either way."""
        spread = self.config.jitter * (2 * self.rng.random() - 1)
        return max(0.0, seconds * (1 + spread))

    def _schedule(self, probe: _Probe, delay: float) -> None:
        if probe.timer is not None and probe.timer.active():
            probe.timer.cancel()
        probe.timer = self.clock.callLater(delay, self._probe, probe)

    def _probe(self, probe: _Probe) -> None:
        probe.timer = None
        timeout = self.config.timeout
        d = self.check(self.endpoint_for(probe.server))
        probe.in_flight = d
        d.addTimeout(
            timeout,
            self.clock,
            onTimeoutCancel=lambda result, t: CheckResult(
                False, f"timed out after {t:g}s"
            ),
        )
        d.addErrback(self._check_broke, probe)
        d.addCallback(self._checked, probe)

    def _check_broke(self, failure: Failure, probe: _Probe) -> CheckResult:
        """Checks never errback for a bad server; one that does has a bug (or was
        cancelled by `stop`): count it as a failure, log it when unexpected."""
        if self.running and probe.in_flight is not None:
            log.error(
                "health check raised",
                pool=self.pool.name,
                server=probe.server.name,
                failure=failure.getTraceback(),
            )
        return CheckResult(False, f"check error: {failure.getErrorMessage()}")

    def _checked(self, result: CheckResult, probe: _Probe) -> None:
        if not self.running or probe.in_flight is None:
            return  # stopped meanwhile
        probe.in_flight = None
        self._record(probe, result.ok, result.reason)
        self._schedule(probe, self._jittered(self._interval(probe)))

    def observe(self, server: ServerState, why: str) -> None:
        """A client's connect to ``server`` failed: count it as a failed check.

        The next probe then comes after ``fast_interval`` at most, so a dead
        server leaves rotation after ``fall`` failed connects or quick probes.
        """
        probe = self.probes.get(server)
        if probe is None or not self.running:
            return
        self._record(probe, False, f"client connect failed: {why}")
        if probe.in_flight is None and probe.timer is not None:
            fast = self._jittered(self.config.fast_interval)
            if probe.timer.getTime() - self.clock.seconds() > fast:
                self._schedule(probe, fast)

    # -- state changes ---------------------------------------------------

    def _record(self, probe: _Probe, ok: bool, reason: str) -> None:
        if not ok:
            probe.failed_before = True
        if probe.counter.record(ok):
            if probe.counter.up:
                self._went_up(probe, reason)
            else:
                self._went_down(probe, reason)

    def _went_down(self, probe: _Probe, reason: str) -> None:
        server = probe.server
        server.usable = False
        self._stop_ramp(probe)
        server.weight = self._full_weight(server)
        server.max_connections = server.config.max_connections
        closing = list(server.sessions) if self.config.on_down == "close" else []
        log.warning(
            "server down",
            pool=self.pool.name,
            server=server.name,
            old_state=UP,
            new_state=DOWN,
            reason=reason,
            live_connections=len(server.sessions),
            on_down=self.config.on_down,
        )
        for session in closing:
            session.close("server down")
        if not self.pool.candidates() and any(s.weight > 0 for s in self.pool.servers):
            log.warning(
                "no server up",
                pool=self.pool.name,
                servers=len(self.pool.servers),
                queue_timeout=self.pool.config.queue_timeout,
            )
        self.pool.changed()

    def _went_up(self, probe: _Probe, reason: str) -> None:
        server = probe.server
        server.usable = True
        ramp = (
            self.config.slow_start > 0
            and probe.failed_before
            and server.config.weight > 0
        )
        log.info(
            "server up",
            pool=self.pool.name,
            server=server.name,
            old_state=DOWN,
            new_state=UP,
            reason=reason,
            slow_start=self.config.slow_start if ramp else 0,
        )
        if ramp:
            self._ramp(probe, 1)
        self.pool.changed()

    # -- slow start ------------------------------------------------------

    def _full_weight(self, server: ServerState) -> int:
        scale = WEIGHT_SCALE if self.config.slow_start > 0 else 1
        return server.config.weight * scale

    def _ramp(self, probe: _Probe, step: int) -> None:
        """Set the effective weight and max_connections to ``step`` twentieths."""
        server = probe.server
        probe.ramp_timer = None
        if step >= SLOW_START_STEPS:
            probe.ramp_step = 0
            server.weight = self._full_weight(server)
            server.max_connections = server.config.max_connections
            log.info(
                "slow start finished",
                pool=self.pool.name,
                server=server.name,
                weight=server.config.weight,
                max_connections=server.max_connections,
            )
            return
        probe.ramp_step = step
        server.weight = max(1, self._full_weight(server) * step // SLOW_START_STEPS)
        full_max = server.config.max_connections
        if full_max > 0:
            server.max_connections = max(
                1, math.ceil(full_max * step / SLOW_START_STEPS)
            )
        probe.ramp_timer = self.clock.callLater(
            self.config.slow_start / SLOW_START_STEPS, self._ramp_on, probe, step + 1
        )

    def _ramp_on(self, probe: _Probe, step: int) -> None:
        self._ramp(probe, step)
        self.pool.changed()

    def _stop_ramp(self, probe: _Probe) -> None:
        probe.ramp_step = 0
        if probe.ramp_timer is not None and probe.ramp_timer.active():
            probe.ramp_timer.cancel()
        probe.ramp_timer = None


class HealthService(Service):
    """Runs a `PoolMonitor` as a child of the l4lb service.

    The parent stops its children only after draining client sessions, so
    probes keep pools accurate during the drain and stop last.
    """

    def __init__(self, monitor: PoolMonitor) -> None:
        self.monitor = monitor

    def startService(self) -> None:
        super().startService()
        self.monitor.start()

    def stopService(self) -> Any:
        self.monitor.stop()
        return super().stopService()
