"""The l4lb service tree: pools and frontends built from a parsed config.

The parent orders a graceful stop itself, because `MultiService` stops its
children all at once: stop listening, let live sessions finish for up to
``shutdown_grace``, close what is left, then stop the children.
"""

from __future__ import annotations

import resource
import signal
import sys
from collections.abc import Callable
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

import attrs
import structlog
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    UNIXClientEndpoint,
)
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from l4lb.connector import DirectTCPEndpoint
from l4lb.frontend import ConnectionCap, Frontend, FrontendService, ListenError
from l4lb.health.monitor import HealthService, PoolMonitor
from l4lb.pool import Pool, ServerState
from l4lb.proxy import EndpointForServer
from l4lb.signals import on_second_stop_signal
from l4lb.splice import supported as splice_supported
from l4lb.tls.backend import BackendTLS
from l4lb.tls.passthrough import SniRouter
from l4lb.tls.termination import ServerTLS

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IStreamClientEndpoint,
        IStreamServerEndpoint,
    )

    from l4lb.config import Config, FrontendConfig, ServerAddress

log = structlog.get_logger("l4lb.service")


def client_endpoint(reactor: Any, address: ServerAddress) -> IStreamClientEndpoint:
    """The endpoint that reaches a server: the one seam all backend traffic uses.

    IP literals skip name resolution; DNS names resolve through the reactor's
    non-blocking resolver on every connect (so DNS changes are followed).
    Timeouts are applied by the caller on the connect Deferred.
    """
    if address.unix_path is not None:
        return UNIXClientEndpoint(reactor, address.unix_path, timeout=3600)
    assert address.host is not None and address.port is not None
    try:
        ip_address(address.host)
    except ValueError:
        return HostnameEndpoint(reactor, address.host, address.port, timeout=3600)
    # No connector timer per connection: the session's one timer enforces
    # connect_timeout.
    # No wrapper protocol left between transport and protocol (l4lb.connector).
    return DirectTCPEndpoint(reactor, address.host, address.port)


# Descriptors besides two per proxied connection: listeners, probes, logs, Twisted's own.
_FD_SPARE = 64


def fit_fd_limit(
    max_connections: int,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> int:
    """Raise the soft descriptor limit to what ``max_connections`` needs (as HAProxy does).

    Each proxied connection holds two descriptors. Past the limit, Twisted
    accepts and drops clients at once (EMFILE) instead of leaving them in the
    backlog, so an unreachable ``max_connections`` is worth a warning at start.
    Returns the soft limit in force.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if max_connections <= 0:
        return soft
    needed = 2 * max_connections + _FD_SPARE
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "file descriptor limit below what max_connections needs",
            max_connections=max_connections,
            needed=needed,
            limit=soft,
            effect="beyond the limit new clients are accepted and closed at once",
            fix="raise the limit (systemd LimitNOFILE=, ulimit -n) or lower max_connections",
        )
    return soft


class L4LBService(MultiService):
    """Everything one config describes, addressable by frontend, pool and server name."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        endpoint_for: EndpointForServer | None = None,
        log_observer: Any = None,
        server_endpoint: Callable[[FrontendConfig], IStreamServerEndpoint]
        | None = None,
        probes: bool = True,
    ) -> None:
        """``server_endpoint`` and ``probes=False`` are for worker processes
        (`l4lb.worker`): they listen on shared sockets and follow the
        supervisor's health view instead of probing."""
        super().__init__()
        self.config = config
        self.reactor = reactor
        self._log_observer = log_observer
        self.pools: dict[str, Pool] = {p.name: Pool(p, reactor) for p in config.pools}
        if endpoint_for is None:
            endpoints: dict[ServerState, IStreamClientEndpoint] = {}
            # [pool.X.tls]: each server of the pool is reached through TLS.
            backend_tls: dict[ServerState, BackendTLS] = {}
            for pool_config in config.pools:
                if pool_config.tls is not None:
                    pool_tls = BackendTLS(pool_config, reactor)
                    backend_tls.update(
                        dict.fromkeys(self.pools[pool_config.name].servers, pool_tls)
                    )

            def endpoint_for(server: ServerState) -> IStreamClientEndpoint:
                if server not in endpoints:
                    endpoint = client_endpoint(reactor, server.config.address)
                    if server in backend_tls:
                        endpoint = backend_tls[server].wrap(server, endpoint)
                    endpoints[server] = endpoint
                return endpoints[server]

        self.endpoint_for = endpoint_for
        self.cap = ConnectionCap(config.global_.max_connections)
        self.frontends: dict[str, Frontend] = {}
        for fe in config.frontends:
            server_tls = None
            if fe.tls is not None:  # files were checked by tap; CertificateError if bad
                server_tls = ServerTLS(fe.tls, f"frontend.{fe.name}.tls")
            default = self.pools[fe.pool] if fe.pool is not None else None
            frontend = Frontend(
                fe, default, reactor, endpoint_for, self.cap, tls=server_tls
            )
            if fe.route_by_sni:
                frontend.router = SniRouter(fe, self.pools, default, reactor)
            frontend.splice = config.global_.splice
            self.frontends[fe.name] = frontend
            FrontendService(frontend, reactor, server_endpoint).setServiceParent(self)
        # Health probes: children added after the frontends, stopped after the drain.
        self.monitors: dict[str, PoolMonitor] = {}
        for name, pool in self.pools.items():
            health = pool.config.health
            if health is not None and probes:
                check_endpoint = self.check_endpoint_for(health.port)
                monitor = PoolMonitor(pool, health, reactor, check_endpoint)
                self.monitors[name] = monitor
                HealthService(monitor).setServiceParent(self)
        self._stopping = False
        self._closed_now = 0  # sessions closed by a second stop signal

    def check_endpoint_for(self, port: int | None) -> EndpointForServer:
        """The seam health probes use: the client one, or the same host on ``port``."""
        if port is None:
            return self.endpoint_for
        endpoints: dict[ServerState, IStreamClientEndpoint] = {}

        def endpoint_for(server: ServerState) -> IStreamClientEndpoint:
            if server not in endpoints:
                address = attrs.evolve(server.config.address, port=port)
                endpoints[server] = client_endpoint(self.reactor, address)
            return endpoints[server]

        return endpoint_for

    def setServiceParent(self, parent: Any) -> None:
        # twistd hands us its Application: an ILogObserver component on it
        # makes twistd send Twisted's own log events through our structlog
        # output instead of its own text format (twisted.application.app.AppLogger).
        if self._log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        """Listen on every frontend; one that cannot listen stops start-up (exit 1)."""
        try:
            super().privilegedStartService()
        except ListenError as e:
            log.critical("cannot start", error=str(e))
            # twistd has pointed sys.stderr at the log by now; the operator
            # running the command should see the reason on the terminal too.
            print(f"l4lb: {e}", file=sys.__stderr__)
            raise SystemExit(1) from None

    def startService(self) -> None:
        fit_fd_limit(self.config.global_.max_connections)
        super().startService()
        log.info(
            "started",
            frontends=len(self.frontends),
            pools={name: len(pool.servers) for name, pool in self.pools.items()},
            max_connections=self.cap.limit,
            # Whether plain TCP sessions are spliced in the kernel (l4lb.splice).
            splice=self.config.global_.splice and splice_supported(),
        )

    def install_second_signal(self) -> None:
        """A second SIGTERM/SIGINT during the grace period closes what is left at once.

        Call before the reactor runs: Twisted installs its own handlers during
        start-up, so ours wrap them after start-up. The first signal still goes
        to Twisted (which stops the reactor and so starts our graceful stop);
        the handler only schedules, it does nothing in signal context.
        """

        on_second_stop_signal(self.reactor, lambda: self._stopping, self._close_now)

    def install_reload_signal(self) -> None:
        """SIGHUP re-reads the TLS certificate files (`reload_tls`).

        The handler only schedules the reload on the reactor thread. Twisted
        leaves SIGHUP alone, whose default action would end the process.
        """

        def handler(number: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload_tls)

        signal.signal(signal.SIGHUP, handler)

    def reload_tls(self) -> dict[str, bool]:
        """Every TLS frontend re-reads its certificate and key files.

        New handshakes use the new certificates; live connections keep theirs;
        a frontend whose new files are bad keeps its old ones (and logs why).
        Returns, per frontend name, whether its reload succeeded. Meant for
        SIGHUP and for an admin API.
        """
        log.info("reloading tls certificates")
        return {
            name: frontend.tls.reload()
            for name, frontend in self.frontends.items()
            if frontend.tls is not None
        }

    def _close_now(self, signum: int) -> None:
        sessions = self.live_sessions()
        log.warning(
            "second stop signal: closing connections now",
            signal=signal.Signals(signum).name,
            live_connections=len(sessions),
        )
        self._closed_now += len(sessions)
        for session in sessions:
            session.close("shutdown", abort=True)

    def stopService(self) -> Deferred[None]:
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Stop listening, drain for up to ``shutdown_grace``, close the rest."""
        grace = self.config.global_.shutdown_grace
        services = [s for s in self if isinstance(s, FrontendService)]
        await DeferredList([_as_deferred(s.stop_listening()) for s in services])
        sessions = self.live_sessions()
        log.info("stopping", live_connections=len(sessions), shutdown_grace=grace)
        drained = await self._drain(grace)
        leftover = self.live_sessions()
        for session in leftover:
            session.close("shutdown", abort=True)
        if leftover:
            await self._drain(None)
        closed = len(leftover) + self._closed_now
        log.info(
            "stopped",
            finished_in_grace=len(sessions) - closed,
            closed_at_shutdown=closed,
            drained=drained and not self._closed_now,
        )
        await super().stopService()

    def live_sessions(self) -> list[Any]:
        return [s for fe in self.frontends.values() for s in fe.sessions]

    def _drain(self, grace: float | None) -> Deferred[bool]:
        """Fires True once no session is left, or False when ``grace`` passes."""
        idle = self.cap.when_idle()
        if grace is not None:
            idle.addTimeout(grace, self.reactor)

        def timed_out(failure: Failure) -> bool:
            failure.trap(TimeoutError)
            return False

        idle.addCallbacks(lambda _: True, timed_out)
        return idle


def _as_deferred(result: object) -> Deferred[Any]:
    return result if isinstance(result, Deferred) else succeed(result)
