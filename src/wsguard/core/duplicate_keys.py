"""Whether a JSON text names the same key twice in one object.

The policy decodes a message once (the last of two equal keys wins, as in most parsers)
and checks what it decoded; where the text itself goes on (to a gateway's backend, to a
raw handler), a parser that keeps the first of two equal keys would read another message
than the one checked. Such texts are refused there.
"""

from __future__ import annotations

import json
from typing import Any

from wsguard.core.decisions import Deliver, Refuse


class _DuplicateKeys(ValueError):
    pass


def _pairs_unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKeys
    return dict(pairs)


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
        ref=ref if isinstance(ref, (str, int)) and not isinstance(ref, bool) else None,
        type=decision.type,
    )
