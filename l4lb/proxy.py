"""The data path: accept → pick a server → connect (with retries) → splice → close.

Read this module top to bottom to follow one client connection:

1. `ClientProtocol.connectionMade` starts a `Session`. Nothing is read from the
   client (so nothing is buffered) until a backend is connected: a
   `DepartureWatch` takes the client socket's readiness calls and only peeks,
   to notice the waiting client leaving (transports it cannot watch are
   paused instead). TLS clients start once their handshake is done
   (`l4lb.tls.termination`, `l4lb.tls.pgstarttls`).
2. `Session.connect` (on a ``route_by_sni`` frontend, once
   `l4lb.tls.passthrough` has read the ClientHello and picked the pool) asks
   the pool for a server (possibly after queueing) and
   opens a connection through the pool's endpoint seam, retrying a failed
   connect on servers not yet tried. The client sees nothing of a retry: no
   client byte has been read yet.
3. `Session.splice` makes each transport the other's streaming producer, so a
   slow reader on either side stops reading on the other (bounded memory), and
   resumes the client.
4. Half-close: a FIN from one side becomes a FIN to the other
   (`loseWriteConnection`); data keeps flowing the other way. When both
   directions are done, both sides are closed.
5. Once both transports are gone (`Session._maybe_finish`) the session logs its
   one "connection closed" line and reports to the frontend; the server slot was
   released when the backend connection ended.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from twisted.internet import defer, error, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    ILoggingContext,
    IProtocol,
    IReactorFDSet,
    ITCPTransport,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from l4lb import accept, closing, logs
from l4lb.hook import hook, original_do_write, unhook
from l4lb.pool import NoServerError, Pool, ServerState
from l4lb.splice import Splicer
from l4lb.timers import Entry, queue_for

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IAddress,
        IReactorTime,
        IStreamClientEndpoint,
        ITransport,
    )

    from l4lb.frontend import Frontend

log = structlog.get_logger("l4lb.proxy")

# The one seam all backend connections go through: tests replace it, and
# health checks and backend TLS will use it too.
EndpointForServer = Callable[[ServerState], "IStreamClientEndpoint"]

# How late the session's timer may fire past a deadline rather than be replaced.
_TIMER_SLACK = 0.01

# Accepted plain TCP transports `DepartureWatch.bytes_waiting` may peek at.
_PEEKABLE = frozenset({accept.Server, tcp.Server})

# Failures of a connect attempt that are worth another server.
_CONNECT_FAILURES = (
    error.ConnectError,
    error.ConnectionLost,
    defer.TimeoutError,
    OSError,
)


def _tune(transport: ITransport) -> None:
    """No Nagle delay for request/response protocols; keepalive to find dead peers."""
    if ITCPTransport.providedBy(transport):
        try:
            transport.setTcpNoDelay(True)
            transport.setTcpKeepAlive(True)
        except OSError:
            pass  # the peer may already have gone; the read/write path will notice


def tune_listener(port: object) -> bool:
    """Set `_tune`'s options on a listening TCP socket; True if they took.

    Linux copies TCP_NODELAY and SO_KEEPALIVE from the listening socket to each
    accepted one, which saves two system calls per client connection.
    """
    sock = getattr(port, "socket", None)
    if not sys.platform.startswith("linux") or not isinstance(sock, socket.socket):
        return False
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        return False
    return True


class _SlottedProtocol:
    """What ``twisted.internet.protocol.Protocol`` gives, without an instance dict.

    Two protocols are held per proxied connection; a ``Protocol`` subclass
    keeps a dict for ``transport``, ``connected`` and its own attributes
    (about 40 bytes more each than these slots).
    """

    __slots__ = ("connected", "transport")

    def makeConnection(self, transport: ITransport) -> None:
        self.connected = 1
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        """Called once the transport is set."""

    def logPrefix(self) -> str:
        return self.__class__.__name__


@implementer(IProtocol, ILoggingContext, IHalfCloseableProtocol)
class ClientProtocol(_SlottedProtocol):
    """The accepted client side of a session."""

    __slots__ = ("_can_half_close", "early", "factory", "frontend", "session")

    session: Session

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.connected = 0
        self.factory: Any = None
        # Client bytes read before a server was connected (decrypted with the
        # last handshake flight, or during a STARTTLS negotiation): the splice
        # passes them on before anything else.
        self.early = b""
        self._can_half_close = True

    @property
    def can_half_close(self) -> bool:
        """False for TLS clients: no half-close, a server FIN closes with close_notify."""
        return self._can_half_close

    @can_half_close.setter
    def can_half_close(self, value: bool) -> None:
        self._can_half_close = value

    def connectionMade(self) -> None:
        if not self.frontend.listener_tuned:  # else inherited from the listener
            _tune(self.transport)
        self.session = Session(self.frontend, self)
        self.session.start()

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        session.bytes_from_client += len(data)
        session.last_activity = session.clock.seconds()
        if session.read_early is not None:  # e.g. SNI routing reads the ClientHello
            session.read_early(data)
            return
        session.server.transport.write(data)

    def readConnectionLost(self) -> None:
        self.session.client_eof()

    def writeConnectionLost(self) -> None:
        """We sent our FIN to the client; nothing to do until it sends its own."""

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.session.client_lost(reason)


@implementer(IProtocol, ILoggingContext, IHalfCloseableProtocol)
class ServerProtocol(_SlottedProtocol):
    """The backend side of a session, connected through the pool's endpoint seam."""

    __slots__ = ("session",)

    def __init__(self) -> None:
        self.connected = 0
        self.session: Session | None = None

    def connectionMade(self) -> None:
        transport = self.transport
        _tune(transport)
        # Twisted builds the same "ServerProtocol,client" log prefix for every
        # backend connection; one shared copy saves about 70 bytes each.
        logstr = getattr(transport, "logstr", None)
        if type(logstr) is str:
            transport.logstr = sys.intern(logstr)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        session.bytes_from_server += len(data)  # type: ignore[union-attr]
        session.last_activity = session.clock.seconds()  # type: ignore[union-attr]
        session.client.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        if self.session is not None:
            self.session.server_eof()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """We sent our FIN to the server; nothing to do until it sends its own."""

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.session is not None:
            self.session.server_lost(reason)


class _ServerFactory(Factory):
    """Builds the one `ServerProtocol` of a connect attempt."""

    noisy = False  # no "Starting factory" line per connection

    def __init__(self, protocol: ServerProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress) -> ServerProtocol:
        return self._protocol


class Session:
    """One client connection, its backend connection, and its one log line.

    A session owns at most one timer (``_timer``, an entry in the clock's
    `l4lb.timers.TimerQueue`, not a DelayedCall of its own) for its whole life: the
    connect deadline, then the idle / half-closed check, then the lingering
    close. Each firing looks at the session's state, acts if a deadline has
    passed, and otherwise re-arms for the next one; a deadline pushed back by
    traffic or a phase change costs no new timer.
    """

    __slots__ = (
        "_attempt",
        "_attempt_deadline",
        "_attempt_timed_out",
        "_client_eof",
        "_client_gone",
        "_client_paces_server",
        "_closing_at",
        "_connecting",
        "_finished",
        "_log_fields",
        "_server_eof",
        "_server_gone",
        "_server_paces_client",
        "_timer",
        "_watch",
        "bytes_from_client",
        "bytes_from_server",
        "client",
        "clock",
        "connect_time",
        "detail",
        "first_bytes",
        "frontend",
        "last_activity",
        "pool",
        "read_early",
        "reason",
        "retries",
        "server",
        "server_state",
        "splicer",
        "started",
    )

    def __init__(self, frontend: Frontend, client: ClientProtocol) -> None:
        self.frontend = frontend
        # With a router (route_by_sni) the pool is picked before connecting.
        self.pool: Pool | None = frontend.pool if frontend.router is None else None
        self.clock: IReactorTime = frontend.clock
        self.client = client
        self.server: ServerProtocol | None = None
        self.server_state: ServerState | None = None
        self.started = self.clock.seconds()
        self.last_activity = self.started
        self.connect_time: float | None = None
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        self.retries = 0
        self.reason: str | None = None
        self.detail: str | None = None
        self._log_fields: dict[str, object] | None = None  # made on first use
        self._client_eof = False
        self._server_eof = False
        self._client_gone = False
        self._server_gone = True  # until a backend is connected
        self._connecting: Deferred[None] | None = None
        self._watch: DepartureWatch | None = None
        self._timer: Entry | None = None  # in the clock's TimerQueue
        self._attempt: Deferred[object] | None = None  # the connect in progress
        self._attempt_deadline = 0.0
        self._attempt_timed_out = False
        self._closing_at: float | None = None  # when we started closing
        self._finished = False
        # Which transport is registered as the other's producer (flow control).
        self._client_paces_server = False
        self._server_paces_client = False
        # Before a server is connected, a router may read the client's first
        # bytes through ``read_early``; they go to the server first.
        self.read_early: Callable[[bytes], None] | None = None
        self.first_bytes = b""
        self.splicer: Splicer | None = None  # set when the kernel moves the bytes

    # The client's address is not kept (about 150 bytes per session): the
    # transport has it, also once closed, and makes the object when asked.

    @property
    def client_address(self) -> IAddress:
        """The client's address, for log lines."""
        return self.client.transport.getPeer()  # type: ignore[no-any-return]

    @property
    def client_host(self) -> str:
        """The client's host, for policies that hash it (asked once per connect)."""
        return getattr(self.client.transport.getPeer(), "host", "") or ""

    @property
    def log_fields(self) -> dict[str, object]:
        """Extra fields for the "connection closed" line (TLS version, SNI, ...)."""
        fields = self._log_fields
        if fields is None:
            fields = self._log_fields = {}
        return fields

    # -- 1. start ----------------------------------------------------------

    def start(self, connect: bool = True) -> None:
        """Count the session in; with ``connect=False`` the caller calls
        `connect_now` later (TLS: once the client's handshake has succeeded)."""
        self.frontend.session_started(self)
        if connect:
            self.connect_now()

    def connect_now(self) -> None:
        """Find and connect a server; the client is not read until then."""
        if self.frontend.router is None:  # a router reads the client first
            self.watch_departure()
            if self._connect_direct():
                return
        self._connect_later(self.connect())

    def _connect_later(self, connect: Any) -> None:
        """Run the ``connect`` coroutine (queueing, routers, retries, test seams)."""
        connecting = Deferred.fromCoroutine(connect)
        if not connecting.called:  # it may already be over (no server at all)
            self._connecting = connecting
        connecting.addErrback(self._connect_failed)

    def watch_departure(self) -> None:
        """Read nothing until a backend is connected: watch (peek) or pause.

        A client whose first bytes are already waiting (most clients speak
        first, and the accept comes after their write) needs no watch: the
        watch would only peek at them on its first readable event and stop
        reading. This peeks now and stops reading at once, which saves that
        event, the watch and its hook.
        """
        transport = self.client.transport
        if DepartureWatch.bytes_waiting(transport):
            transport.pauseProducing()  # stopReading: the bytes stay in the kernel
            return
        self._watch = DepartureWatch.start(transport, self.client_left)
        if self._watch is None:
            transport.pauseProducing()
        else:
            transport.resumeProducing()  # a router may have paused it: the watch reads

    def client_left(self) -> None:
        """The waiting client closed without sending a byte, or reset: stop waiting."""
        self._watch = None
        self._set_reason("client closed")
        self.client.transport.abortConnection()  # → client_lost cancels the connect

    def _stop_watching(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.stop()

    # -- 2. pick a server and connect, with retries ------------------------

    async def connect(
        self,
        server_state: ServerState | None = None,
        tried: list[ServerState] | None = None,
    ) -> None:
        """Connect to a server, trying others on failure, then splice.

        ``server_state``: already acquired (`_connect_direct` could not use
        it); ``tried``: servers that failed this session (a retry after
        `_connect_direct`).
        """
        router = self.frontend.router
        if router is not None:
            self.pool = await router.route(self)  # pauses the client again
            self.watch_departure()
        pool = self.pool
        assert pool is not None
        timeout = pool.config.connect_timeout
        if tried is None:
            tried = []
        while True:
            if server_state is None:
                # A server with room is picked at once, without a Deferred.
                server_state = pool.acquire_now(self.client_host, tried)
            if server_state is None:
                server_state = await pool.acquire(self.client_host, tried)
            attempt_started = self.clock.seconds()
            protocol = ServerProtocol()
            endpoint = self.frontend.endpoint_for(server_state)
            attempt = endpoint.connect(_ServerFactory(protocol))
            self._arm_attempt(attempt, attempt_started + timeout)
            try:
                await attempt
            except (defer.CancelledError, error.ConnectingCancelledError) as e:
                self._attempt = None
                if not self._attempt_timed_out:
                    # The client left or we are closing (real endpoints fail a
                    # cancelled connect with ConnectingCancelledError).
                    pool.release(server_state)
                    raise defer.CancelledError() from None
                failure: BaseException = defer.TimeoutError(
                    f"connect timed out after {timeout:g}s"
                )
                failure.__cause__ = e
            except _CONNECT_FAILURES as e:
                self._attempt = None
                failure = e
            else:
                self._attempt = None
                self.connect_time = self.clock.seconds() - attempt_started
                self.splice(server_state, protocol)
                return
            self._attempt_failed(pool, server_state, failure, tried)
            server_state = None

    def _arm_attempt(self, attempt: Any, deadline: float) -> None:
        """Make ``attempt`` the connect in progress: the session's timer cancels it at ``deadline``."""
        self._attempt = attempt
        self._attempt_deadline = deadline
        self._attempt_timed_out = False
        self._schedule()

    def _attempt_failed(
        self,
        pool: Pool,
        server_state: ServerState,
        failure: BaseException,
        tried: list[ServerState],
    ) -> None:
        """Count a failed attempt; raises `NoServerError` when no retry is left."""
        pool.release(server_state)
        tried.append(server_state)
        why = _describe_connect_failure(failure, pool.config.connect_timeout)
        log.warning(
            "server connect failed",
            frontend=self.frontend.name,
            pool=pool.name,
            server=server_state.name,
            client=format_address(self.client_address),
            error=why,
            attempt=self.retries + 1,
        )
        pool.connect_failed(server_state, why)  # after: logs read in order
        if self.retries >= pool.config.retries:
            raise NoServerError(
                "connect failed", f"{server_state.name}: {why}"
            ) from failure
        self.retries += 1

    def _connect_direct(self) -> bool:
        """The common case without coroutine or Deferreds; False: not started.

        A server with room right now, behind an endpoint with
        ``connect_direct`` (`l4lb.connector.DirectTCPEndpoint` on a real
        reactor). `_DirectAttempt` keeps `connect`'s behaviour: the session
        timer's connect deadline, cancellation when the client leaves, the
        "server connect failed" line and health report. A failed attempt
        goes on with `connect` (retries, queueing).
        """
        pool = self.pool
        assert pool is not None
        server_state = pool.acquire_now(self.client_host, ())
        if server_state is None:
            return False
        endpoint = self.frontend.endpoint_for(server_state)
        if getattr(endpoint, "connect_direct", None) is None:
            self._connect_later(self.connect(server_state))
            return True
        attempt = _DirectAttempt(self, pool, server_state, self.clock.seconds())
        self._connecting = attempt
        self._arm_attempt(attempt, attempt.started + pool.config.connect_timeout)
        if not attempt.start(endpoint):  # not on this reactor (a test fake)
            self._connecting = self._attempt = None
            self._connect_later(self.connect(server_state))
        return True

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        self._stop_watching()
        if failure.check(defer.CancelledError):
            return  # the client left (or we are closing); client_lost finishes up
        if failure.check(NoServerError):
            exc = failure.value
            self._set_reason(exc.reason, exc.detail)
        else:
            self._set_reason("internal error", failure.getErrorMessage())
            log.error(
                "unexpected error while connecting", failure=failure.getTraceback()
            )
        self.client.transport.loseConnection()

    def _direct_connected(self, attempt: _DirectAttempt) -> None:
        self._attempt = None
        self.connect_time = self.clock.seconds() - attempt.started
        try:
            self.splice(attempt.server_state, attempt.protocol)
        except BaseException:
            self._connect_failed(Failure())  # as an exception out of `connect`

    def _direct_failed(self, attempt: _DirectAttempt, exc: BaseException) -> None:
        self._attempt = None
        self._connecting = None
        if not isinstance(exc, _CONNECT_FAILURES):
            self._connect_failed(Failure(exc))  # as it would leave `connect`
            return
        tried: list[ServerState] = []
        try:
            self._attempt_failed(attempt.pool, attempt.server_state, exc, tried)
        except NoServerError:
            self._connect_failed(Failure())
            return
        self._connect_later(self.connect(tried=tried))

    # -- 3. splice ---------------------------------------------------------

    def splice(self, server_state: ServerState, server: ServerProtocol) -> None:
        """Wire the two transports together with flow control both ways."""
        self._connecting = None
        self._stop_watching()
        self.server_state = server_state
        server_state.sessions.add(self)
        self.server = server
        server.session = self
        self._server_gone = False
        client_transport = self.client.transport
        server_transport = server.transport
        if self._client_gone:
            self._close_server()
            return
        if self.first_bytes:  # read by a router: at most 16 KiB plus one read
            server_transport.write(self.first_bytes)
            self.first_bytes = b""
        if self.client.early:  # read before a server was connected: goes first
            early, self.client.early = self.client.early, b""
            self.client.dataReceived(early)
        if self.frontend.splice:  # refused while bytes above are still buffered
            self.splicer = Splicer.start(self, client_transport, server_transport)
        if self.splicer is None:
            # Each transport pauses the other when its write buffer is full.
            server_transport.registerProducer(client_transport, True)
            self._client_paces_server = True
            client_transport.registerProducer(server_transport, True)
            self._server_paces_client = True
            client_transport.resumeProducing()
        self.last_activity = self.clock.seconds()
        self._schedule()
        health = self.pool.config.health  # type: ignore[union-attr]
        if not server_state.usable and health is not None and health.on_down == "close":
            self.close("server down")  # it went down while we were connecting

    # -- 4. half-close and close -------------------------------------------

    def client_eof(self) -> None:
        """The client finished sending: pass its FIN on to the server."""
        if self.server is None:  # while a router reads it: the client is gone
            self.client_left()
            return
        self._client_eof = True
        self._set_reason("client closed")
        self.last_activity = self.clock.seconds()
        self._unpace_server()
        if self._server_eof:
            self._close_both()
        else:
            self._lose_write(self.server.transport)  # type: ignore[union-attr]
            self._schedule()

    def server_eof(self) -> None:
        """The server finished sending: pass its FIN on to the client."""
        self._server_eof = True
        self._set_reason("server closed")
        self.last_activity = self.clock.seconds()
        self._unpace_client()
        if self._client_eof:
            self._close_both()
        elif not self.client.can_half_close:
            # TLS: flush, close_notify, close; abort a client that does not read.
            self.client.transport.loseConnection()
            self._linger()
        else:
            self._lose_write(self.client.transport)
            self._schedule()

    def client_lost(self, reason: Failure | None) -> None:
        self._stop_watching()
        self._client_gone = True
        # Its producer registration went with it (a TLS transport cannot even
        # unregister once gone).
        self._server_paces_client = False
        self._set_reason("client closed")
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        if not self._server_gone:
            self._close_server()
        self._maybe_finish()

    def server_lost(self, reason: Failure | None) -> None:
        self._server_gone = True
        self._set_reason("server closed")
        if self.server_state is not None:
            self.server_state.sessions.discard(self)
            self.pool.release(self.server_state)  # type: ignore[union-attr]
        self._unpace_client()
        if not self._client_gone:
            self._lose(self.client.transport)
            self._linger()
        self._maybe_finish()

    def close(self, reason: str, abort: bool = False) -> None:
        """Close the session from our side (timeouts, shutdown): ``reason`` is why."""
        self.reason, self.detail = reason, None
        self._stop_watching()
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        self._unpace_server()
        self._unpace_client()
        for transport in self._live_transports():
            if abort:
                transport.abortConnection()
            else:
                self._lose(transport)
        if not abort:
            self._linger()

    def _close_server(self) -> None:
        self._unpace_server()
        self._lose(self.server.transport)  # type: ignore[union-attr]
        self._linger()

    def _close_both(self) -> None:
        self._unpace_server()
        self._unpace_client()
        for transport in self._live_transports():
            self._lose(transport)
        self._linger()

    def _in_flight(self, transport: ITransport) -> int:
        """Bytes a splice pipe still holds for ``transport`` (1 if that direction broke)."""
        splicer = self.splicer
        if splicer is None:
            return 0
        into = splicer.down if transport is self.client.transport else splicer.up
        if into.broken:
            return 1  # its doWrite reports the loss: leave the close to Twisted
        return into.pending

    def _lose(self, transport: ITransport) -> None:
        """``loseConnection``; right after this batch of events if nothing is left to send."""
        closing.lose_connection(transport, self._in_flight(transport))

    def _lose_write(self, transport: ITransport) -> None:
        """``loseWriteConnection``; at once if nothing is left to send."""
        closing.lose_write_connection(transport, self._in_flight(transport))

    # A transport must not keep a producer registered when it half-closes or
    # closes: on an empty buffer it would resume a paused producer instead of
    # finishing the close.

    def _unpace_server(self) -> None:
        if self._client_paces_server:
            self._client_paces_server = False
            self.server.transport.unregisterProducer()  # type: ignore[union-attr]

    def _unpace_client(self) -> None:
        if self._server_paces_client:
            self._server_paces_client = False
            self.client.transport.unregisterProducer()

    def _live_transports(self) -> list[ITransport]:
        transports = []
        if not self._client_gone:
            transports.append(self.client.transport)
        if not self._server_gone and self.server is not None:
            transports.append(self.server.transport)
        return transports

    def _linger(self) -> None:
        """Closing flushes what is buffered; a peer that never reads gets aborted."""
        if self._closing_at is None:
            self._closing_at = self.clock.seconds()
            self._schedule()
        # Else the timer already points at _closing_at + the linger limit.

    def _abort_lingering(self) -> None:
        for transport in self._live_transports():
            transport.abortConnection()

    # -- timeouts: one timer per session ------------------------------------

    def _linger_limit(self) -> float:
        config = self.frontend.config
        return config.half_closed_timeout or config.idle_timeout

    def _quiet_limit(self) -> float:
        config = self.frontend.config
        if (self._client_eof or self._server_eof) and config.half_closed_timeout > 0:
            if config.idle_timeout > 0:
                return min(config.half_closed_timeout, config.idle_timeout)
            return config.half_closed_timeout
        return config.idle_timeout

    def _deadline(self) -> float | None:
        """When the timer must next look at this session (None: never)."""
        if self._attempt is not None:
            return None if self._attempt_timed_out else self._attempt_deadline
        if self._closing_at is not None:
            limit = self._linger_limit()
            return self._closing_at + limit if limit > 0 else None
        if self.server is None:
            return None  # queued: the pool's queue timeout applies
        # First the shortest limit that may apply, so that a half-close (which
        # may shorten the limit) needs no new timer; once that has passed, the
        # limit that applies now.
        config = self.frontend.config
        idle, half = config.idle_timeout, config.half_closed_timeout
        if idle > 0 and half > 0:
            early = self.last_activity + min(idle, half)
            if early > self.clock.seconds():
                return early
        limit = self._quiet_limit()
        return self.last_activity + limit if limit > 0 else None

    def _schedule(self) -> None:
        """Point the one timer at the current deadline (called at phase changes)."""
        deadline = self._deadline()
        timer = self._timer
        if timer is not None and deadline is not None:
            # _TIMER_SLACK: a timer reset a moment ago to (nearly) this deadline
            # lands a few microseconds after it on a real clock; that is not
            # worth a new timer.
            at = timer[3]  # TimerQueue.when(timer), without the call (tested)
            if at <= deadline + _TIMER_SLACK:
                if at < deadline:  # lazily, without a new entry
                    queue_for(self.clock).postpone(timer, deadline)
                return
        timers = queue_for(self.clock)
        if timer is not None:
            self._timer = None
            timers.cancel(timer)  # sooner: a new entry is cheaper than moving it up
        if deadline is not None and not self._finished:
            self._timer = timers.add(max(deadline, self.clock.seconds()), self)

    def _on_timer(self) -> None:
        """A deadline may have passed: act on it, or re-arm for the next one."""
        self._timer = None
        now = self.clock.seconds()
        if self._attempt is not None:
            if now >= self._attempt_deadline:
                self._attempt_timed_out = True
                self._attempt.cancel()  # → the connect loop's timeout branch
        elif self._closing_at is not None:
            limit = self._linger_limit()
            if limit > 0 and now >= self._closing_at + limit:
                self._abort_lingering()
                return
        elif self.server is not None:
            limit = self._quiet_limit()
            if limit > 0 and now >= self.last_activity + limit:
                half = self._client_eof or self._server_eof
                self.close("half-closed timeout" if half else "idle timeout")
                return
        self._schedule()

    # -- 5. finish ---------------------------------------------------------

    def _set_reason(self, reason: str, detail: str | None = None) -> None:
        if self.reason is None:
            self.reason = reason
            self.detail = detail

    def _maybe_finish(self) -> None:
        if self._finished or not (self._client_gone and self._server_gone):
            return
        if self._connecting is not None:
            return
        self._finished = True
        if self.splicer is not None:
            self.splicer.close()
        if self._timer is not None:
            timer, self._timer = self._timer, None
            queue_for(self.clock).cancel(timer)
        if logs.enabled():
            self._log_closed()
        # Last: this may complete a graceful stop, whose summary must come after.
        self.frontend.session_finished(self)

    def _log_closed(self) -> None:
        fields = {
            "frontend": self.frontend.name,
            "pool": self.pool.name if self.pool is not None else None,
            "server": self.server_state.name if self.server_state else None,
            "client": format_address(self.client_address),
            "connect_time": (
                round(self.connect_time, 6) if self.connect_time is not None else None
            ),
            "duration": round(self.clock.seconds() - self.started, 6),
            "bytes_from_client": self.bytes_from_client,
            "bytes_from_server": self.bytes_from_server,
            "retries": self.retries,
            "reason": self.reason,
        }
        if self.detail:
            fields["detail"] = self.detail
        if self._log_fields:
            fields.update(self._log_fields)
        log.info("connection closed", **fields)


class _DirectAttempt:
    """`Session._connect_direct`'s one attempt: the handle the session cancels.

    ``cancel`` is called as ``Session._attempt`` (the connect deadline,
    with ``_attempt_timed_out`` set) or as ``Session._connecting`` (the client
    left, or the session closes), as `Session.connect` tells them apart.
    """

    __slots__ = ("_handle", "pool", "protocol", "server_state", "session", "started")

    def __init__(
        self, session: Session, pool: Pool, server_state: ServerState, started: float
    ) -> None:
        self.session = session
        self.pool = pool
        self.server_state = server_state
        self.started = started
        self.protocol = ServerProtocol()
        self._handle: Any = None

    def start(self, endpoint: Any) -> bool:
        """Start connecting; False if the endpoint cannot here (``connect_direct``
        gave None: nothing was started, the session uses `Session.connect`)."""
        try:
            handle = endpoint.connect_direct(
                self.protocol, self._connected, self._failed
            )
        except BaseException as e:  # as `connect` would see a failed Deferred
            self._failed(e)
            return True
        if handle is None:
            return False
        if self.session._attempt is self:  # still going: keep the handle
            self._handle = handle
        return True

    def _connected(self) -> None:
        self.session._direct_connected(self)

    def _failed(self, exc: BaseException) -> None:
        self.session._direct_failed(self, exc)

    def cancel(self) -> None:
        session = self.session
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        if session._attempt is not self:
            return  # over already
        session._attempt = None
        if session._attempt_timed_out:
            timeout = self.pool.config.connect_timeout
            session._direct_failed(
                self, defer.TimeoutError(f"connect timed out after {timeout:g}s")
            )
        else:
            # The client left or we are closing.
            self.pool.release(self.server_state)
            session._connecting = None
            session._stop_watching()


class DepartureWatch:
    """Notices a waiting client leaving, without reading (and buffering) its bytes.

    While a client waits for a server (queued or connecting), its bytes must
    stay in the kernel. A departure must still be seen, or the client would
    hold a queue place or a connect attempt until the backend answers. The
    watch takes the client transport's readiness calls (`l4lb.hook`). The
    socket stays registered with the reactor, so a watch costs no epoll change
    when the backend connects before the client sends. On readability it peeks
    at one byte:

    - An end of stream before any byte, or a reset, means the client left,
      and its wait is cancelled.
    - Once a byte is waiting, the watch ends, the transport stops reading, and
      the byte stays in the kernel. After data, a FIN may be a half-close (send
      a request, shut the write half, await the reply) that must be served, so
      it is left for the splice to pass on.
    """

    __slots__ = ("_active", "_on_left", "_transport")

    def __init__(self, transport: ITransport, on_left: Callable[[], None]) -> None:
        self._transport = transport
        self._on_left = on_left
        self._active = True
        hook(transport, self)

    @classmethod
    def start(
        cls, transport: ITransport, on_left: Callable[[], None]
    ) -> DepartureWatch | None:
        """Watch a reading TCP/UNIX socket transport; others (test fakes, TLS) are not."""
        if (
            not isinstance(transport, tcp.Connection)
            or getattr(transport, "TLS", False)  # started TLS: the TLS layer reads
            or not IReactorFDSet.providedBy(transport.reactor)
        ):
            return None
        return cls(transport, on_left)

    @staticmethod
    def bytes_waiting(transport: ITransport) -> bool:
        """Whether a watchable transport's client has already sent (a peek).

        False for transports `start` would not watch, and when nothing is
        waiting, the stream has ended or the peek fails: the watch then sees
        that state on its first readable event, as before.
        """
        if type(transport) not in _PEEKABLE or transport.TLS:  # type: ignore[attr-defined]
            return False
        try:
            return bool(transport.socket.recv(1, socket.MSG_PEEK))
        except OSError:  # BlockingIOError most often: nothing yet
            return False

    def on_read(self) -> None:
        transport: Any = self._transport
        try:
            peeked = transport.socket.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            peeked = b""  # reset by the peer
        self.stop()
        transport.stopReading()  # until the splice: the bytes stay in the kernel
        if not peeked:
            self._on_left()

    def on_write(self) -> Exception | None:
        return original_do_write(self._transport)  # writes stay Twisted's

    def stop(self) -> None:
        """Give the transport its reads back (it may have stopped reading)."""
        if self._active:
            self._active = False
            unhook(self._transport)


def _describe_connect_failure(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, defer.TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.ConnectError) and exc.osError is not None:
        return str(exc.osError)
    return str(exc) or type(exc).__name__


def format_address(address: IAddress) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return str(address)
