"""The authenticated identity that travels with a connection."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is on the other end, as established at the handshake.

    ``scopes`` merges the configured scope/role claims. ``expires_at`` is the
    token's ``exp`` (Unix seconds) or None when the token has none.
    """

    subject: str
    scopes: frozenset[str] = frozenset()
    token_id: str | None = None
    expires_at: float | None = None
    method: str = "jwt"
    claims: Mapping[str, Any] = field(default_factory=lambda: NO_CLAIMS, repr=False, compare=False)

    def has_scopes(self, required: frozenset[str]) -> bool:
        return required <= self.scopes
