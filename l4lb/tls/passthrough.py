"""TLS passthrough: pick a session's pool from the SNI of its ClientHello.

A frontend with ``route_by_sni`` reads the client before any server is
connected: the client transport is resumed, the bytes are kept (at most
:data:`~l4lb.tls.clienthello.MAX_HELLO_BYTES`) until they hold a whole
ClientHello, within ``handshake_timeout``; then the client is paused again,
the pool is chosen and the session connects as usual and sends the kept bytes
to the server first. Nothing is decrypted: the backends terminate TLS.

Every refusal (no route, not TLS, malformed, too slow) fails the session's
connect with a :class:`~l4lb.pool.NoServerError`, so it ends like any other
unservable client: the client is closed and the connection's one log line
gives the reason and, in ``detail``, why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

from l4lb.pool import NoServerError, Pool
from l4lb.tls.clienthello import ClientHello, Malformed, NeedMore, parse_client_hello
from l4lb.tls.sni import SniRoutes

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from l4lb.config import FrontendConfig
    from l4lb.proxy import Session


class SniRouter:
    """A frontend's SNI routes: from a client's ClientHello to a pool."""

    def __init__(
        self,
        config: FrontendConfig,
        pools: Mapping[str, Pool],
        default: Pool | None,
        clock: IReactorTime,
    ) -> None:
        self.routes = SniRoutes.build(config.route_by_sni)
        self.pools = pools
        self.default = default
        self.timeout = config.handshake_timeout
        self.clock = clock

    def pick(self, server_name: str | None) -> Pool | None:
        """The pool for a server name: a route, else the default, else None."""
        name = self.routes.match(server_name)
        return self.pools[name] if name is not None else self.default

    def route(self, session: Session) -> Deferred[Pool]:
        """Read ``session``'s ClientHello; fires with its pool, or fails with why not."""
        return _HelloReader(self, session).result


class _HelloReader:
    """Collects one client's first bytes until they hold a ClientHello."""

    def __init__(self, router: SniRouter, session: Session) -> None:
        self.router = router
        self.session = session
        self.buffer = b""
        self.result: Deferred[Pool] = Deferred(self._cancel)
        self.timer: IDelayedCall | None = router.clock.callLater(
            router.timeout, self._timed_out
        )
        session.read_early = self.feed
        session.client.transport.resumeProducing()

    def feed(self, data: bytes) -> None:
        """Called per chunk read from the client; parses what is there so far."""
        self.buffer += data
        parsed = parse_client_hello(self.buffer)
        if isinstance(parsed, NeedMore):
            return
        self._stop()
        if isinstance(parsed, ClientHello):
            self._routed(parsed)
        elif isinstance(parsed, Malformed):
            self._fail("malformed client hello", parsed.reason)
        else:
            self._fail("not tls", parsed.reason)

    def _routed(self, hello: ClientHello) -> None:
        session = self.session
        session.log_fields["sni"] = hello.server_name
        pool = self.router.pick(hello.server_name)
        if pool is None:
            said = (
                f"SNI {hello.server_name!r} matches no route"
                if hello.server_name is not None
                else "the client sent no SNI"
            )
            self._fail("no route", f"{said} and the frontend has no default pool")
            return
        session.first_bytes = self.buffer
        self.result.callback(pool)

    def _timed_out(self) -> None:
        self.timer = None
        self._stop()
        got = f"{len(self.buffer)} bytes" if self.buffer else "nothing"
        self._fail(
            "client hello timeout",
            f"no complete ClientHello within {self.router.timeout:g}s (got {got})",
        )

    def _fail(self, reason: str, detail: str) -> None:
        self.result.errback(NoServerError(reason, detail))

    def _stop(self) -> None:
        """Stop reading the client (it waits paused for its server) and the timer."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.session.read_early is not None:
            self.session.read_early = None
            self.session.client.transport.pauseProducing()

    def _cancel(self, result: Deferred[Pool]) -> None:
        """The client left or the session is closing."""
        self._stop()
