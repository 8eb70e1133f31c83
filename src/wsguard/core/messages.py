"""The message policy: every frame in, one decision out, never an exception.

Per message, in order: rate limits (every frame counts, refused or not),
frame kind (binary refused unless allowed), JSON parsing with a compiled parser,
structural bounds (depth, string length, keys, number size), the type
allowlist, authorization (scopes per type), the signature (signed types) or the
replay window's nonce and timestamp (types with ``replay``), the type's JSON
Schema, and the in-band ``auth`` refresh. Violations (rate, invalid, forbidden,
signature, replay) spend a budget that decays over time; a client past it is
closed with 1008. A nonce still to be recorded (cluster-wide, in the store) leaves
with the ``Deliver`` decision; the Session records it.

State is per connection (:class:`ConnectionState`) or per subject on this node
(:class:`SubjectLimits`); nothing here does I/O.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
import msgspec
import orjson

from wsguard.config.demo_types import DEMO_MESSAGE_TYPES
from wsguard.config.model import Config, MessageTypeConfig, ReplayConfig
from wsguard.core.auth import AuthFailure, TokenVerifier
from wsguard.core.decisions import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_UNSUPPORTED_DATA,
    Close,
    Deliver,
    MessageDecision,
    Reauthenticate,
    Refuse,
    valid_ref,
)
from wsguard.core.duplicate_keys import has_duplicate_keys
from wsguard.core.identity import Identity
from wsguard.core.integrity import ENVELOPE_FIELDS, SignatureVerifier, Verified, replay_key
from wsguard.core.ratelimit import rates, spend

# 19 digits in a row (an integer that may not fit in 64 bits): every digit mapped to "0"
# and everything else to " ", then a substring search
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_NINETEEN_DIGITS = b"0" * 19
_NON_DIGITS = bytes(i for i in range(256) if not 0x30 <= i <= 0x39)
# a JSON string token with its escapes (for stripping strings before counting brackets);
# an unclosed one runs to the end of the message. Every match attempt that starts at a
# quote succeeds (possessive, no backtracking), so stripping is linear in the message
# whatever it holds (a pattern that fails at an unclosed quote is retried at each later
# quote: quadratic, seconds for a hostile 64 KiB frame)
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_CONTAINER_TYPES = frozenset({dict, list})  # what msgspec decodes objects and arrays to
# schema errors are described (keyword, JSON pointer) for messages of fewer values
_DESCRIBED_VALUES = 64
# msgspec decodes the demo messages ~25% faster than orjson (benchmarks/json_parsers.py);
# orjson encodes faster, so outgoing frames use orjson.
_decode = msgspec.json.Decoder().decode
_MAX_SAFE_INT = 2**63
#: The nonce of a type with a replay window: 8 to 128 unreserved URI characters (a UUID,
#: a ULID, base64url and hex all fit).
_REPLAY_NONCE = re.compile(r"[A-Za-z0-9._~-]{8,128}")


@dataclass(slots=True)
class SubjectLimits:
    """Message and byte buckets shared by one subject's connections on this node (their
    theoretical arrival times: see :mod:`wsguard.core.ratelimit`)."""

    msg_tat: float = 0.0
    vol_tat: float = 0.0
    connections: int = 0
    violations: float = 0.0
    violations_at: float = 0.0


@dataclass(slots=True)
class ConnectionState:
    """Everything the message policy remembers about one connection."""

    identity: Identity
    subject: SubjectLimits
    msg_tat: float = 0.0  # the connection's message and byte buckets
    vol_tat: float = 0.0
    violations: float = 0.0
    violations_at: float = 0.0
    received: int = 0
    last_data_at: float = 0.0
    session_key: bytes | None = None
    # the connection, for the audit lines of a refused refresh (the host's own strings)
    connection_id: str | None = None
    client: str | None = None


@dataclass(frozen=True, slots=True)
class _TypePolicy:
    scopes: frozenset[str]
    binary: bool
    validator: Any  # jsonschema_rs validator or None
    signed: bool = False
    replay: ReplayConfig | None = None
    #: nothing but scopes and the schema to check (not signed, no replay window, not
    #: ``auth``): such a message that passes them is delivered from the fast lane
    plain: bool = False


def _compile_schema(name: str, spec: MessageTypeConfig) -> Any:
    schema = spec.schema_
    if spec.schema_file is not None:
        from wsguard.errors import ConfigError

        try:
            schema = orjson.loads(spec.schema_file.expanduser().read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ConfigError(f"messages.types.{name}.schema_file", str(exc)) from None
    if schema is None:
        return None
    try:
        return jsonschema_rs.Draft202012Validator(schema, validate_formats=True)
    except (ValueError, jsonschema_rs.ValidationError) as exc:
        from wsguard.errors import ConfigError

        raise ConfigError(f"messages.types.{name}.schema", f"invalid JSON Schema: {exc}") from None


def _ref_of(raw: bytes) -> str | int | None:
    """Best-effort ``id`` of a message that is refused before full processing."""
    try:
        message = _decode(raw)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    return valid_ref(message.get("id")) if isinstance(message, dict) else None


_OUTSIDE_WINDOW = "Message timestamp is outside the replay window."

#: The type of every delivered message with ``messages.format = "opaque"``.
OPAQUE_TYPE = "opaque"
_NO_MESSAGE: dict[str, Any] = {}


def _pointer(path: Iterable[str | int]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _walk(
    message: dict[str, Any],
    max_depth: int,
    max_keys: int,
    max_string: int,
    leaves: bool,
    brackets: int,
) -> str | None:
    """The structural bounds of a decoded message, in one walk over its containers.

    With *leaves* False (strings and numbers are proven short from the raw bytes), a
    container's values are looked at only to find the containers among them, in C
    (``set(map(type, ...))``), and not at all once as many containers were found as the
    raw bytes have opening brackets (*brackets*, which also counts any inside strings).
    """
    stack: list[tuple[Any, int]] = [(message, 1)]
    found = 1
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return "Message is nested too deeply."
        if len(node) > max_keys:
            return (
                "Message has too many keys."
                if type(node) is dict
                else "Message has too many items."
            )
        values = node.values() if type(node) is dict else node
        if leaves:
            if type(node) is dict and max(map(len, node), default=0) > max_string:
                return "Message has a string that is too long."
            for value in values:
                kind = type(value)
                if kind is dict or kind is list:
                    stack.append((value, depth + 1))
                elif kind is str:
                    if len(value) > max_string:
                        return "Message has a string that is too long."
                elif kind is int and not -_MAX_SAFE_INT <= value < _MAX_SAFE_INT:
                    return "Message has a number that is too large."
            continue
        if found >= brackets:
            continue  # every container is on the stack already: only their sizes are left
        kinds = set(map(type, values))
        if dict in kinds or list in kinds:
            children = [(v, depth + 1) for v in values if type(v) in _CONTAINER_TYPES]
            found += len(children)
            stack.extend(children)
    return None


class MessagePolicy:
    """Evaluates incoming frames for connections on this node."""

    def __init__(
        self,
        config: Config,
        verifier: TokenVerifier,
        signatures: SignatureVerifier | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.verifier = verifier
        self.signatures = signatures
        self._clock = clock  # Unix time: the first check of a replay window
        messages, limits = config.messages, config.limits
        types = dict(messages.types)
        if "auth" not in types:  # token refresh is always understood
            types["auth"] = MessageTypeConfig.model_validate(DEMO_MESSAGE_TYPES["auth"])
        self._types = {
            name: _TypePolicy(
                frozenset(spec.scopes),
                spec.binary,
                _compile_schema(name, spec),
                spec.signed,
                spec.replay,
                not spec.signed and spec.replay is None and name != "auth",
            )
            for name, spec in types.items()
        }
        self._binary_allowed = messages.binary or any(t.binary for t in self._types.values())
        self._opaque = messages.format == "opaque"
        if self._opaque:  # message types are not used: only messages.binary says
            self._binary_allowed = messages.binary
        self._max_depth = messages.max_depth
        self._max_string = messages.max_string_length
        self._max_keys = messages.max_keys
        self._max_containers = messages.max_containers
        msg_burst = float(limits.message_burst)
        byte_burst = float(
            max(
                limits.max_message_bytes,
                min(limits.bytes_per_minute, limits.max_message_bytes * limits.message_burst),
            )
        )
        # a connection's buckets, and its subject's (twice the bursts: a subject may have
        # several connections)
        self._rates = rates(
            limits.messages_per_minute / 60.0,
            msg_burst,
            limits.bytes_per_minute / 60.0,
            byte_burst,
        )
        self._subject_rates = rates(
            limits.subject_messages_per_minute / 60.0,
            msg_burst * 2,
            limits.subject_bytes_per_minute / 60.0,
            byte_burst * 2,
        )
        self._budget = float(limits.violation_budget)
        self._decay = limits.violation_decay_seconds
        self._subjects: dict[str, SubjectLimits] = {}
        self._next_prune = 1024
        #: Told (state, reason, detail) of every refused ``auth`` refresh (the audit log).
        self.on_refresh_refused: Callable[[ConnectionState, str, str, str | None], None] | None = (
            None
        )

    # -- connection lifecycle -------------------------------------------------

    def open(self, identity: Identity, now: float) -> ConnectionState:
        """Create the state of a newly admitted connection."""
        subject = self._subjects.get(identity.subject)
        if subject is None:
            subject = SubjectLimits()
            self._subjects[identity.subject] = subject
        subject.connections += 1
        self._prune_subjects(now)
        session_key = secrets.token_bytes(32) if self.config.signing.session_keys else None
        # A reconnect inherits the subject's decayed violation score: closing and
        # reopening must not reset the budget (nor the subject's buckets).
        return ConnectionState(
            session_key=session_key,
            identity=identity,
            subject=subject,
            violations=self._decayed(subject.violations, subject.violations_at, now),
            violations_at=now,
            last_data_at=now,
        )

    def _decayed(self, score: float, since: float, now: float) -> float:
        return max(0.0, score - (now - since) / self._decay)

    def closed(self, state: ConnectionState, now: float | None = None) -> None:
        """Forget a connection. The subject's buckets and violation score outlive it
        until they have recovered, so reconnecting does not reset any limit."""
        subject = state.subject
        subject.connections -= 1
        at = state.violations_at if now is None else now
        score = self._decayed(state.violations, state.violations_at, at)
        if score >= self._decayed(subject.violations, subject.violations_at, at):
            subject.violations, subject.violations_at = score, at

    def _prune_subjects(self, now: float) -> None:
        """Drop subjects with no connection whose limits have fully recovered."""
        if len(self._subjects) < self._next_prune:
            return
        self._subjects = {
            name: s
            for name, s in self._subjects.items()
            if s.connections > 0
            or s.msg_tat > now
            or s.vol_tat > now
            or self._decayed(s.violations, s.violations_at, now) > 0
        }
        self._next_prune = max(1024, 2 * len(self._subjects))

    def type_names(self) -> list[str]:
        return [OPAQUE_TYPE] if self._opaque else sorted(self._types)

    # -- violations -----------------------------------------------------------

    def violation(self, state: ConnectionState, now: float, weight: float = 1.0) -> bool:
        """Spend the violation budget; True when the connection must be closed."""
        elapsed = now - state.violations_at
        state.violations = max(0.0, state.violations - elapsed / self._decay) + weight
        state.violations_at = now
        return state.violations > self._budget

    def refuse(self, state: ConnectionState, now: float, refusal: Refuse) -> MessageDecision:
        """*refusal* as the answer to a message, spending the violation budget: the
        refusal, or the close when the budget is spent (for hosts that refuse a message
        the policy passed, as they refuse their own way)."""
        return self._refuse(state, now, refusal)

    def _refuse(self, state: ConnectionState, now: float, refusal: Refuse) -> MessageDecision:
        if self.violation(state, now):
            return Close(CLOSE_POLICY_VIOLATION, "policy violation", cause=refusal.code)
        return refusal

    # -- frames -----------------------------------------------------------------

    def control_frame(self, state: ConnectionState, now: float, size: int) -> Close | None:
        """Count a ping/pong from the client; a ping flood is a flood."""
        return self._charge(state, now, max(size, 1))

    def fragment(self, state: ConnectionState, now: float) -> Close | None:
        """Count a continuation frame from the client: one message of the rates, like a
        ping (its bytes are counted with its whole message, in :meth:`evaluate`), so
        every data frame costs a message and a flood of fragments is a flood."""
        return self._charge(state, now, 0)

    def _charge(self, state: ConnectionState, now: float, cost: int) -> Close | None:
        """Take one message (and *cost* bytes) of the connection's and the subject's rates;
        a frame over them spends the violation budget (no error frame: not a message)."""
        wait = self._spend(state, now, cost)
        if wait > 0 and self.violation(state, now):
            return Close(CLOSE_POLICY_VIOLATION, "policy violation", cause="rate_limited")
        return None

    def _spend(self, state: ConnectionState, now: float, cost: int) -> float:
        """One message and *cost* bytes from the connection's buckets, then its subject's
        (the first refusal stops): 0.0, or the seconds to wait."""
        return spend(state, now, self._rates, cost) or spend(
            state.subject, now, self._subject_rates, cost
        )

    def evaluate(self, state: ConnectionState, data: str | bytes, now: float) -> MessageDecision:
        """Decide about one complete data message. Never raises for any input."""
        try:
            return self._evaluate(state, data, now)
        except Exception:  # pragma: no cover - a bug; fail closed, never crash the server
            return Close(1011, "internal error", cause="policy_error")

    def _evaluate(self, state: ConnectionState, data: str | bytes, now: float) -> MessageDecision:
        text = isinstance(data, str)
        raw = data.encode() if isinstance(data, str) else data
        size = len(raw)
        state.received += 1
        state.last_data_at = now
        wait = self._spend(state, now, size)
        if wait > 0:
            refusal = Refuse(
                "rate_limited", "Too many messages.", ref=_ref_of(raw), retry_after=wait
            )
            return self._refuse(state, now, refusal)
        if not text and not self._binary_allowed:
            return Close(CLOSE_UNSUPPORTED_DATA, "binary frames not accepted", cause="binary")
        if self._opaque:  # a gateway in front of a non-JSON protocol: size and rates only
            return Deliver(OPAQUE_TYPE, _NO_MESSAGE, size)
        brackets = raw.count(b"{") + raw.count(b"[")  # objects and arrays, at most
        if brackets > self._max_containers and self._containers(raw):
            # refused from a count of the raw bytes, before decoding allocates them all
            return self._refuse(
                state,
                now,
                Refuse("invalid_message", "Message has too many objects and arrays."),
            )
        try:
            message = _decode(raw)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return self._refuse(state, now, Refuse("invalid_json", "Message is not valid JSON."))
        if type(message) is not dict:
            return self._refuse(
                state, now, Refuse("invalid_message", "Message must be a JSON object.")
            )
        problem = self._bounds(raw, message, brackets)
        if problem is None:
            # the fast lane: a message of a plain type that passes its scopes and schema
            kind = message.get("type")
            policy = self._types.get(kind) if type(kind) is str else None
            if (
                policy is not None
                and policy.plain
                and (text or policy.binary or self.config.messages.binary)
                and (not policy.scopes or policy.scopes <= state.identity.scopes)
                and (policy.validator is None or policy.validator.is_valid(message))
            ):
                return Deliver(kind, message, size)  # type: ignore[arg-type]
        return self._checked(state, data, raw, message, problem, now)

    def _checked(
        self,
        state: ConnectionState,
        data: str | bytes,
        raw: bytes,
        message: dict[str, Any],
        problem: str | None,
        now: float,
    ) -> MessageDecision:
        """Every check after decoding, in order, with the refusal each one gives: what a
        message that is not delivered from the fast lane goes through."""
        size = len(raw)
        ref = valid_ref(message.get("id"))
        if problem is not None:
            return self._refuse(state, now, Refuse("invalid_message", problem, ref=ref))
        kind = message.get("type")
        if not isinstance(kind, str):
            return self._refuse(
                state,
                now,
                Refuse(
                    "invalid_message", "Field 'type' must be a string.", ref=ref, pointer="/type"
                ),
            )
        policy = self._types.get(kind)
        if policy is None:
            return self._refuse(
                state, now, Refuse("unknown_type", "Unknown message type.", ref=ref)
            )
        if not isinstance(data, str) and not (policy.binary or self.config.messages.binary):
            return Close(CLOSE_UNSUPPORTED_DATA, "binary frames not accepted", cause="binary")
        if policy.scopes and not policy.scopes <= state.identity.scopes:
            return self._refuse(
                state,
                now,
                Refuse("forbidden", "Not allowed to send this message type.", ref=ref, type=kind),
            )
        verified: Verified | None = None
        if (policy.signed or policy.replay is not None) and has_duplicate_keys(raw):
            # a signature (RFC 8785: I-JSON only) or a nonce holds for one reading of the
            # text; with a key twice, a parser keeping the first value reads another one
            return self._refuse(
                state,
                now,
                Refuse("invalid_message", "Message has duplicate keys.", ref=ref, type=kind),
            )
        if policy.signed:
            outcome = self._verify_signature(state, message)
            if isinstance(outcome, str):
                text = (
                    "Message signature is too old."
                    if outcome == "stale"
                    else ("Missing or invalid message signature.")
                )
                return self._refuse(state, now, Refuse(outcome, text, ref=ref, type=kind))
            verified = outcome
            message = {k: v for k, v in message.items() if k not in ENVELOPE_FIELDS}
        elif policy.replay is not None:
            checked = self._check_replay(state, policy.replay, message, ref, kind)
            if isinstance(checked, Refuse):
                return self._refuse(state, now, checked)
            verified = checked
        if policy.validator is not None and not policy.validator.is_valid(message):
            return self._refuse(state, now, self._schema_refusal(policy, message, raw, ref, kind))
        if kind == "auth":
            return self._reauthenticate(state, now, message, ref)
        return Deliver(kind, message, size, verified)

    def _verify_signature(self, state: ConnectionState, message: dict[str, Any]) -> Verified | str:
        if self.signatures is None:
            return "bad_signature"
        return self.signatures.check(message, state.identity.subject, state.session_key)

    def _check_replay(
        self,
        state: ConnectionState,
        replay: ReplayConfig,
        message: dict[str, Any],
        ref: str | int | None,
        kind: str,
    ) -> Verified | Refuse:
        """The replay window of an unsigned type: a well-formed nonce, a timestamp (Unix
        seconds) within the window on this node's clock. The nonce is recorded later, by
        the store, which judges the window again on its own clock."""
        nonce = message.get(replay.nonce_field)
        if type(nonce) is not str or _REPLAY_NONCE.fullmatch(nonce) is None:
            return Refuse(
                "invalid_message",
                "Invalid nonce (8 to 128 letters, digits or - . _ ~).",
                ref=ref,
                pointer=_pointer((replay.nonce_field,)),
                type=kind,
            )
        stamp = message.get(replay.timestamp_field)
        if type(stamp) is not int and type(stamp) is not float:  # bool is not a number here
            return Refuse(
                "invalid_message",
                "Invalid timestamp (a number: Unix time in seconds).",
                ref=ref,
                pointer=_pointer((replay.timestamp_field,)),
                type=kind,
            )
        window = replay.window_seconds
        if not abs(self._clock() - stamp) <= window:
            return Refuse("stale", _OUTSIDE_WINDOW, ref=ref, type=kind)
        key = replay_key(state.identity.subject, kind, nonce)
        return Verified(nonce_key=key, timestamp=float(stamp), window=window)

    def replayed(
        self, state: ConnectionState, now: float, ref: Any, message_type: str | None = None
    ) -> MessageDecision:
        """The nonce of a verified message was seen before within the window."""
        refusal = Refuse(
            "replayed", "Message was already received.", ref=valid_ref(ref), type=message_type
        )
        return self._refuse(state, now, refusal)

    def stale(
        self, state: ConnectionState, now: float, ref: Any, message_type: str | None = None
    ) -> MessageDecision:
        """The message's timestamp is outside the window on the store's clock."""
        policy = self._types.get(message_type) if message_type is not None else None
        text = (
            _OUTSIDE_WINDOW
            if policy is not None and policy.replay is not None
            else "Message signature is too old."
        )
        refusal = Refuse("stale", text, ref=valid_ref(ref), type=message_type)
        return self._refuse(state, now, refusal)

    def unavailable(
        self, state: ConnectionState, now: float, ref: Any, message_type: str | None = None
    ) -> MessageDecision:
        """A check this message needs (a shared nonce store) cannot answer now."""
        refusal = Refuse(
            "unavailable",
            "Try again shortly.",
            ref=valid_ref(ref),
            retry_after=1.0,
            type=message_type,
        )
        return refusal

    def rate_limited(
        self,
        state: ConnectionState,
        now: float,
        ref: Any,
        retry_after: float,
        message_type: str | None = None,
    ) -> MessageDecision:
        """The subject's cluster-wide message budget is spent."""
        refusal = Refuse(
            "rate_limited",
            "Too many messages.",
            ref=valid_ref(ref),
            retry_after=retry_after,
            type=message_type,
        )
        return self._refuse(state, now, refusal)

    def _schema_refusal(
        self, policy: _TypePolicy, message: dict[str, Any], raw: bytes, ref: Any, kind: str
    ) -> Refuse:
        """The refusal of a message its type's schema rejects, with the JSON pointer of
        the first failing field. Describing the error costs a conversion of the failing
        value (the whole message for a missing key): for a message of many values the
        refusal says only that the schema failed, so a large invalid message costs no
        more than a valid one."""
        if raw.count(b",") >= _DESCRIBED_VALUES:
            return Refuse("invalid_message", "Invalid message (schema).", ref=ref, type=kind)
        error = next(iter(policy.validator.iter_errors(message)), None)
        if error is None:  # pragma: no cover - is_valid said it fails
            return Refuse("invalid_message", "Invalid message (schema).", ref=ref, type=kind)
        return Refuse(
            "invalid_message",
            f"Invalid message ({type(error.kind).__name__}).",
            ref=ref,
            pointer=_pointer(error.instance_path),
            type=kind,
        )

    def _containers(self, raw: bytes) -> bool:
        """Whether the message holds more than ``max_containers`` objects and arrays
        (brackets inside strings do not count). Only called when the raw count of
        brackets says it might."""
        stripped = _STRING.sub(b'""', raw)
        return stripped.count(b"{") + stripped.count(b"[") > self._max_containers

    def _bounds(self, raw: bytes, message: dict[str, Any], brackets: int) -> str | None:
        """Structural limits, in one walk at most; most are proven from the raw bytes.

        Depth counts nested containers (objects and arrays); ``max_keys`` bounds
        both the keys of an object and the items of an array. Strings and numbers are
        proven short from the raw bytes (a C pass each); the walk then visits only the
        containers (at most ``max_containers``, refused before decoding).
        """
        size = len(raw)
        # without an escaped quote every '"' in the raw bytes opens or closes a string, and
        # a decoded string is never longer than its raw bytes: every other piece between
        # quotes is a string, and the longest bounds them all (one C split)
        strings_ok = size <= self._max_string or (
            b'\\"' not in raw
            and max(map(len, raw.split(b'"')[1::2]), default=0) <= self._max_string
        )
        numbers_ok = (
            size < 19
            or len(raw.translate(None, _NON_DIGITS)) < 19  # one C pass
            or _NINETEEN_DIGITS not in raw.translate(_DIGITS_AS_ZERO)  # C passes
        )
        if (
            strings_ok
            and numbers_ok
            and (size < self._max_keys or raw.count(b",") < self._max_keys)
            and brackets <= self._max_depth
        ):
            return None
        leaves = not (strings_ok and numbers_ok)
        return _walk(message, self._max_depth, self._max_keys, self._max_string, leaves, brackets)

    def _reauthenticate(
        self, state: ConnectionState, now: float, message: dict[str, Any], ref: str | int | None
    ) -> MessageDecision:
        """A refresh token that verifies, for the same subject: ``Reauthenticate``, which
        the adapter hands to ``Guard.check_refresh`` (revocation) before applying it."""
        token = message.get("token")
        if type(token) is not str or not token:  # a configured auth schema may allow it
            self._refresh_failed(state, "missing_credentials", "no token in the refresh")
            return self.refresh_refused(state, now, ref)
        try:
            identity = self.verifier.verify(token)
        except AuthFailure as failure:
            self._refresh_failed(state, failure.reason, failure.detail)
            return self.refresh_refused(state, now, ref)
        if identity.subject != state.identity.subject:
            self._refresh_failed(state, "subject_mismatch", "", identity.token_id)
            return Close(CLOSE_POLICY_VIOLATION, "subject mismatch", cause="auth_subject_mismatch")
        return Reauthenticate(identity, ref)

    def refresh_refused(self, state: ConnectionState, now: float, ref: Any) -> MessageDecision:
        """An ``auth`` refresh whose token is not accepted: ``invalid_token``, a violation."""
        refusal = Refuse("invalid_token", "Token refresh refused.", ref=valid_ref(ref))
        return self._refuse(state, now, refusal)

    def _refresh_failed(
        self, state: ConnectionState, reason: str, detail: str, token_id: str | None = None
    ) -> None:
        if self.on_refresh_refused is not None:
            self.on_refresh_refused(state, reason, detail, token_id)
