"""The WebSocket consumer: it only ever sees connections and messages wsguard admitted."""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer


class EchoConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]  # channels is untyped
    """Greets the authenticated subject, then echoes every message.

    ``self.scope["user"]`` is wsguard's ``WsGuardUser`` (``display_name``, ``scopes``,
    ``is_authenticated``); ``self.scope["state"]["wsguard"]`` is the full ``Identity``.
    """

    async def connect(self) -> None:
        await self.accept()
        await self.send_json({"type": "hello", "subject": self.scope["user"].display_name})

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # wsguard already validated it (JSON, schema, scopes, rate); invalid input never
        # gets here: the client got wsguard's error frame instead
        await self.send_json({"type": "echo", "message": content})
