"""A tutorial-grade FastAPI chat under uvicorn: a DELIBERATELY VULNERABLE target of
``wsguard audit``'s tests (tests/test_audit_unseen_servers.py). Never deploy it.

It is written the way FastAPI tutorials write a WebSocket chat (a ``ConnectionManager``,
``receive_text`` in a loop, ``jwt.decode``) and speaks its own protocol, not wsguard's: every
message is ``{"event": ..., "data": {...}}``; ``{"event": "ping", "data": X}`` is answered
``{"event": "pong", "data": X}``; errors are ``{"event": "error", "data": {"detail": ...}}``.

Its real defects, each a class the scanner must find (the checks that find it in brackets):

* ``expired_accepted`` [auth.expired]: ``jwt.decode(..., options={"verify_exp": False})``.
* ``exp_not_required`` [auth.no_exp]: PyJWT's default, a token without ``exp`` is fine.
* ``outlives_token`` [token.expiry]: nothing closes a socket when its token expires.
* ``origin_prefix_match`` [origin.lookalike]: ``origin.startswith("http://localhost")``.
* ``privileged_processed`` [authz.privileged]: ``admin`` events run for any user ("the
  admin page is only linked for admins").
* ``unhandled_exceptions`` [malformed.binary, malformed.non_object, malformed.nesting]: a
  binary frame (``receive_text``), JSON that is not an object (``.get`` on a list), or 3000
  nested arrays (``RecursionError``) kill the handler and drop the connection.
* ``no_size_limit`` [size.limit, compression]: uvicorn's default ``ws_max_size`` (16 MiB),
  and permessage-deflate on: 16 MiB messages, or a 4 KiB deflate bomb, are taken in.
* ``no_rate_limit`` [flood.rate_limit]: every message is processed, however many.
* ``no_connection_limit`` [conns.limit]: any number of connections from one address.
* ``exception_disclosure`` [disclosure.errors]: a JSON error is answered with ``repr(exc)``.
* ``log_injection`` [logs.injection]: raw messages go to the log with ``logger.info``.
* ``slow_handshake`` [handshake.timeout]: uvicorn never times out a request head that
  trickles in.

What it gets right (the scanner must not FAIL these): signatures are verified with the
algorithm pinned (``auth.signature``, ``auth.alg_none``), a foreign or ``null`` Origin is
refused before the upgrade, invalid UTF-8 closes 1007, uvicorn pings idle connections (every
2 s here, so the test is quick; 20 s by default).

Usage: ``python fastapi_chat.py --secret S --log FILE [--port 0]``; prints
``listening on 127.0.0.1:PORT`` once it is bound (connections wait until uvicorn serves).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
from typing import Any

import jwt
import uvicorn
from fastapi import FastAPI, Query, WebSocket, WebSocketDisconnect, status

SECRET = "change-me"  # set by --secret
log = logging.getLogger("chat")
app = FastAPI()


class ConnectionManager:
    def __init__(self) -> None:
        self.active: list[WebSocket] = []

    async def connect(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.active.append(websocket)

    def disconnect(self, websocket: WebSocket) -> None:
        if websocket in self.active:
            self.active.remove(websocket)

    async def broadcast(self, message: dict[str, Any]) -> None:
        for connection in list(self.active):
            await connection.send_json(message)


manager = ConnectionManager()


def current_user(token: str) -> dict[str, Any]:
    # "verify_exp": False so users are not logged out in the middle of a chat
    return dict(jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False}))


@app.websocket("/ws")
async def chat(websocket: WebSocket, token: str | None = Query(default=None)) -> None:
    origin = websocket.headers.get("origin")
    if origin is not None and not origin.startswith("http://localhost"):
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION)
        return
    header = websocket.headers.get("authorization", "")
    if header.startswith("Bearer "):
        token = header[len("Bearer ") :]
    if not token:
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION)
        return
    try:
        user = current_user(token)
    except jwt.InvalidTokenError:
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION)
        return
    await manager.connect(websocket)
    log.info("%s connected", user.get("sub"))
    try:
        while True:
            text = await websocket.receive_text()
            log.info("%s: %s", user.get("sub"), text)
            try:
                message = json.loads(text)
            except json.JSONDecodeError as exc:
                await websocket.send_json({"event": "error", "data": {"detail": repr(exc)}})
                continue
            event = message.get("event")
            data = message.get("data") or {}
            if event == "ping":
                await websocket.send_json({"event": "pong", "data": data})
            elif event == "chat":
                text = str(data.get("text", ""))
                chat = {"from": user.get("sub"), "text": text}
                await manager.broadcast({"event": "chat", "data": chat})
            elif event == "admin":  # the admin page is only linked for admins
                result = {"done": data.get("command"), "by": user.get("sub")}
                await websocket.send_json({"event": "admin_result", "data": result})
            else:
                detail = {"detail": f"unknown event {event}"}
                await websocket.send_json({"event": "error", "data": detail})
    except WebSocketDisconnect:
        pass
    finally:
        manager.disconnect(websocket)
        log.info("%s disconnected", user.get("sub"))


async def main() -> None:
    global SECRET
    parser = argparse.ArgumentParser()
    parser.add_argument("--secret", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    SECRET = args.secret
    logging.basicConfig(
        filename=args.log, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    print(f"listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", ws_ping_interval=2.0, ws_ping_timeout=2.0)
    await uvicorn.Server(config).serve(sockets=[sock])


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
