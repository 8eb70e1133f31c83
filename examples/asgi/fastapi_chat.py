"""A FastAPI chat room behind wsguard.

Run:  WSGUARD_JWT_SECRET=... uvicorn --app-dir examples/asgi fastapi_chat:app --ws-max-size 8192 \
          --ws-per-message-deflate false

Clients connect to ``/chat`` with a token (``Authorization: Bearer`` or the
``token.<jwt>`` subprotocol) and send ``{"type": "chat", "room": "...", "text": "..."}``;
wsguard has checked the token, the Origin, the limits, the schema and the scopes
before the endpoint sees a message.
"""

from __future__ import annotations

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from wsguard import load_config
from wsguard.asgi import WsGuardMiddleware

api = FastAPI()
members: set[WebSocket] = set()


@api.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@api.websocket("/chat")
async def chat(websocket: WebSocket) -> None:
    await websocket.accept()
    subject = websocket.user.display_name
    members.add(websocket)
    try:
        while True:
            message = await websocket.receive_json()
            if message.get("type") != "chat":
                continue
            out = {
                "type": "broadcast",
                "from": subject,
                "room": message.get("room"),
                "text": message.get("text"),
            }
            for member in list(members):
                try:
                    await member.send_json(out)
                except Exception:  # a member that went away
                    members.discard(member)
    except WebSocketDisconnect:
        pass
    finally:
        members.discard(websocket)


app = WsGuardMiddleware(api, config=load_config())
