"""A plain Starlette app behind wsguard: an echo WebSocket that knows who is talking.

Run:  WSGUARD_JWT_SECRET=... uvicorn --app-dir examples/asgi starlette_app:app --ws-max-size 8192 \
          --ws-per-message-deflate false
(``--ws-max-size`` = ``limits.max_message_bytes``, so oversized frames are refused by
the server before they are buffered; wsguard checks the size again. No compression, as
``compression = false`` says.)
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsguard import load_config
from wsguard.asgi import WsGuardMiddleware


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"type": "hello", "subject": websocket.user.display_name})
    try:
        while True:
            message = await websocket.receive_json()  # only messages that passed the policy
            await websocket.send_json(
                {"type": "echo", "subject": websocket.user.display_name, "message": message}
            )
    except WebSocketDisconnect:
        pass


async def health(request: object) -> PlainTextResponse:
    return PlainTextResponse("ok")  # HTTP passes through the middleware untouched


inner = Starlette(routes=[Route("/health", health), WebSocketRoute("/ws", echo)])
app = WsGuardMiddleware(inner, config=load_config())
