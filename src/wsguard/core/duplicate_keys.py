"""Whether a JSON text names the same key twice in one object.

The policy decodes a message once (the last of two equal keys wins, as in most parsers)
and checks what it decoded; where the text itself goes on (to a gateway's backend, to a
raw handler), a parser that keeps the first of two equal keys would read another message
than the one checked. Such texts are refused there.
"""

from __future__ import annotations

import json
from typing import Any

from wsguard.core.decisions import Deliver, Refuse, valid_ref


class _DuplicateKeys(ValueError):
    pass


def _pairs_unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKeys
    return dict(pairs)


def names_type_twice(data: str | bytes) -> bool:
    """Whether a JSON text's top-level object names ``type`` twice: the policy checked the
    type it decoded (the last), a parser keeping the first would read another type, with
    other scopes. Cheap unless the text holds ``"type"`` twice or an escape."""
    if isinstance(data, str):
        if data.count('"type"') < 2 and "\\u" not in data:
            return False
    elif data.count(b'"type"') < 2 and b"\\u" not in data:
        return False
    objects: list[list[tuple[str, Any]]] = []

    def keep(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append(pairs)
        return dict(pairs)

    try:
        json.loads(data, object_pairs_hook=keep)  # the outermost object comes last
    except ValueError:
        return False  # not JSON: the policy has refused it already
    return bool(objects) and sum(key == "type" for key, _ in objects[-1]) > 1


def has_duplicate_keys(data: str | bytes) -> bool:
    """Whether a JSON text has an object with the same key twice (any depth)."""
    try:
        json.loads(data, object_pairs_hook=_pairs_unique)
    except _DuplicateKeys:
        return True
    except ValueError:
        return False  # not JSON: the policy has refused it already
    return False


def duplicate_keys_refusal(decision: Deliver) -> Refuse:
    """The answer to a message *decision* delivered that names a key twice."""
    ref = decision.message.get("id")
    return Refuse(
        "invalid_message",
        "Message has duplicate keys.",
        ref=valid_ref(ref),
        type=decision.type,
    )
