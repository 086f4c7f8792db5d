"""A leaner `TLSMemoryBIOProtocol` for terminating TLS frontends.

Twisted's TLS protocol is correct but does avoidable work on each connection
and each chunk, which a profile of ``python -m bench --only
tls-handshakes,tls-bulk`` showed (see "TLS performance" in ``docs/tls.md``):

- ``makeConnection`` calls zope's ``directlyProvides`` once per interface of
  the transport and once more for all of them. Its weak cache of ``Provides``
  objects empties whenever no connection holds one, so on a stream of short
  connections each accept recomputes interface resolution orders. We keep the
  one ``Provides`` object per transport spec and assign it.
- The default protocol, ``BufferingTLSTransport``, copies every write and
  schedules a ``callLater(0)`` to coalesce small writes. A proxy writes whole
  socket reads (up to 64 KiB), so that buys nothing here and costs a timer per
  chunk. Writes go straight to OpenSSL instead.
- ``_write`` slices application data into 16 KiB pieces and flushes the
  memory BIO after each; one ``SSL_write`` into the memory BIO makes all the
  records, and one flush hands them to the socket in one ``write``.
- ``_flushReceiveBIO`` hands each decrypted record (at most 16 KiB) to the
  application separately, so one 64 KiB socket read became four backend
  writes; we hand the application one joined chunk per socket read.
- TLS client sockets are read in larger pieces (`READ_SIZE`), so bulk uploads
  take fewer reactor turns, reads, and backend writes per byte.
- Latency of the handshake: a TCP transport's ``write`` only buffers and
  waits for the next reactor turn (two ``epoll_ctl`` calls and an
  ``epoll_wait``) to send. When nothing is buffered we send at once, as
  HAProxy does, and buffer only what the socket did not take. And the
  ClientHello has usually arrived by the time an accepted connection is set
  up, so it is read at once instead of on the next reactor turn.

Everything else (handshake, shutdown, producers, errors) is Twisted's code,
and all of the TLS tests run through this class.
"""

from __future__ import annotations

import socket
from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

__all__ = ["READ_SIZE", "TerminatingTLSFactory", "TerminatingTLSProtocol"]

# Socket read size of a TLS client connection (Twisted's default is 64 KiB).
READ_SIZE = 256 * 1024

# Largest plaintext of one TLS record, the most one SSL_read returns.
_RECORD = 16 * 1024

# Memory BIO read size: a full flight of records in one piece.
_BIO_READ = 256 * 1024

# Decrypted bytes of one socket read land here (the reactor is one thread;
# the bytes are copied out before the application sees them). This uses
# pyOpenSSL's cffi binding of SSL_read and its error mapping, which are not
# public API: without them `_flushReceiveBIOPublic` is used.
try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _SSL_read: Any = _lib.SSL_read
except (ImportError, AttributeError):  # pragma: no cover - other pyOpenSSL
    _SSL_read = None
_BUFFER = bytearray(READ_SIZE + 2 * _RECORD)
_VIEW = memoryview(_BUFFER)
_CBUFFER: Any = _ffi.from_buffer(_BUFFER) if _SSL_read is not None else None
_LIMIT = len(_BUFFER) - _RECORD  # room for one more record

# Transport spec → the Provides declaration `directlyProvides` would build.
_PROVIDES: dict[Any, Any] = {}


class TerminatingTLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's TLS protocol with cheaper connection setup, writes and reads."""

    _tcp = False  # over a Twisted TCP transport: direct socket reads and writes
    _hello_read = False  # the first handshake bytes (ClientHello) were read

    def makeConnection(self, transport: Any) -> None:
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        spec = providedBy(transport)
        provides = _PROVIDES.get(spec)
        if provides is None:
            directlyProvides(self, spec)
            _PROVIDES[spec] = self.__provides__  # type: ignore[attr-defined]
        else:
            self.__provides__ = provides
        self._tcp = isinstance(transport, tcp.Connection)
        if self._tcp:
            transport.bufferSize = READ_SIZE
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            self.wrappedProtocol.makeConnection(self)
        self._checkHandshakeStatus()
        if self._tcp and not self._handshakeDone and not self.disconnecting:
            self._read_now()

    def dataReceived(self, data: bytes) -> None:
        if self._handshakeDone:
            super().dataReceived(data)
            return
        if self._hello_read and self._reset_by_peer():
            # The client reset while we waited for the rest of its handshake
            # (its Finished may be in ``data``): nobody is there to finish it,
            # send tickets to, or connect a server for. HAProxy likewise
            # checks the socket's error before it goes on with a handshake.
            self.transport.abortConnection()
            return
        self._hello_read = True
        super().dataReceived(data)
        if self._handshakeDone:  # this read finished the handshake
            self._handshake_settled()

    def _handshake_settled(self) -> None:
        """The handshake is done: read once more, then tell the application.

        A client's first bytes, or its close, usually follow its Finished at
        once. Reading them before the application acts lets it see a client
        that has already left (a TLS health check, a scanner, ``openssl
        s_time``) before it opens a server connection for it, as HAProxy
        does. Only for an application that implements ``handshakeSettled()``
        (`TLSClientProtocol`): it is called unless the client has gone, and a
        client that closed (FIN: TLS has no half-close) or reset is closed
        here, so its ``connectionLost`` follows instead. Others keep
        Twisted's behaviour.
        """
        settled = getattr(self.wrappedProtocol, "handshakeSettled", None)
        if settled is None:
            return
        if (
            self._tcp
            and not self._lostTLSConnection
            and not self.disconnecting
            and not self._read_now()
        ):
            self._tlsShutdownFinished(None)  # it left; the transport's reason follows
            return
        if not self._lostTLSConnection and not self._aborted:
            settled()

    def _reset_by_peer(self) -> bool:
        """Whether the TCP socket has a pending error (the client reset it).

        One ``getsockopt`` per read during the handshake after the first (so
        usually one per connection): the kernel hands out queued bytes before
        a pending error, so a read alone does not tell.
        """
        if not self._tcp:
            return False
        transport: Any = self.transport
        try:
            return bool(transport.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        except OSError:
            return True

    def _read_now(self) -> bool:
        """Read what the client has sent already, if anything; False: it has left.

        At accept (the ClientHello) the caller ignores an end of stream or an
        error: the reactor finds them on its next turn and closes the
        connection as usual.
        """
        transport: Any = self.transport
        try:
            data = transport.socket.recv(transport.bufferSize, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True  # nothing yet
        except OSError:
            return False  # reset
        if data:
            self.dataReceived(data)
            return True
        return False  # end of stream

    def _send(self, data: bytes) -> None:
        """Write to the socket now if nothing is buffered; buffer the rest."""
        transport: Any = self.transport
        if (
            self._tcp
            and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer)
            and transport.connected
            and not transport._writeDisconnected
        ):
            try:
                sent = transport.socket.send(data)
            except OSError:
                sent = 0  # full (EAGAIN), or an error the reactor will report
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def _flushSendBIO(self) -> None:
        """Everything OpenSSL has queued for the peer, in one transport write."""
        read = self._tlsConnection.bio_read
        try:
            data = read(_BIO_READ)
        except WantReadError:
            return  # nothing queued
        while len(data) == _BIO_READ:  # more than one read's worth: rare
            try:
                data += read(_BIO_READ)
            except WantReadError:
                break
        self._send(data)

    def _flushReceiveBIO(self) -> None:
        """Decrypt what has arrived; deliver it to the application in one call."""
        connection = self._tlsConnection
        ssl = getattr(connection, "_ssl", None)
        if _SSL_read is None or ssl is None:
            self._flushReceiveBIOPublic()
            return
        # SSL_read straight into one shared buffer: pyOpenSSL's recv allocates
        # a buffer per record and copies out of it, and the records must then
        # be joined (two copies and ~20 Python calls per 16 KiB record).
        total = 0
        while not self._lostTLSConnection:
            if total > _LIMIT:  # full: hand over what we have and go on
                data, total = _VIEW[:total].tobytes(), 0
                self._deliver(data)
                continue
            read = _SSL_read(ssl, _CBUFFER + total, _RECORD)
            if read > 0:
                total += read
                continue
            data, total = _VIEW[:total].tobytes(), 0
            try:
                connection._raise_ssl_error(ssl, read)  # pyOpenSSL's own mapping
            except WantReadError:
                self._deliver(data)
                break
            except ZeroReturnError:
                # close_notify: what came before it is delivered first.
                self._deliver(data)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._deliver(data)
                self._tlsShutdownFinished(Failure())
            else:  # not expected (read <= 0 is always an error); stop reading
                self._deliver(data)
                break
        if total:
            self._deliver(_VIEW[:total].tobytes())
        # Bytes received may call for an answer (alerts, key updates).
        self._flushSendBIO()

    def _flushReceiveBIOPublic(self) -> None:
        """The same through pyOpenSSL's public ``recv`` (one chunk per record)."""
        chunks: list[bytes] = []
        recv = self._tlsConnection.recv
        while not self._lostTLSConnection:
            try:
                chunks.append(recv(_RECORD))
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(b"".join(chunks))
                chunks = []
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._deliver(b"".join(chunks))
                chunks = []
                self._tlsShutdownFinished(Failure())
        self._deliver(b"".join(chunks))
        self._flushSendBIO()

    def _deliver(self, data: bytes) -> None:
        if data and not self._aborted:
            self.wrappedProtocol.dataReceived(data)

    def _write(self, bytes: bytes) -> None:
        """One SSL_write into the memory BIO makes every record; flush once."""
        if self._lostTLSConnection:
            return
        view = memoryview(bytes)
        while view:
            try:
                sent = self._tlsConnection.send(view)
            except WantReadError:
                self._bufferedWrite(view.tobytes())
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                break
            view = view[sent:]
        self._flushSendBIO()


class TerminatingTLSFactory(TLSMemoryBIOFactory):
    """`TLSMemoryBIOFactory` building `TerminatingTLSProtocol` (server side)."""

    protocol = TerminatingTLSProtocol
    noisy = False
