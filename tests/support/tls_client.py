"""websockets' threaded client over TLS without its read/write race.

websockets' sync client reads the socket in a background thread while the caller's
thread writes to it. On a TLS socket that is one OpenSSL connection read and written
from two threads at once, which OpenSSL does not allow (CPython 3.11 does not serialize
them): when the server's TLS 1.3 session tickets are read in the background thread at
the moment the upgrade request is written, the request can be lost, and the test waits
for an answer that never comes (about one handshake in a thousand on a loaded machine).

``connect_tls(url, ssl=context, ...)`` is websockets' ``connect`` with the one TLS
connection used by one thread at a time: the socket is non-blocking, every ``recv`` and
``send`` runs under a lock, and the waiting for the socket is done outside it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from typing import Any

import trustme
from websockets.sync.client import ClientConnection, connect


class SerializedTLS:
    """An ``ssl.SSLSocket`` whose reads and writes never overlap (the methods websockets'
    sync client uses; everything else is the socket's own)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._timeout: float | None = None
        sock.setblocking(False)

    @property
    def tls(self) -> ssl.SSLSocket:
        """The TLS socket itself, to read its version, cipher and certificates (not to
        read, write or make blocking: that is what this wrapper does)."""
        return self._sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout  # applied by the waits below; the socket stays non-blocking

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def shutdown(self, how: int) -> None:
        with self._lock:
            self._sock.shutdown(how)

    def close(self) -> None:
        # wakes a thread waiting in _wait (a descriptor being polled is not released by
        # close() alone, so no FIN would go out and the wait would last until the peer
        # hung up: a client's timeout would then be the server's)
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        with self._lock:
            self._sock.close()

    def gettimeout(self) -> float | None:
        return self._timeout

    def _wait(self, for_write: bool, deadline: float | None) -> None:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError("timed out")
        poller = select.poll()  # not select(): a worker's descriptors may pass 1024
        poller.register(self._sock, select.POLLOUT if for_write else select.POLLIN)
        if not poller.poll(None if remaining is None else remaining * 1000):
            raise TimeoutError("timed out")

    def _deadline(self) -> float | None:
        return None if self._timeout is None else time.monotonic() + self._timeout

    def recv(self, size: int) -> bytes:
        deadline = self._deadline()
        while True:
            with self._lock:
                try:
                    return self._sock.recv(size)
                except ssl.SSLWantReadError:
                    for_write = False
                except ssl.SSLWantWriteError:
                    for_write = True
            self._wait(for_write, deadline)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        deadline = self._deadline()
        view = memoryview(data)
        while view:
            with self._lock:
                try:
                    view = view[self._sock.send(view) :]
                    continue
                except ssl.SSLWantWriteError:
                    for_write = True
                except ssl.SSLWantReadError:
                    for_write = False
            self._wait(for_write, deadline)


class _SerializingContext:
    """What websockets calls as its ``ssl`` context: the real context's handshake, then
    the socket wrapped in :class:`SerializedTLS`."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context

    def wrap_socket(self, sock: socket.socket, server_hostname: str | None = None) -> Any:
        return SerializedTLS(self._context.wrap_socket(sock, server_hostname=server_hostname))


def connect_tls(url: str, *, ssl: ssl.SSLContext, **kwargs: Any) -> ClientConnection:
    """websockets' sync ``connect`` to a ``wss://`` *url* (see the module docstring)."""
    shim: Any = _SerializingContext(ssl)
    ws: ClientConnection = connect(url, ssl=shim, **kwargs)
    return ws


def tls_socket(ws: ClientConnection) -> ssl.SSLSocket:
    """The TLS socket of a connection :func:`connect_tls` opened."""
    wrapped = ws.socket
    assert isinstance(wrapped, SerializedTLS), wrapped
    return wrapped.tls


def client_context(
    *trusted: trustme.CA,
    cert: trustme.LeafCert | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A verifying client context trusting exactly *trusted*, optionally with a client
    certificate and a highest TLS version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for ca in trusted:
        ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx
