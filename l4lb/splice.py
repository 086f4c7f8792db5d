"""Zero-copy splicing: move a session's bytes socket → pipe → socket inside the kernel.

On Linux, ``splice(2)`` moves data between a socket and a pipe without copying
it into user space. A spliced session never sees its bytes in Python: per
direction, a readable source socket is spliced into a pipe, and the pipe into
the destination socket, driven by the same reactor readiness callbacks Twisted
uses for the normal path.

How it hooks into Twisted: a Twisted TCP transport is the selectable the
reactor watches, and the reactor calls its ``doRead``/``doWrite``. `Splicer`
redirects those two calls (`l4lb.hook`) to the directions' `Direction.do_read`
/ `Direction.do_write`. Everything else is left to Twisted: ``startReading``/
``stopReading`` registrations, ``loseConnection``/``loseWriteConnection``
(our ``doWrite`` drains the pipe first, then calls Twisted's, which flushes its
own empty buffer and performs the close or the ``shutdown(SHUT_WR)``), and
end of stream: returning ``CONNECTION_DONE`` from ``doRead`` makes the reactor
call the transport's ``readConnectionLost`` and so the session's half-close
code, exactly as on the normal path.

Flow control: a direction reads at most one pipe's worth, then tries to send it
on at once. Whatever the destination does not take stays in the pipe; the
source stops being read and the destination is watched for writability until
the pipe is empty, then the source is read again. Memory per direction is
bounded by the pipe (256 KiB), and nothing is buffered in Python.

Pipes are borrowed from a `PipePool` only while bytes are in flight and given
back as soon as a pipe is empty (as HAProxy does), so an idle spliced
connection holds no pipe: two descriptors per connection, as on the normal path.
If no pipe can be made (descriptor limit), that chunk is copied through Python
with ``recv`` and the transport's ``write`` instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

from twisted.internet import main, tcp
from twisted.internet.interfaces import IReactorFDSet

from l4lb.hook import hook, original_do_write, unhook

if TYPE_CHECKING:
    from l4lb.proxy import Session

# Bytes moved per splice call: the default pipe capacity on Linux.
CHUNK = 1 << 18
# Pipes are grown to CHUNK (256 KiB) when the kernel allows it: four times
# fewer wakeups per byte than the 64 KiB default, and still the bound on what
# one stalled direction holds. Past the per-user limit (fs.pipe-user-pages-soft)
# the kernel refuses and the pipe keeps its size; a splice then moves less.
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_splice = getattr(os, "splice", None)

# Small chunks are copied, not spliced: ``recv`` + ``send`` is two system
# calls where socket -> pipe -> socket is two plus a pipe borrowed and given
# back, and request/response traffic moves a few hundred bytes at a time. A
# read that fills the whole copy buffer means bulk traffic: the direction
# switches to splicing, and goes back to copying after a splice that moved
# less than SMALL.
COPY_CHUNK = 1 << 16
SMALL = 1 << 14
# One buffer for the process (one reactor thread): each copy is sent on, or
# what the destination did not take is handed to Twisted, before it returns.
_COPY_BUFFER = bytearray(COPY_CHUNK)
_COPY_VIEW = memoryview(_COPY_BUFFER)

_supported: bool | None = None


def supported() -> bool:
    """Whether this system can splice between TCP sockets and pipes (probed once)."""
    global _supported
    if _supported is None:
        _supported = _probe()
    return _supported


def _probe() -> bool:
    if _splice is None or not sys.platform.startswith("linux"):
        return False
    try:
        a, b = socket.socketpair()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        a.send(b"x")
        moved = _splice(b.fileno(), w, 1, flags=_FLAGS)
        moved += _splice(r, a.fileno(), 1, flags=_FLAGS)
        return moved == 2 and b.recv(1) == b"x"
    except OSError:
        return False
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


class PipePool:
    """Pipes lent to directions while they have bytes in flight.

    Making a pipe costs two system calls and two descriptors, so a few empty
    ones are kept for reuse (``keep``); beyond that they are closed.
    ``in_use`` counts pipes lent and not yet returned (tests check it drops to
    0: a leak here is a descriptor leak).
    """

    __slots__ = ("_free", "in_use", "keep")

    def __init__(self, keep: int = 16) -> None:
        self._free: list[tuple[int, int]] = []
        self.keep = keep
        self.in_use = 0

    def get(self) -> tuple[int, int]:
        """An empty pipe (read end, write end); raises OSError when none can be made."""
        pipe = self._free.pop() if self._free else self._make()
        self.in_use += 1
        return pipe

    def _make(self) -> tuple[int, int]:
        pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, CHUNK)
        return pipe

    def put(self, pipe: tuple[int, int]) -> None:
        """Give back an empty pipe."""
        self.in_use -= 1
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            _close_pipe(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """Give back a pipe that still holds bytes nobody will read: close it."""
        self.in_use -= 1
        _close_pipe(pipe)

    @property
    def idle(self) -> int:
        return len(self._free)

    def clear(self) -> None:
        """Close the kept empty pipes."""
        free, self._free = self._free, []
        for pipe in free:
            _close_pipe(pipe)


def _close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)


PIPES = PipePool()
"""The process's pipe pool (one reactor per process)."""


def can_splice(transport: Any) -> bool:
    """A plain TCP/UNIX socket transport of a descriptor reactor, nothing buffered.

    TLS (a protocol wrapper, or a transport that has started TLS), test fakes
    and transports with bytes still in Twisted's write buffer stay on the
    normal path.
    """
    return (
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataLen
        and transport.producer is None
        and IReactorFDSet.providedBy(transport.reactor)
    )


class Splicer:
    """Both directions of one spliced session (``up``: client → server)."""

    __slots__ = ("down", "up")

    def __init__(self, session: Session, client: Any, server: Any) -> None:
        self.up = up = _Up(session, client, server)
        self.down = down = _Down(session, server, client)
        up.other, down.other = down, up
        hook(client, up)  # reads for up, writes for down
        hook(server, down)

    @classmethod
    def start(cls, session: Session, client: Any, server: Any) -> Splicer | None:
        """Splice the session's two transports, or None to use the normal path."""
        if not (supported() and can_splice(client) and can_splice(server)):
            return None
        splicer = cls(session, client, server)
        client.startReading()  # no-op unless it stopped while waiting for a backend
        server.startReading()
        return splicer

    def close(self) -> None:
        """Both transports are gone: give the pipes back, drop the hooks."""
        self.up.close()
        self.down.close()
        unhook(self.up.src)
        unhook(self.down.src)

    @property
    def pending(self) -> int:
        """Bytes in the pipes, read but not yet sent on."""
        return self.up.pending + self.down.pending


class Direction:
    """One direction of a spliced session: ``src`` socket → pipe → ``dst`` socket.

    Every idle spliced connection holds two, so they keep only what differs:
    ``from_client`` is on the class (`_Up`, `_Down`), pipes come from `PIPES`,
    and the descriptors are asked of the transports when a splice needs them.
    """

    __slots__ = (
        "_waiting",
        "broken",
        "copying",
        "dst",
        "other",
        "pending",
        "pipe",
        "session",
        "src",
    )

    from_client: bool

    def __init__(self, session: Session, src: Any, dst: Any) -> None:
        self.session = session
        self.src = src
        self.dst = dst
        self.pipe: tuple[int, int] | None = None
        self.pending = 0  # bytes in the pipe
        self.broken = False  # sending to dst failed; its doWrite reports the loss
        self._waiting = False  # src stopped by us until dst has taken everything
        self.copying = True  # small chunks through Python until a bulk read
        self.other: Direction = self  # the opposite direction, set by Splicer

    # -- the source is readable ------------------------------------------------

    # -- the hook: the source transport's doRead / doWrite --------------------

    def on_write(self) -> Exception | None:
        """The source transport is writable: that is the opposite direction's dst."""
        return self.other.do_write()

    def do_read(self) -> Exception | None:
        """``src.doRead``: move up to one pipe of bytes in, and straight on if possible."""
        src, dst = self.src, self.dst
        if self._waiting or not dst.connected or dst.disconnected:
            src.stopReading()  # defensive: nothing may be read before dst takes it
            return None
        if self.copying:
            # Inlined (not a call to _count and a helper): this runs once per
            # request and per response on kept-alive connections.
            try:
                n = src.socket.recv_into(_COPY_BUFFER)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                return main.CONNECTION_LOST
            if n == 0:
                return main.CONNECTION_DONE  # nothing is in flight: pass the FIN on
            session = self.session
            if self.from_client:
                session.bytes_from_client += n
            else:
                session.bytes_from_server += n
            session.last_activity = session.clock.seconds()
            if n == COPY_CHUNK:
                self.copying = False  # bulk: the kernel moves the rest
            try:
                sent = dst.socket.send(_COPY_VIEW[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.broken = True  # dst's doWrite turns this into its connectionLost
                self._waiting = True
                src.stopReading()
                dst.startWriting()
                return None
            if sent < n:
                # dst is slow: Twisted buffers the rest (at most COPY_CHUNK) and
                # our do_write lets it flush; src is not read until it has.
                dst.write(bytes(_COPY_VIEW[sent:n]))
                self._waiting = True
                src.stopReading()
            return None
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = PIPES.get()
            except OSError:
                return self._copy()
        try:
            n = _splice(src.fileno(), pipe[1], CHUNK, flags=_FLAGS)  # type: ignore[misc]
        except (BlockingIOError, InterruptedError):
            n = -1
        except OSError:
            self._release()
            return main.CONNECTION_LOST
        if n <= 0:
            # The pipe is empty here: a source is only read once its pipe has
            # been drained, so its FIN is passed on after every byte before it.
            self._release()
            if n == 0:
                return main.CONNECTION_DONE  # → readConnectionLost → half-close
            return None
        self._count(n)
        if n < SMALL:
            self.copying = True  # the bulk is over: the next read is copied
        self.pending += n
        self._send()
        if self.pending:
            # dst is slow: stop reading until the pipe is drained.
            self._waiting = True
            src.stopReading()
            dst.startWriting()
        return None

    # The hook calls on_read for every readable event: no extra frame.
    on_read = do_read

    def _count(self, n: int) -> None:
        session = self.session
        if self.from_client:
            session.bytes_from_client += n
        else:
            session.bytes_from_server += n
        session.last_activity = session.clock.seconds()

    def _send(self) -> None:
        """Move what the pipe holds to dst, as far as it takes it now."""
        try:
            moved = _splice(self.pipe[0], self.dst.fileno(), self.pending, flags=_FLAGS)  # type: ignore[index,misc]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return
            self.broken = True  # dst's doWrite turns this into its connectionLost
            self._waiting = True
            self.src.stopReading()
            self.dst.startWriting()
            return
        self.pending -= moved
        if self.pending == 0:
            self._release()

    def _copy(self) -> Exception | None:
        """No pipe to be had: move one chunk through Python instead."""
        try:
            data = self.src.socket.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self._count(len(data))
        self.dst.write(data)  # Twisted's buffer; our do_write lets it flush
        self._waiting = True
        self.src.stopReading()
        return None

    # -- the destination is writable ---------------------------------------

    def do_write(self) -> Exception | None:
        """``dst.doWrite``: drain the pipe, then let Twisted flush and close."""
        if self.broken:
            self._release()
            return main.CONNECTION_LOST
        dst = self.dst
        if self.pending:
            self._send()
            if self.broken:
                self._release()
                return main.CONNECTION_LOST
            if self.pending:
                return None
        if (
            dst.dataBuffer
            or dst._tempDataLen
            or dst.disconnecting
            or dst._writeDisconnecting
        ):
            # Twisted's own doWrite: its buffer (a copied chunk), then a pending
            # loseConnection / loseWriteConnection once it is empty.
            result = original_do_write(dst)
            if dst.dataBuffer or dst._tempDataLen:
                return result
        else:
            dst.stopWriting()
            result = None
        if self._waiting:
            self._waiting = False
            src = self.src
            if src.connected and not src.disconnecting:
                src.startReading()
        return result

    # -- the end -------------------------------------------------------------

    def _release(self) -> None:
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        if self.pending:
            self.pending = 0
            PIPES.discard(pipe)
        else:
            PIPES.put(pipe)

    def close(self) -> None:
        self._release()


class _Up(Direction):
    """Client → server."""

    __slots__ = ()
    from_client = True


class _Down(Direction):
    """Server → client."""

    __slots__ = ()
    from_client = False
