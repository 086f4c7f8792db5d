"""The supervisor of ``[global] workers = N``: N worker processes and one health view.

With more than one worker the twistd process serves no clients itself. It

- binds (without listening) each frontend's address with ``SO_REUSEPORT``, so
  a bad address fails start-up once and port 0 becomes one shared port
  (`l4lb.reuseport`);
- runs the pools' health probes exactly as a single process would (an
  `L4LBService` without frontends) and writes every change of a server's
  state to each worker's stdin, with a full snapshot first when a worker
  (re)starts (`l4lb.workerlink`); failed client connects the workers observe
  come back on their descriptor 3 and count here;
- starts the workers (``python -m l4lb.worker``), restarts one that dies (at
  once after a stable run, then with a doubling delay while it keeps dying:
  `Backoff`), and passes SIGHUP and stop signals on. On stop it sends SIGTERM
  to every worker, each drains for ``shutdown_grace``, and it exits when all
  have exited (SIGKILL for any still running well after the grace).

In the foreground the workers write their log lines straight to the
supervisor's stdout and stderr (inherited descriptors, whole lines); as a
daemon their output is passed to twistd's log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import structlog
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver
from twisted.logger import Logger as TwistedLogger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from l4lb.reuseport import bind_address, reuseport_socket
from l4lb.service import L4LBService
from l4lb.signals import on_second_stop_signal
from l4lb.workerlink import LineBuffer, StateTracker, parse_line

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IProcessTransport

    from l4lb.config import Config
    from l4lb.pool import Pool

log = structlog.get_logger("l4lb.supervisor")
_daemon_log = TwistedLogger(namespace="l4lb")  # module level: Logger is a descriptor

EVENTS_FD = 3  # the worker's side; see l4lb.worker
KILL_AFTER = 10.0  # seconds past shutdown_grace before a stuck worker is killed


@attrs.define
class Backoff:
    """How long to wait before restarting a worker that exited.

    A worker that ran at least ``stable`` seconds is restarted at once (a
    crash after a long run is not a loop). One that keeps dying sooner waits
    ``first``, then twice as long each time, up to ``cap``: a worker that
    cannot start (a bad certificate file, a port taken) costs a log line every
    ``cap`` seconds instead of a spinning CPU.
    """

    first: float = 0.5
    cap: float = 30.0
    stable: float = 10.0
    failures: int = 0

    def delay(self, uptime: float) -> float:
        if uptime >= self.stable:
            self.failures = 0
        self.failures += 1
        if self.failures == 1:
            return 0.0
        return min(self.cap, self.first * 2 ** (self.failures - 2))


def exit_status(reason: Failure) -> dict[str, Any]:
    """The exit code or signal of a process from its ``processEnded`` reason."""
    value = reason.value
    code = getattr(value, "exitCode", None)
    signum = getattr(value, "signal", None)
    if signum is not None:
        return {"exit_code": None, "signal": signal.Signals(signum).name}
    return {"exit_code": code, "signal": None}


@attrs.define(eq=False)
class Worker:
    """One worker slot: its current process (if any) and its restart history."""

    index: int
    backoff: Backoff = attrs.Factory(Backoff)
    process: IProcessTransport | None = None
    pid: int | None = None  # of the current or last process
    started_at: float = 0.0
    restart: IDelayedCall | None = None
    restarts: int = 0


class WorkerProtocol(ProcessProtocol):
    """The supervisor's end of one worker process's pipes."""

    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker
        self.buffers: dict[int, LineBuffer] = {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self.buffers.setdefault(childFD, LineBuffer())
        for line in buffer.feed(data):
            if childFD == EVENTS_FD:
                self.supervisor.worker_event(self.worker, line)
            else:
                self.supervisor.relay(line)

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_exited(self.worker, reason)


# spawnProcess(protocol, executable, args, env=..., childFDs=...) -> transport
Spawn = Callable[..., "IProcessTransport"]


class Supervisor(MultiService):
    """Runs the health probes and ``config.global_.workers`` worker processes."""

    def __init__(
        self,
        config: Config,
        config_path: str,
        reactor: Any,
        spawn: Spawn | None = None,
        foreground: bool = True,
        log_observer: Any = None,
        reserve: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.spawn = spawn  # None: reactor.spawnProcess
        self.foreground = foreground
        self._log_observer = log_observer
        self._reserve = reserve  # tests of the process logic bind nothing
        # The health view: pools and probes as in one process, no frontends.
        # It holds no client connection: no descriptor limit to raise for them.
        health_only = attrs.evolve(
            config,
            frontends=(),
            global_=attrs.evolve(config.global_, max_connections=0),
        )
        self.health = L4LBService(health_only, reactor)
        self.health.setServiceParent(self)
        self.pools: dict[str, Pool] = self.health.pools
        self.tracker = StateTracker(self.pools)
        for pool in self.pools.values():
            pool.on_changed = self._pool_changed
        self.workers = [Worker(i) for i in range(config.global_.workers)]
        self.ports: dict[str, int] = {}
        self._reserved: list[socket.socket] = []
        self._stopping = False
        self._exited: Deferred[None] | None = None
        self._kill_timer: IDelayedCall | None = None

    def setServiceParent(self, parent: Any) -> None:
        # As L4LBService does: Twisted's own events go through our log output.
        if self._log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)

    # -- start -----------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every frontend's address once; one that cannot bind stops start-up."""
        if self._reserve:
            for frontend in self.config.frontends:
                address = bind_address(frontend)
                try:
                    sock = reuseport_socket(address)
                except OSError as e:
                    message = (
                        f"frontend.{frontend.name}: cannot listen on"
                        f" {frontend.listen}: {e.strerror or e}"
                    )
                    log.critical("cannot start", error=message)
                    print(f"l4lb: {message}", file=sys.__stderr__)
                    raise SystemExit(1) from None
                self._reserved.append(sock)
                self.ports[frontend.name] = sock.getsockname()[1]
        super().privilegedStartService()

    def startService(self) -> None:
        if self._reserve and not self._reserved:
            self.privilegedStartService()
        super().startService()  # probes start first: workers begin with their view
        log.info(
            "supervisor started",
            workers=len(self.workers),
            frontends=self.ports,
            pid=os.getpid(),
        )
        for worker in self.workers:
            self._spawn(worker)

    def worker_args(self, worker: Worker) -> list[str]:
        args = [sys.executable, "-m", "l4lb.worker"]
        args += ["--config", self.config_path, "--index", str(worker.index)]
        for name, port in self.ports.items():
            args += ["--port", f"{name}={port}"]
        return args

    def _spawn(self, worker: Worker) -> None:
        worker.restart = None
        output: Any = (1, 2) if self.foreground else ("r", "r")
        spawn = self.spawn if self.spawn is not None else self.reactor.spawnProcess
        process = spawn(
            WorkerProtocol(self, worker),
            sys.executable,
            self.worker_args(worker),
            env=dict(os.environ),
            childFDs={0: "w", 1: output[0], 2: output[1], EVENTS_FD: "r"},
        )
        worker.process = process
        worker.pid = process.pid
        worker.started_at = self.reactor.seconds()
        process.writeToChild(0, self.tracker.snapshot())
        log.info("worker started", index=worker.index, pid=process.pid)

    # -- messages --------------------------------------------------------

    def _pool_changed(self, pool: Pool) -> None:
        """A health change in ``pool``: every running worker gets the new states."""
        line = self.tracker.changes(pool)
        if line is None:
            return
        for worker in self.workers:
            if worker.process is not None:
                worker.process.writeToChild(0, line)

    def worker_event(self, worker: Worker, line: bytes) -> None:
        message = parse_line(line)
        failed = message.get("connect_failed") if message is not None else None
        if not isinstance(failed, list) or len(failed) != 3:
            log.error(
                "bad line from worker",
                index=worker.index,
                line=line[:200].decode("utf-8", "replace"),
            )
            return
        pool_name, server_name, why = failed
        pool = self.pools.get(pool_name)
        if pool is None:
            return
        with contextlib.suppress(KeyError):
            pool.connect_failed(pool.server(server_name), why)

    def relay(self, line: bytes) -> None:
        """A worker's output line, when its output is not inherited (daemon mode)."""
        _daemon_log.info("{line}", line=line.decode("utf-8", "replace"))

    # -- exits and restarts ----------------------------------------------

    def worker_exited(self, worker: Worker, reason: Failure) -> None:
        worker.process = None
        pid = worker.pid
        status = exit_status(reason)
        uptime = self.reactor.seconds() - worker.started_at
        if self._stopping:
            log.info("worker exited", index=worker.index, pid=pid, **status)
            if self._exited is not None and not self.running_workers():
                exited, self._exited = self._exited, None
                exited.callback(None)
            return
        log.warning(
            "worker exited",
            index=worker.index,
            pid=pid,
            uptime=round(uptime, 3),
            **status,
        )
        delay = worker.backoff.delay(uptime)
        worker.restarts += 1
        log.warning(
            "restarting",
            index=worker.index,
            delay=delay,
            failures_in_a_row=worker.backoff.failures,
        )
        worker.restart = self.reactor.callLater(delay, self._spawn, worker)

    def running_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.process is not None]

    # -- signals and stop ------------------------------------------------

    def forward(self, signame: str) -> None:
        """Send SIG``signame`` to every running worker."""
        for worker in self.running_workers():
            with contextlib.suppress(ProcessExitedAlready, OSError):
                worker.process.signalProcess(signame)  # type: ignore[union-attr]

    def install_signals(self) -> None:
        """SIGHUP goes to the workers; a second SIGTERM/SIGINT during the stop too.

        As in `L4LBService`, handlers only schedule; Twisted's own handlers
        (installed during start-up) still take the first stop signal.
        """

        def hup(number: int, frame: Any) -> None:
            self.reactor.callFromThread(self._pass_on, "HUP")

        signal.signal(signal.SIGHUP, hup)

        def again(number: int) -> None:
            self._pass_on(signal.Signals(number).name.removeprefix("SIG"))

        on_second_stop_signal(self.reactor, lambda: self._stopping, again)

    def _pass_on(self, signame: str) -> None:
        log.info(
            "passing signal to workers",
            signal=f"SIG{signame}",
            workers=len(self.running_workers()),
        )
        self.forward(signame)

    def stopService(self) -> Deferred[None]:
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Workers drain and exit first; then probes stop and the ports are let go."""
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            worker.restart = None
        running = self.running_workers()
        log.info("stopping workers", workers=len(running))
        if running:
            self._exited = Deferred()
            self.forward("TERM")
            self._kill_timer = self.reactor.callLater(
                self.config.global_.shutdown_grace + KILL_AFTER, self._kill_stuck
            )
            await self._exited
            if self._kill_timer is not None and self._kill_timer.active():
                self._kill_timer.cancel()
            self._kill_timer = None
        await _as_deferred(super().stopService())
        for sock in self._reserved:
            sock.close()
        self._reserved = []
        log.info("supervisor stopped")

    def _kill_stuck(self) -> None:
        self._kill_timer = None
        stuck = self.running_workers()
        log.error(
            "workers still running after the grace period: killing",
            workers=[w.index for w in stuck],
        )
        self.forward("KILL")


def _as_deferred(result: object) -> Deferred[Any]:
    return result if isinstance(result, Deferred) else succeed(result)
