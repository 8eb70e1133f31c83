"""What the admin listener needs from the node it serves (the App or the ASGI middleware)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from wsguard.config.model import Config
    from wsguard.guard import Guard


class AdminTarget(Protocol):
    """A node with a Guard, its live connections, revocation and readiness."""

    guard: Guard
    config: Config

    @property
    def connections(self) -> dict[str, Any]:
        """Live connections by id (objects with id, identity, subject, client, ...)."""

    @property
    def ready(self) -> tuple[bool, str | None]:
        """Whether the node should get traffic: (ready, reason when not)."""

    async def revoke(self, kind: str, value: str, ttl: float | None = None) -> None:
        """Revoke a token id (``jti``) or a subject (``sub``) on every node."""
