"""Message types of the demo protocol, with strict JSON Schemas (Draft 2020-12).

Plain data, imported by the configuration defaults. ``id`` is an optional
client-chosen correlation id echoed as ``ref`` in error frames.
"""

from __future__ import annotations

from typing import Any

_ID: dict[str, Any] = {
    "oneOf": [
        {"type": "string", "maxLength": 64},
        {"type": "integer", "minimum": 0, "maximum": 2**53 - 1},
    ]
}


def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"type": {"type": "string"}, "id": _ID, **properties},
        "required": ["type", *required],
        "additionalProperties": False,
    }


DEMO_MESSAGE_TYPES: dict[str, dict[str, Any]] = {
    "ping": {"schema": _schema({}, [])},
    "chat": {
        "schema": _schema(
            {
                "room": {"type": "string", "minLength": 1, "maxLength": 64},
                "text": {"type": "string", "minLength": 1, "maxLength": 2000},
            },
            ["text"],
        )
    },
    "data": {
        "schema": _schema(
            {
                "channel": {"type": "string", "minLength": 1, "maxLength": 64},
                "payload": {
                    "type": "object",
                    "maxProperties": 32,
                    "additionalProperties": {
                        "type": ["string", "number", "boolean", "null"],
                        "maxLength": 256,
                    },
                },
            },
            ["channel", "payload"],
        )
    },
    "command": {
        "schema": _schema(
            {
                "name": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,31}$"},
                "args": {
                    "type": "array",
                    "maxItems": 16,
                    "items": {"type": "string", "maxLength": 256},
                },
            },
            ["name"],
        ),
        "scopes": ["admin"],
    },
    "auth": {
        "schema": _schema(
            {"token": {"type": "string", "minLength": 1, "maxLength": 8192}}, ["token"]
        )
    },
}
