"""Whether a JSON text names the same key twice in one object.

The policy decodes a message once (the last of two equal keys wins, as in most parsers)
and checks what it decoded; where the text itself goes on (to a gateway's backend, to a
raw handler), a parser that keeps the first of two equal keys would read another message
than the one checked. Such texts are refused there.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from wsguard.core.decisions import Deliver, Refuse, valid_ref


class _DuplicateKeys(ValueError):
    pass


def _pairs_unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKeys
    return dict(pairs)


#: ``"type"`` as a key (followed by its colon), not inside a string (an escaped quote).
_TYPE_KEY = re.compile(r'(?<!\\)"type"\s*:')
_TYPE_KEY_BYTES = re.compile(rb'(?<!\\)"type"\s*:')
#: An escape that could spell a letter of ``type`` in a key (``\u0074ype``).
_TYPE_ESCAPE = re.compile(r"\\u00(?:74|79|70|65)", re.IGNORECASE)
_TYPE_ESCAPE_BYTES = re.compile(rb"\\u00(?:74|79|70|65)", re.IGNORECASE)


def names_type_twice(data: str | bytes, message: Any) -> bool:
    """Whether a JSON text's top-level object names ``type`` twice: the policy checked the
    type it decoded (the last), a parser keeping the first would read another type, with
    other scopes. *message* is what the policy decoded from *data*.

    Cheap: a text with ``"type"`` once and no escape is done with; otherwise its
    ``"type"`` keys are counted (a regular expression) and compared with those of the
    decoded message written again (msgspec): equal, no key was named twice anywhere. Only
    when they differ, or an escape could spell one, is the text parsed again keeping every
    pair."""
    if isinstance(data, str):
        named = data.count('"type"')
        if named < 2 and "\\u" not in data:
            return False
        escaped = _TYPE_ESCAPE.search(data) is not None
        keys = data.count('"type":')  # a key, never inside a string (its quote escaped)
        if keys != named:  # '"type" :', or "type" as a value: the expression tells
            keys = len(_TYPE_KEY.findall(data))
    else:
        named = data.count(b'"type"')
        if named < 2 and b"\\u" not in data:
            return False
        escaped = _TYPE_ESCAPE_BYTES.search(data) is not None
        keys = data.count(b'"type":')
        if keys != named:
            keys = len(_TYPE_KEY_BYTES.findall(data))
    if not escaped and (keys < 2 or keys == msgspec.json.encode(message).count(b'"type":')):
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
