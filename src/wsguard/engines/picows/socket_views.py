"""What picows is shown of the socket and what reads it after a close."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from picows.picows import WSProtocol  # type: ignore[attr-defined]

if TYPE_CHECKING:
    from wsguard.engines.picows.listener import GuardListener

    pass

from wsguard.engines.picows.wire import CLOSE_OP

logger = logging.getLogger("wsguard.server")

_DRAIN_BYTES = 64 * 1024  # read (and dropped) after our close frame, before reads stop
_READ_CHUNK = 8192  # bytes read per callback at most (fairness; see BoundedReads)


class BoundedReads(WSProtocol):  # type: ignore[misc]
    """picows' protocol, reading at most ``_READ_CHUNK`` bytes at a time.

    picows doubles its read buffer whenever a read fills it, and never shrinks it: a
    client streaming small frames faster than they are processed would grow it to the
    size of the kernel's socket buffer (megabytes per connection) and make the server
    process all of that in one callback, while every other connection waits. Bounded
    reads keep both small: the buffer only grows for a frame that does not fit yet
    (at most ``limits.max_message_bytes``), and one callback handles at most 8 KiB.
    """

    def get_buffer(self, size_hint: int) -> memoryview:
        buffer: memoryview = WSProtocol.get_buffer(self, size_hint)
        return buffer[:_READ_CHUNK] if len(buffer) > _READ_CHUNK else buffer


_HEADER_MAX = 14  # bytes of a masked client frame's header at most
_CONTROL_MAX = 2 + 4 + 125  # bytes of a client's control frame at most, header included


class FragmentWatch(asyncio.BufferedProtocol):
    """What reads a connection while a fragmented message is reassembled: every read goes
    to picows as usual, and the header of the frame picows holds incomplete is shown to
    the listener (:meth:`GuardListener.fragment_pending`), so that a continuation frame
    taking the message over ``limits.max_message_bytes`` is refused from its header,
    not once picows has its whole payload (picows delivers whole frames only, and its
    own cap is per frame).

    Installed by the message's first frame and gone with its last: the reads of every
    other message cost nothing more. Bytes pass through the server's read buffer (one
    copy, at most 8 KiB a read). Where the frame picows holds began before this watch
    saw it (in the read that ended the frame before it), its header is not known: it
    is refused once the bytes received of it cross the limit by more than a header.
    """

    __slots__ = ("_head", "_inner", "_listener", "_pending", "_reads", "_transport")

    def __init__(
        self,
        inner: BoundedReads,
        listener: GuardListener,
        transport: asyncio.Transport,
        reads: memoryview,
    ) -> None:
        self._inner = inner
        self._listener = listener
        self._transport = transport
        # the server's read buffer (see HandshakeProtocol.get_buffer), 8 KiB of it
        self._reads = reads[:_READ_CHUNK]
        self._pending = -1  # bytes of the frame picows holds incomplete (-1: not known yet)
        self._head: bytes | None = None  # that frame's first bytes (None: not seen here)

    def get_buffer(self, size_hint: int) -> memoryview:
        return self._reads  # the loop reads, then calls buffer_updated at once

    def buffer_updated(self, nbytes: int) -> None:
        listener, inner, transport = self._listener, self._inner, self._transport
        if self._pending < 0:  # the first read: what the message's first frame left
            self._pending = listener.tail
            self._head = b"" if listener.tail == 0 else None
        data = self._reads
        start = -1  # where the frame left incomplete begins in this read (-1: before it)
        fed = 0
        while fed < nbytes:  # into picows' own buffer, as handshake._feed does
            target = inner.get_buffer(-1)
            size = min(len(target), nbytes - fed)
            target[:size] = data[fed : fed + size]
            listener.tail = -1
            inner.buffer_updated(size)
            fed += size
            if listener.tail >= 0:  # frames ended: the last one's tail is the next frame
                start = fed - listener.tail
            if transport.get_protocol() is not self:
                return  # closing (what follows is dropped unparsed), or the message ended
        if start >= 0:
            self._pending = nbytes - start
            self._head = bytes(data[start : min(nbytes, start + _HEADER_MAX)])
        else:
            self._pending += nbytes
            head = self._head
            if head is not None and len(head) < _HEADER_MAX:
                self._head = head + bytes(data[: min(nbytes, _HEADER_MAX - len(head))])
        if not listener.fragment_pending(self._head, self._pending):
            self.stop()

    def check_held(self) -> None:
        """Right after the read that installed this watch (called soon): picows may
        already hold all a client sent of the next frame, and no further read may come
        to show it: those bytes are checked as a read's would be."""
        if self._pending >= 0 or self._transport.get_protocol() is not self:
            return  # a read came first (it counted them), or the message ended
        tail = self._listener.tail
        if tail >= 0 and not self._listener.fragment_pending(b"" if tail == 0 else None, tail):
            self.stop()

    def stop(self) -> None:
        """The message ended (or the connection is closing): picows reads on its own."""
        if self._transport.get_protocol() is self:
            self._transport.set_protocol(self._inner)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def announced(head: bytes) -> tuple[int, int] | None:
    """The opcode and payload length a client frame's first bytes announce; None while
    its header is incomplete."""
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    if length == 126:
        if len(head) < 4:
            return None
        length = int.from_bytes(head[2:4], "big")
    elif length == 127:
        if len(head) < 10:
            return None
        length = int.from_bytes(head[2:10], "big")
    return head[0] & 0x0F, length


def over_allowance(head: bytes | None, pending: int, allowance: int) -> bool:
    """Whether the frame picows holds incomplete (its first bytes *head*, None when not
    seen; *pending* bytes of it received) is a continuation frame of more than
    *allowance* bytes: from its header, or, not seen, once more than *allowance* bytes
    of payload have arrived whatever its header (never a control frame's 131 bytes)."""
    if head is None:
        return pending > _CONTROL_MAX and pending - _HEADER_MAX > allowance
    frame = announced(head)
    return frame is not None and frame[0] == 0 and frame[1] > allowance


class Discard(asyncio.Protocol):
    """What reads a connection after wsguard's close frame (see _close_and_drain):
    bytes are dropped unparsed; the end of the connection still reaches picows. A
    client that keeps sending past ``_DRAIN_BYTES`` is not read any more (it is
    flooding, not closing): the close timeout drops it."""

    __slots__ = ("_inner", "_left", "_transport", "ended", "half_open")

    def __init__(
        self, inner: Any, transport: asyncio.Transport, *, half_open: bool = False
    ) -> None:
        self._inner = inner
        self._transport = transport
        self._left = _DRAIN_BYTES
        # the client's close frame is held (see GuardListener): its end of the stream
        # leaves our side open for the replies still to come, until the close is answered
        self.half_open = half_open
        self.ended = False  # the client ended its side of the stream

    def data_received(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0:
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self.ended = True
        return self.half_open  # else the client closed its side too: close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)


class SocketView:
    """The socket as picows sees it: its descriptor (picows would write small frames with
    send() itself, see PicowsView), and no-op options. uvloop and asyncio already set
    TCP_NODELAY; picows' other calls (TCP_QUICKACK and four getsockopt() for a log line
    nobody reads) cost system calls on every handshake."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def setsockopt(self, *args: Any) -> None:
        return None

    def getsockopt(self, *args: Any) -> int:
        return 0


class PicowsView:
    """The transport as picows sees it. While the listener batches (``_out`` is a list),
    picows' writes join the batch: its 101 response and wsguard's welcome frame leave
    in one send(). A close frame picows sends on its own goes to the listener
    (:meth:`GuardListener.engine_close`). Everything else goes to the real transport.
    (picows writes through the transport only when it reports buffered data; otherwise
    it calls send() on the descriptor: the view always reports one byte.)"""

    __slots__ = ("_listener", "_raw", "_socket")

    def __init__(self, raw: asyncio.Transport, listener: GuardListener, fd: int) -> None:
        self._raw, self._listener, self._socket = raw, listener, SocketView(fd)

    def get_write_buffer_size(self) -> int:
        return 1

    def write(self, data: Any) -> None:
        listener = self._listener
        if len(data) > 1 and data[0] == CLOSE_OP:  # picows writes a frame in one piece
            if not listener.close_sent:
                listener.engine_close(bytes(data))  # picows' own, on a protocol error
                return
            if self._raw.is_closing():
                return  # picows' answer to a frame after the client's close: never sent
        self._put(data)

    def _put(self, data: Any) -> None:
        listener = self._listener
        if listener.batching:
            listener.write_bytes(bytes(data))
        else:
            self._raw.write(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:  # a large data frame: header and payload
            self._put(chunk)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._socket
        if name in ("peername", "sockname"):
            return default  # picows only logs them
        return self._raw.get_extra_info(name, default)

    def close(self) -> None:
        """picows closes after a protocol error it found (a frame over the size limit,
        a bad opcode...) and its close frame: drain like wsguard's own closes do. Not
        while the client's close frame is held: the error was in what followed it, which
        is discarded, and the held close ends the connection."""
        listener = self._listener
        if listener.holding_close:
            return
        listener.write_engine_close()
        if listener.holding_close:  # the client's close frame came before the error
            return
        listener.flush()
        if not listener.drain():
            self._raw.close()

    def abort(self) -> None:
        self._raw.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)
