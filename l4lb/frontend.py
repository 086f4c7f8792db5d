"""A frontend at run time: its listening port, its sessions, and its connection caps.

At a cap (the frontend's ``max_connections`` or the process-wide one) the
listening socket stops being read, so new clients wait in the kernel's accept
backlog instead of being accepted and dropped; reading resumes when a slot frees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ServerFactory

from l4lb import accept
from l4lb.proxy import (
    ClientProtocol,
    EndpointForServer,
    Session,
    format_address,
    tune_listener,
)
from l4lb.tls.pgstarttls import PostgresNegotiation
from l4lb.tls.termination import ServerTLS, TLSClientProtocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IAddress,
        IListeningPort,
        IProtocolFactory,
        IReactorTime,
        IStreamServerEndpoint,
    )

    from l4lb.config import FrontendConfig
    from l4lb.pool import Pool
    from l4lb.tls.passthrough import SniRouter

log = structlog.get_logger("l4lb.frontend")

_UNLIMITED = 2**62  # "room" when a cap is 0, i.e. off
PAUSE_REPORT_INTERVAL = 10.0  # seconds between "accepting paused" warnings


class ConnectionCap:
    """The process-wide client connection cap, shared by every frontend."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.live = 0
        self.frontends: list[Frontend] = []
        self._idle_waiters: list[Deferred[None]] = []

    @property
    def room(self) -> int:
        return self.limit - self.live if self.limit > 0 else _UNLIMITED

    def changed(self) -> None:
        for frontend in self.frontends:
            frontend.gate()
        if self.live == 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no client connection is left (for a graceful stop)."""
        if self.live == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._idle_waiters.remove)
        self._idle_waiters.append(waiter)
        return waiter


class Frontend(ServerFactory):
    """Builds a `ClientProtocol` per accepted client and keeps count of them.

    It is the protocol factory handed to the listening endpoint, and the object
    sessions report to; sessions are kept so shutdown can drain and close them.
    """

    noisy = False  # "listening" is logged once, in our own format
    # TLS termination: the server TLS connection creator (startTLS argument).
    tls: object | None = None
    splice = False  # [global] splice: set by the service (l4lb.splice)
    listener_tuned = False  # accepted sockets inherit _tune's options

    def __init__(
        self,
        config: FrontendConfig,
        pool: Pool | None,
        clock: IReactorTime,
        endpoint_for: EndpointForServer,
        cap: ConnectionCap,
        tls: ServerTLS | None = None,
    ) -> None:
        self.config = config
        self.tls = tls  # set: TLS termination (l4lb.tls.termination)
        self.name = config.name
        self.pool = pool  # None: only SNI routes, unmatched clients are refused
        self.router: SniRouter | None = None  # route_by_sni picks a pool per client
        self.clock = clock
        self.endpoint_for = endpoint_for
        self.cap = cap
        cap.frontends.append(self)
        self.sessions: set[Session] = set()
        self.accepted = 0
        self.port: IListeningPort | None = None
        self.accepting = False  # wanted: between listen and stop_listening
        self._reading = False  # actual state of the listening socket
        self._pauses = 0  # pauses at a cap since the last report
        self._pause_reported_at: float | None = None

    def buildProtocol(self, addr: IAddress) -> ClientProtocol:
        tls = self.config.tls
        if tls is not None and tls.starttls == "postgres":
            negotiation = PostgresNegotiation(self, self.tls, tls)
            negotiation.factory = self
            return negotiation  # type: ignore[return-value]
        protocol = (TLSClientProtocol if self.terminates_tls else ClientProtocol)(self)
        protocol.factory = self
        return protocol

    @property
    def terminates_tls(self) -> bool:
        """TLS from the first byte (not negotiated inside another protocol)."""
        return self.tls is not None and self.tls.config.starttls is None

    def listening_factory(self) -> IProtocolFactory:
        """The factory the listening port uses: this one, behind TLS if terminating."""
        if self.terminates_tls:
            return self.tls.wrap(self)  # type: ignore[union-attr]
        return self

    # Sessions report here.

    def session_started(self, session: Session) -> None:
        self.sessions.add(session)
        self.accepted += 1
        self.cap.live += 1
        if self.room() <= 0:
            self.cap.changed()

    def session_handing_over(self, session: Session) -> None:
        """A client that negotiated (STARTTLS) becomes a `Session`, keeping its slot.

        The session registers itself at once; freeing the slot in between
        would resume accepting for nothing.
        """
        self.sessions.discard(session)
        self.accepted -= 1
        self.cap.live -= 1

    def session_finished(self, session: Session) -> None:
        self.sessions.discard(session)
        self.cap.live -= 1
        self.cap.changed()

    # Accepting, paused at a cap.

    def room(self) -> int:
        """How many more clients may be accepted now (a cap of 0 means none)."""
        limit = self.config.max_connections
        own = limit - len(self.sessions) if limit > 0 else _UNLIMITED
        return min(own, self.cap.room)

    def listening(self, port: IListeningPort) -> None:
        self.port = port
        self.accepting = True
        self._reading = True
        self.listener_tuned = tune_listener(port)
        accept.lean(port)  # before the clamp wraps its doRead
        _clamp_accept_batches(port, self.room)
        self.gate()

    def gate(self) -> None:
        """Read the listening socket exactly when a new client may be accepted."""
        port = self.port
        if port is None:
            return
        want = self.accepting and self.room() > 0
        if want and not self._reading:
            self._reading = True
            port.startReading()  # type: ignore[attr-defined]
            log.debug("accepting resumed", frontend=self.name, live=len(self.sessions))
        elif not want and self._reading:
            self._reading = False
            port.stopReading()  # type: ignore[attr-defined]
            if self.accepting:
                self._report_pause()

    def _report_pause(self) -> None:
        """A warning at the first pause, then at most one per interval, with a count.

        At a sustained cap the listener pauses and resumes around every
        connection; one line each time would flood the log.
        """
        self._pauses += 1
        now = self.clock.seconds()
        if self._pause_reported_at is not None and (
            now - self._pause_reported_at < PAUSE_REPORT_INTERVAL
        ):
            return
        log.warning(
            "connection limit reached, accepting paused",
            frontend=self.name,
            live=len(self.sessions),
            frontend_limit=self.config.max_connections,
            process_live=self.cap.live,
            process_limit=self.cap.limit,
            pauses=self._pauses,
        )
        self._pause_reported_at = now
        self._pauses = 0


def _clamp_accept_batches(port: IListeningPort, room: Callable[[], int]) -> None:
    """Never accept more clients in one reactor turn than there is room for.

    Twisted's TCP port accepts up to ``numberAccepts`` clients per readable
    event (growing under load), so pausing at a cap from inside the batch
    would let the rest of the batch through. Clamping the batch size before
    each accept round keeps the caps exact.
    """
    if not hasattr(port, "numberAccepts"):
        return
    accept_batch = port.doRead  # type: ignore[attr-defined]

    def doRead() -> object:
        port.numberAccepts = max(1, min(port.numberAccepts, room()))  # type: ignore[attr-defined]
        return accept_batch()

    port.doRead = doRead  # type: ignore[attr-defined]


class ListenError(Exception):
    """A frontend could not listen; the message names the frontend and address."""


class FrontendService(Service):
    """Listens for one frontend; the parent orders stop (listen → drain → close)."""

    def __init__(
        self,
        frontend: Frontend,
        reactor: object,
        server_endpoint: Callable[[FrontendConfig], IStreamServerEndpoint]
        | None = None,
    ) -> None:
        self.frontend = frontend
        self.reactor = reactor
        # None: the endpoint string; worker processes share SO_REUSEPORT sockets.
        self.server_endpoint = server_endpoint
        self.setName(f"frontend.{frontend.name}")

    def privilegedStartService(self) -> None:
        """Listen before privileges drop and before the reactor runs, so a bad
        address stops start-up with a clear error instead of a half-started
        process."""
        super().privilegedStartService()
        config = self.frontend.config
        if self.server_endpoint is not None:
            endpoint = self.server_endpoint(config)
        else:
            endpoint = serverFromString(self.reactor, config.endpoint)
        listening = endpoint.listen(self.frontend.listening_factory())
        failures: list[BaseException] = []
        listening.addCallbacks(
            self.frontend.listening, lambda f: failures.append(f.value)
        )
        if failures:
            raise ListenError(
                f"frontend.{config.name}: cannot listen on {config.listen}: {failures[0]}"
            )
        if self.frontend.port is None:
            raise ListenError(
                f"frontend.{config.name}: listening on {config.listen} did not finish at start"
            )
        address = self.frontend.port.getHost()
        log.info(
            "listening",
            frontend=config.name,
            listen=config.listen,
            address=format_address(address),
            pool=self.frontend.pool.name if self.frontend.pool else None,
        )

    def startService(self) -> None:
        if self.frontend.port is None:
            self.privilegedStartService()
        super().startService()

    def stop_listening(self) -> object:
        """Stop accepting at once; live sessions are the parent's business."""
        frontend = self.frontend
        frontend.accepting = False
        port, frontend.port = frontend.port, None
        if port is None:
            return None
        return port.stopListening()
