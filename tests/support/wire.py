"""Raw sockets speaking HTTP and WebSocket by hand: requests and frames the client
libraries would never send, and a client that does only what the test tells it to."""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from conftest import RunningServer, make_token, status_of, upgrade_request

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# -- HTTP --------------------------------------------------------------------------------


def raw_request(*lines: str | bytes) -> bytes:
    """An HTTP request from raw lines (bytes kept as they are), ended by an empty line."""
    out = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\r\n" for ln in lines)
    return out + b"\r\n"


WS_HEADERS = (
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
)


def read_head(sock: socket.socket) -> bytes:
    """Read an HTTP response head (up to the blank line)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def reset_close(sock: socket.socket) -> None:
    """Close with a TCP RST (no FIN, no close frame): the client vanished."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def open_socket(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if data:
        sock.sendall(data)
    return sock


def response_head(port: int, data: bytes) -> bytes:
    """Send *data*; the response head the server answers (up to the blank line)."""
    with open_socket(port, data) as sock:
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buffer += chunk
        return buffer.partition(b"\r\n\r\n")[0]


# -- WebSocket frames --------------------------------------------------------------------


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, length: int | None = None
) -> bytes:
    """A masked client frame; *length* may lie about the payload size."""
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | opcode])
    if n < 126:
        head.append(0x80 | n)
    elif n < 1 << 16:
        head.append(0x80 | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(0x80 | 127)
        head += n.to_bytes(8, "big")
    mask = os.urandom(4)
    return bytes(head) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A hand-rolled WebSocket client over a plain socket (server frames are unmasked)."""

    def __init__(self, server: RunningServer, token: str, *, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        self.sock.sendall(upgrade_request(token=token))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, f"server closed during the handshake: {head!r}"
            head += chunk
        head, _, self.buf = head.partition(b"\r\n\r\n")
        assert status_of(head) == 101, head
        self.pings = 0
        self.close_payload = b""
        self.texts: list[dict[str, Any]] = []

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the TCP connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self) -> tuple[int, bytes]:
        b0, b1 = self._read(2)
        assert not b1 & 0x80, "server frames must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read(8), "big")
        return b0 & 0x0F, self._read(n)

    def _pump(self) -> int:
        """Read one frame; answer pings; queue text; return the opcode."""
        opcode, payload = self.read_frame()
        if opcode == OP_PING:
            self.pings += 1
            self.send(frame(OP_PONG, payload))
        elif opcode == OP_TEXT:
            self.texts.append(json.loads(payload))
        elif opcode == OP_CLOSE:
            self.close_payload = payload
        return opcode

    def recv_json(self) -> dict[str, Any]:
        while not self.texts:
            assert self._pump() != OP_CLOSE, f"closed: {self.close_payload!r}"
        return self.texts.pop(0)

    def wait_pings(self, count: int) -> None:
        """Block until *count* more server pings have arrived."""
        target = self.pings + count
        while self.pings < target:
            assert self._pump() != OP_CLOSE, f"closed: {self.close_payload!r}"

    def read_close(self) -> int:
        """Read frames until the server's close frame; return its code."""
        while self._pump() != OP_CLOSE:
            pass
        assert len(self.close_payload) >= 2
        return int.from_bytes(self.close_payload[:2], "big")


def raw_welcomed(server: RunningServer, token: str | None = None) -> RawClient:
    client = RawClient(server, token or make_token())
    assert client.recv_json()["type"] == "welcome"
    return client


def ping_frame(ident: str) -> bytes:
    return frame(OP_TEXT, json.dumps({"type": "ping", "id": ident}).encode())


def upgrade_answer(head: bytes) -> bytes:
    """The ``101`` a server answers the upgrade request *head* with (RFC 6455 4.2.2: its
    ``Sec-WebSocket-Accept`` from the request's key), for raw servers in tests."""
    import base64
    import hashlib

    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
