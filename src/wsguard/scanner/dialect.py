"""How the scan talks to a target it has never seen: found at the baseline, by itself.

Every check needs two things from the endpoint: a *barrier* (send something after a probe and
know when the target has dealt with the probe) and a *liveness* probe (is the connection still
served?). wsguard's demo protocol answers ``{"type": "ping", "id": N}`` with a pong echoing the
id; other servers answer a ping without the id, name a message's kind ``event``, ``action`` or
``op``, wrap fields in ``{"event": ..., "data": {...}}`` (Socket.IO-style), answer the text
``ping`` with ``pong``, or have no application ping at all. :func:`discover` tries these on one
baseline connection, each followed by a WebSocket ping control frame (which every RFC 6455
server answers, so a candidate costs a round trip plus a short grace, not a timeout), and the
first one the endpoint answers becomes the scan's :class:`Dialect`:

* ``echo``: the answer carries the probe's id back: probes are matched by id;
* ``type``: the answer has the pong kind but no id: probes are sequential, matched by kind;
* ``text``: the text ``ping`` is answered ``pong``: sequential;
* ``control``: no application ping: WebSocket ping frames are the barrier, and liveness is
  "still open and still answering them".

``--ping-message`` / ``--pong-type`` override the discovery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Mode = Literal["echo", "type", "text", "control"]

KIND_KEYS = ("type", "event", "action", "op")  # the field naming a message's kind
ID_KEYS = ("id", "ref", "requestId", "request_id", "correlationId", "cid")
NESTS = ("data", "payload", "body", "d", "params")  # where envelopes keep their fields
GRACE = 0.15  # seconds to wait for late answers after a sequential or control-frame barrier


def loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


@dataclass(frozen=True, slots=True)
class Dialect:
    mode: Mode
    key: str = "type"  # the field naming a message's kind in what the scan sends
    data: bool = False  # fields go in {key: kind, "data": {...}}
    template: str | None = None  # the application ping, {id} replaced; None: ping frames
    answer_key: str = "type"  # the field naming the kind in the answer (type mode)
    pong: str = "pong"  # the answer's kind (type mode) or text (text mode)
    error_kinds: tuple[str, ...] = ("error",)
    source: Literal["detected", "given", "assumed"] = "detected"
    note: str = ""  # how it was found (for the report)
    echoes: bool = False  # the endpoint sends every message back as it is

    # -- what to send ------------------------------------------------------------------
    def ping(self, ident: int) -> str | None:
        """The application ping with this id (None in control mode: send a ping frame)."""
        return None if self.template is None else self.template.replace("{id}", str(ident))

    def message(self, kind: str, fields: dict[str, Any] | None = None) -> str:
        """A message of this kind in the endpoint's envelope."""
        body = dict(fields or {})
        value: dict[str, Any] = {self.key: kind, "data": body} if self.data else {self.key: kind}
        if not self.data:
            value.update(body)
        return orjson.dumps(value).decode()

    def filler(self, ident: int) -> str:
        """A small message that makes a valid end for a padded or fragmented message: the
        application ping when there is one (the answer proves it was taken in)."""
        return self.ping(ident) or self.message("wsguard-audit", {"n": ident})

    @property
    def sequential(self) -> bool:
        """Answers cannot be matched to probes by id: one probe at a time."""
        return self.mode != "echo"

    # -- what comes back ---------------------------------------------------------------
    def answer_id(self, text: str) -> str | None:
        """The probe id an answer carries, at the top or one envelope down."""
        value = loads(text)
        if not isinstance(value, dict):
            return None
        for layer in _layers(value):
            for key in ID_KEYS:
                if key in layer and isinstance(layer[key], str | int) and layer[key] != "":
                    return str(layer[key])
        return None

    def answers(self, text: str, ident: str) -> bool:
        """Is this text the answer to the application ping ``ident``?"""
        if self.mode == "echo":
            return self.answer_id(text) == ident
        if self.mode == "text":
            return text.strip().lower() == self.pong
        if self.mode == "type":
            value = loads(text)
            return isinstance(value, dict) and value.get(self.answer_key) == self.pong
        return False

    def is_pong(self, text: str) -> bool:
        """An answer to some application ping (a late one, in sequential modes)."""
        if self.mode == "text":
            return text.strip().lower() == self.pong
        value = loads(text)
        return isinstance(value, dict) and value.get(self.answer_key) == self.pong

    def is_error(self, text: str) -> bool:
        value = loads(text)
        if not isinstance(value, dict):
            return False
        kinds = {k.lower() for k in self.error_kinds}
        for key in {self.key, self.answer_key, *KIND_KEYS}:
            kind = value.get(key)
            if isinstance(kind, str) and (kind.lower() in kinds or kind.lower().endswith("error")):
                return True
        error = value.get("error")
        if error not in (None, False, "", 0):
            return True
        status = value.get("status")
        if isinstance(status, str) and status.lower() in ("error", "fail", "failed", "denied"):
            return True
        return value.get("success") is False or value.get("ok") is False

    def describe(self) -> str:
        if self.mode == "echo":
            how = f"application ping {self.template} answered with its id"
            if self.echoes:
                how += " (the endpoint echoes messages)"
        elif self.mode == "type":
            how = (
                f"application ping {self.template} answered {{{self.answer_key!r}: "
                f"{self.pong!r}}} without the id: probes sequential, matched by "
                f"{self.answer_key}"
            )
        elif self.mode == "text":
            how = f"text ping {self.template!r} answered {self.pong!r}: probes sequential"
        else:
            how = (
                "no application ping answered: WebSocket ping frames are the barrier; liveness "
                "is 'still open and still answering them'"
            )
        note = f" ({self.note})" if self.note else ""
        if self.source == "assumed":
            return f"not detected{note}; assumed: {how}"
        return f"{self.source}: {how}{note}"


def _layers(value: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield value
    for key in NESTS:
        inner = value.get(key)
        if isinstance(inner, dict):
            yield inner


def given(
    ping_message: str | None, pong_type: str | None, error_types: tuple[str, ...]
) -> Dialect | None:
    """The dialect the user set with --ping-message / --pong-type (None: discover)."""
    if ping_message is None and pong_type is None:
        return None
    template = ping_message or '{"type": "ping", "id": "{id}"}'
    value = loads(template.replace("{id}", "1"))
    key = next((k for k in KIND_KEYS if isinstance(value, dict) and k in value), "type")
    data = isinstance(value, dict) and isinstance(value.get("data"), dict)
    if "{id}" in template and pong_type is None:
        mode: Mode = "echo"
    elif not isinstance(value, dict):
        mode = "text"
    else:
        mode = "type"
    return Dialect(
        mode,
        key=key,
        data=data,
        template=template,
        answer_key=key,
        pong=(pong_type or "pong").lower() if mode == "text" else (pong_type or "pong"),
        error_kinds=error_types,
        source="given",
        note="--ping-message" + (" / --pong-type" if pong_type else ""),
    )


@dataclass(frozen=True, slots=True)
class Candidate:
    template: str
    key: str
    data: bool = False


CANDIDATES = (
    Candidate('{"type": "ping", "id": "{id}"}', "type"),
    Candidate('{"event": "ping", "data": {"id": "{id}"}}', "event", data=True),
    Candidate('{"event": "ping", "id": "{id}"}', "event"),
    Candidate('{"action": "ping", "id": "{id}"}', "action"),
    Candidate('{"op": "ping", "id": "{id}"}', "op"),
    Candidate('{"type": "ping", "data": {"id": "{id}"}}', "type", data=True),
    Candidate("ping", ""),
)


@dataclass(slots=True)
class Heard:
    """What came back to one candidate."""

    texts: list[str] = field(default_factory=list)
    pong_frame: bool = False  # the control ping sent after it was answered
    closed: bool = False


def judge_candidate(
    candidate: Candidate,
    ident: str,
    heard: Heard,
    error_types: tuple[str, ...],
    earlier: frozenset[str] = frozenset(),
) -> Dialect | None:
    """The dialect this candidate proves, if the answers prove one. *earlier*: the ids
    of the probes sent before it: a pong carrying one is that probe's late answer."""
    sent = candidate.template.replace("{id}", ident)
    probe = Dialect("echo", key=candidate.key or "type", error_kinds=error_types)
    if not candidate.key:  # the text "ping"
        for text in heard.texts:
            if text.strip().lower() == "pong":
                return Dialect(
                    "text",
                    template="ping",
                    pong="pong",
                    error_kinds=error_types,
                    note="the text 'ping' is answered 'pong'",
                )
        return None
    answers = [t for t in heard.texts if not probe.is_error(t)]
    for text in answers:  # a kind named like a pong, in any envelope key
        value = loads(text)
        if not isinstance(value, dict):
            continue
        for key in (candidate.key, *KIND_KEYS):
            kind = value.get(key)
            if isinstance(kind, str) and "pong" in kind.lower():
                answer_id = probe.answer_id(text)
                if answer_id in earlier:
                    break  # an earlier probe's late answer (a slow handler): not this one's
                with_id = answer_id == ident
                return Dialect(
                    "echo" if with_id else "type",
                    key=candidate.key,
                    data=candidate.data,
                    template=candidate.template,
                    answer_key=key,
                    pong=kind,
                    error_kinds=error_types,
                )
    for text in answers:  # no pong, but the id comes back: an echo (or a broadcast)
        if probe.answer_id(text) == ident:
            return Dialect(
                "echo",
                key=candidate.key,
                data=candidate.data,
                template=candidate.template,
                error_kinds=error_types,
                echoes=text == sent or loads(text) == loads(sent),
                note="no pong: the message itself comes back",
            )
    return None


async def listen(
    session: Any, heard: Heard, ident: bytes, wait: float, *, patient: bool = False
) -> None:
    """Collect texts until the ping frame ``ident`` is answered (plus a grace for servers
    that answer ping frames before messages queued to their handler), or ``wait``.
    *patient*: after the ping frame's answer, wait (up to ``wait``) for a first message,
    then the grace."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        event = await session.next_event(max(0.0, deadline - loop.time()))
        if event is None:
            return
        if event.kind == "close":
            heard.closed = True
            return
        if event.kind == "pong" and event.data == ident and not heard.pong_frame:
            heard.pong_frame = True
            if not patient or heard.texts:
                deadline = min(deadline, loop.time() + GRACE + 0.05)
        elif event.kind in ("text", "binary"):
            heard.texts.append(event.text)
            if patient and heard.pong_frame:
                deadline = min(deadline, loop.time() + GRACE + 0.05)
