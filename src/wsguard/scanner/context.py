"""What every check shares: the pinned target, the credentials and the protocol helpers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import re
import secrets
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import orjson
from websockets.extensions.base import ClientExtensionFactory

from wsguard.errors import ConfigError
from wsguard.scanner.credentials import Credentials
from wsguard.scanner.dialect import (
    CANDIDATES,
    GRACE,
    KIND_KEYS,
    Candidate,
    Dialect,
    Heard,
    given,
    judge_candidate,
    listen,
    loads,
)
from wsguard.scanner.options import ScanOptions, Target
from wsguard.scanner.probe import Endpoint, Event, Handshake, ReadBudget, Session, handshake

DEFAULT_DIALECT = Dialect(
    "echo", template='{"type": "ping", "id": "{id}"}', source="assumed", note="wsguard's own"
)
# statuses that mean "slow down / come back later" rather than "no"
THROTTLED = frozenset({429, 503})
THROTTLE_WAIT = 8.0  # seconds a check waits for a throttled target before giving up


class CheckError(Exception):
    """The check cannot go on (the verdict becomes ERROR with this message)."""


class NotApplicable(Exception):
    """The check does not apply (the verdict becomes N/A with this message). ``needs``:
    the option that would let it run (counted as not examined), or "" when it does not
    apply to this endpoint at all."""

    def __init__(self, message: str, *, needs: str = "") -> None:
        super().__init__(message)
        self.needs = needs


class Inconclusive(Exception):
    """The target's behaviour leaves the check unable to judge (verdict INCONCLUSIVE,
    with this one-line reason): not the scanner's failure, not a pass."""


@dataclass(slots=True)
class Outcome:
    """What came back after sending something and then a ping as a barrier."""

    errors: list[str] = field(default_factory=list)  # error frames, in order
    replies: list[str] = field(default_factory=list)  # other messages, in order
    answered: bool = False  # the barrier ping was answered: the connection is usable
    close: Event | None = None

    def describe(self) -> str:
        if self.close is not None:
            reason = f" {self.close.reason!r}" if self.close.reason else ""
            first = f"{brief(self.errors[0])}, then " if self.errors else ""
            return f"{first}closed {self.close.code}{reason}"
        if self.errors:
            alive = "connection still usable" if self.answered else "no answer to a ping"
            return f"{brief(self.errors[0])}; {alive}"
        if self.answered:
            return "accepted; connection still usable"
        return "no answer"

    @property
    def refused(self) -> bool:
        return bool(self.errors) or self.close is not None


_THROTTLE = re.compile(
    r"(?<![a-z])rate|limit|throttl|retry|too.many|busy|slow|quota", re.IGNORECASE
)
# a refusal about the message's size, not its rate ("exceeds the size limit of 8192 bytes")
_SIZE = re.compile(r"size|too.?(large|big|long)|bytes|length|payload|max.?message", re.IGNORECASE)


def throttled(outcome: Outcome) -> bool:
    """Does this refusal look like "slow down" (worth a bounded wait) rather than "no"?
    An error about the message's size ("exceeds the size limit") is a "no"."""
    if outcome.close is not None and outcome.close.code in (1008, 1013):
        return not _SIZE.search(outcome.close.reason)
    return any(_THROTTLE.search(error) and not _SIZE.search(error) for error in outcome.errors)


def brief(error: str) -> str:
    """An error frame in a few words: its code when it has one."""
    try:
        value = orjson.loads(error)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        code = value.get("code") or value.get("error")
        if isinstance(code, str | int) and len(str(code)) <= 40:
            return f"error frame {str(code)!r}"
    return f"error frame {short(error, 60)}"


def short(text: str, limit: int = 120) -> str:
    flat = text.replace("\r", "\\r").replace("\n", "\\n")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def tls_context(
    options: ScanOptions, *, verify: bool = True, ignore_insecure: bool = False
) -> ssl.SSLContext:
    """The client TLS context (CA bundle, client certificate); bad files: ConfigError."""
    try:
        context = ssl.create_default_context(
            cafile=str(options.ca_file) if options.ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("--ca-file", f"cannot load: {exc}") from None
    if not verify or (options.insecure and not ignore_insecure):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if options.client_cert is not None:
        try:
            context.load_cert_chain(
                str(options.client_cert), str(options.client_key) if options.client_key else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("--client-cert", f"cannot load with its key: {exc}") from None
    return context


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


class ScanContext:
    def __init__(self, options: ScanOptions, target: Target, credentials: Credentials) -> None:
        self.options = options
        self.target = target
        self.credentials = credentials
        self.base = Endpoint(
            target.uri,
            target.address,
            tls_context(options) if target.uri.secure else None,
            options.connect_timeout,
            budget=ReadBudget(options.max_message_bytes),  # one for the whole scan
        )
        rotate = options.rotate_sources
        if rotate is None:
            rotate = (
                target.loopback
                and ipaddress.ip_address(target.address).version == 4
                and _can_bind("127.77.0.2")  # Linux routes 127/8 to lo; macOS does not
            )
        self._sources = (
            (f"127.77.{n // 250}.{n % 250 + 2}" for n in itertools.count()) if rotate else None
        )
        self.endpoint = self.base.with_source(self.next_source())
        self.transcript: list[tuple[str, str]] = []  # (where, text) seen from the server
        # probe ids: from a random 9-digit start, so no counter of the target's own (1, 2,
        # 3, ... in its pushes) matches them
        self._ids = itertools.count(100_000_000 + secrets.randbelow(800_000_000))
        self.check_id = ""
        self.oversized_answers: list[str] = []  # see oversized()
        self.dialect = replace(DEFAULT_DIALECT, error_kinds=options.error_types)

    @property
    def budget(self) -> ReadBudget:
        """What the scan takes in from the target (shared by every check's connections)."""
        return self.base.budget

    # -- where from ----------------------------------------------------------------
    def next_source(self) -> str | None:
        return next(self._sources) if self._sources is not None else None

    def for_check(self, check_id: str, *, own_subject: bool = True) -> ScanContext:
        """A view for one check: its own source address on loopback, so one check's bans
        and rate limits do not spill into the next."""
        view = object.__new__(ScanContext)
        for name in ("options", "target", "base", "_sources", "transcript", "_ids", "dialect"):
            setattr(view, name, getattr(self, name))  # shared with the view: one id sequence
        view.credentials = self.credentials.for_check(check_id) if own_subject else self.credentials
        view.endpoint = self.base.with_source(self.next_source())
        view.check_id = check_id
        view.oversized_answers = []
        return view

    @contextlib.contextmanager
    def oversized(self) -> Iterator[None]:
        """Around sending an oversized probe and reading what answers it: what the target
        sends over the scan's own read limit meanwhile answers the probe (the size checks
        count it as the probe accepted); what it sent before does not."""
        start = len(self.budget.violations)
        try:
            yield
        finally:
            self.oversized_answers.extend(self.budget.violations[start:])

    def rotate(self) -> None:
        """A fresh source address (loopback only), e.g. before each refused credential."""
        source = self.next_source()
        if source is not None:
            self.endpoint = self.base.with_source(source)

    # -- handshakes ----------------------------------------------------------------
    async def connect(
        self,
        *,
        token: str | None = "valid",  # noqa: S107 - a marker, not a password
        origin: str | None = "default",
        headers: Sequence[tuple[str, str]] = (),
        cookies: Sequence[str] | None = None,
        extensions: Sequence[ClientExtensionFactory] = (),
        endpoint: Endpoint | None = None,
        resource: str | None = None,
    ) -> Handshake:
        """A handshake with the scan's headers and the given credential ("valid": the
        scan's own token, None: none at all)."""
        options = self.options
        if token == "valid":
            token = self.credentials.token
        all_headers = list(options.headers) + list(headers)
        subprotocols = list(options.subprotocols)
        if cookies is None:  # the scan's cookies may be credentials: only with one
            cookies = options.cookies if token is not None else ()
        cookie_list = list(cookies)
        path = resource if resource is not None else self.target.uri.resource_name
        first_message: str | None = None
        if token is not None:
            placement = options.token_in
            if placement == "message":
                # the token as a JSON string's content (a malformed probe may hold anything)
                inside = orjson.dumps(token).decode()[1:-1]
                first_message = options.token_name.replace("{token}", inside)
            elif placement == "header" and options.token_name:
                all_headers.append((options.token_name, token))
            elif placement == "header":
                all_headers.append(("Authorization", f"Bearer {token}"))
            elif placement == "query":
                separator = "&" if "?" in path else "?"
                path = f"{path}{separator}{options.token_name or 'token'}={token}"
            elif placement == "cookie":
                cookie_list.append(f"{options.token_name or 'token'}={token}")
            else:
                subprotocols.append(f"{options.token_name or 'token.'}{token}")
        if cookie_list:
            all_headers.append(("Cookie", "; ".join(cookie_list)))
        if origin == "default":
            origin = options.origin_allowed
        result = await handshake(
            endpoint or self.endpoint,
            resource=path,
            headers=all_headers,
            origin=origin,
            subprotocols=subprotocols,
            extensions=extensions,
            wait=options.connect_timeout,
        )
        if first_message is not None and result.session is not None:
            await result.session.send_text(first_message)
        if result.status is not None and result.status != 101 and result.body:
            self.record(f"HTTP {result.status} body", result.body.decode("utf-8", "replace"))
        for name in ("Server", "X-Powered-By"):
            for value in result.headers.get_all(name):
                self.record(f"{name} header", value)
        return result

    @property
    def in_band(self) -> bool:
        """The credential goes in the first message after the upgrade (``--token-in
        message:JSON``): a refusal of it can only come after the upgrade."""
        return self.options.token_in == "message"

    async def open(self, **kwargs: object) -> Session:
        """A connection that works: upgraded and answering a ping without an error (else
        CheckError). A throttled target (a per-user rate limit still counting an earlier
        check's messages) gets a few seconds, bounded, to calm down; a connection dropped
        without a close frame is tried again once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + THROTTLE_WAIT
        delay = 0.5
        dropped_once = False
        while True:
            silent = False
            result = await self.connect(**kwargs)  # type: ignore[arg-type]
            if result.session is None:
                problem = f"baseline connection refused: {result.describe()}"
                retry = result.status in THROTTLED
            else:
                try:
                    outcome = await self.barrier(result.session)
                except BaseException:
                    await result.session.close()
                    raise
                if outcome.answered and not outcome.errors:
                    return result.session
                await result.session.close()
                problem = f"baseline connection did not answer a ping: {outcome.describe()}"
                silent = not outcome.refused
                if silent:
                    problem += (
                        f" (probe {self.dialect.describe()}; --ping-message / --pong-type "
                        "override it)"
                    )
                retry = throttled(outcome)
                close = outcome.close
                if close is not None and close.code == 1006 and not dropped_once:
                    # dropped without a word: once is a flaky target, not an answer
                    dropped_once = retry = True
            if not retry or loop.time() + delay > deadline:
                if result.session is not None and silent:
                    raise Inconclusive(problem)
                raise CheckError(problem)
            await asyncio.sleep(delay)
            delay *= 2
            self.rotate()

    # -- the endpoint's protocol -----------------------------------------------------
    async def discover(self) -> Dialect:
        """Work out how the endpoint can be used as a barrier and a liveness probe (see
        :mod:`wsguard.scanner.dialect`), once per scan, on a baseline connection."""
        options = self.options
        chosen = given(options.ping_message, options.pong_type, options.error_types)
        if chosen is not None:
            self.dialect = chosen
            return chosen
        assumed = replace(DEFAULT_DIALECT, error_kinds=options.error_types)
        tried: list[str] = []
        sent: list[str] = []  # the ids of the probes sent: a late answer names one
        pong_frames = False
        keys: list[str] = []

        async def ask(session: Session, candidate: Candidate, patient: bool) -> tuple[str, Heard]:
            """The candidate with a fresh id, then a ping frame as the barrier: what came."""
            ident = str(next(self._ids))
            await session.send_text(candidate.template.replace("{id}", ident))
            frame = f"wsguard-audit-{ident}".encode()
            await session.send_ping(frame)
            heard = Heard()
            await listen(session, heard, frame, options.reply_timeout, patient=patient)
            return ident, heard

        async def confirmed(
            session: Session, candidate: Candidate, found: Dialect, patient: bool
        ) -> bool:
            """The answer was to the probe, not a stream the target sends by itself (a
            feed's own counters, heartbeats): a ping frame alone brings no such answer,
            and a second probe, with another id, brings the same kind of answer again."""
            heard = Heard()
            frame = f"wsguard-audit-{next(self._ids)}".encode()
            await session.send_ping(frame)
            await listen(session, heard, frame, options.reply_timeout)
            for text in heard.texts:
                self.record("message", text)
            if heard.closed or judge_candidate(
                candidate, "", heard, options.error_types, frozenset(sent)
            ):
                return False  # unprompted: the same answer came with no probe at all
            ident, heard = await ask(session, candidate, patient)
            for text in heard.texts:
                self.record("message", text)
            again = judge_candidate(candidate, ident, heard, options.error_types, frozenset(sent))
            sent.append(ident)
            return again is not None and again.mode == found.mode

        async def attempt(patient: bool) -> Dialect | None:
            """One pass over the candidates on a fresh connection. Quick: after the ping
            frame's answer, a short grace. Patient (when the quick pass heard nothing): up
            to --reply-timeout for a message, for endpoints whose handler answers slower
            than their library answers ping frames."""
            nonlocal pong_frames
            session: Session | None = None
            try:
                for candidate in CANDIDATES:
                    if session is None or session.closed:
                        if session is not None:
                            await session.close()
                        self.rotate()
                        result = await self.connect()
                        if result.session is None:
                            if not tried and not patient:
                                self.dialect = replace(
                                    assumed,
                                    note=f"the baseline handshake got {result.describe()}",
                                )
                                return self.dialect
                            return None
                        session = result.session
                    ident, heard = await ask(session, candidate, patient)
                    broken = session.broken
                    if broken is not None:  # nothing more to learn from this endpoint
                        self.dialect = Dialect(
                            "control",
                            error_kinds=options.error_types,
                            note=f"the target's frames break RFC 6455 ({broken})",
                        )
                        return self.dialect
                    pong_frames = pong_frames or heard.pong_frame
                    for text in heard.texts:
                        error = assumed.is_error(text)
                        self.record("error frame" if error else "message", text)
                        value = loads(text)
                        if isinstance(value, dict):
                            keys.extend(k for k in KIND_KEYS if isinstance(value.get(k), str))
                    found = judge_candidate(
                        candidate, ident, heard, options.error_types, frozenset(sent)
                    )
                    sent.append(ident)
                    if found is not None and not await confirmed(
                        session, candidate, found, patient
                    ):
                        found = None
                    if found is not None:
                        notes = [found.note] if found.note else []
                        if patient:  # the quick pass's misses say nothing here
                            notes.append(
                                "answered only after its ping frame: waited up to "
                                "--reply-timeout for each answer"
                            )
                        elif tried:
                            notes.append(f"not answered: {', '.join(tried)}")
                        self.dialect = replace(found, note="; ".join(notes))
                        return self.dialect
                    name = candidate.template.replace(', "id": "{id}"', "").replace("{id}", "N")
                    if name not in tried:
                        tried.append(name)
            finally:
                if session is not None:
                    await session.close()
            return None

        for patient in (False, True):
            found = await attempt(patient)
            if found is not None:
                return found
        key = max(set(keys), key=keys.count) if keys else "type"
        frames = "" if pong_frames else "; ping frames were not answered either"
        self.dialect = Dialect(
            "control",
            key=key,
            error_kinds=options.error_types,
            note=f"tried {len(tried)} application pings{frames}",
        )
        return self.dialect

    # -- messages ------------------------------------------------------------------
    def classify(self, text: str) -> str:
        """'error', 'reply' for a text message from the target."""
        return "error" if self.dialect.is_error(text) else "reply"

    async def barrier(
        self, session: Session, outcome: Outcome | None = None, *, wait: float | None = None
    ) -> Outcome:
        """Send a ping and collect everything until its answer, an error about it, or
        the close. Servers answer in order, so what came before belongs to earlier sends.
        With answers that carry no id (or a ping frame as the barrier), what comes within a
        short grace after the answer is collected too: late answers, stray pongs."""
        outcome = outcome or Outcome()
        dialect = self.dialect
        ident = str(next(self._ids))
        text = dialect.ping(int(ident))
        until: Callable[[Event], bool]
        if text is None:
            frame = f"wsguard-audit-{ident}".encode()
            await session.send_ping(frame)

            def until(event: Event) -> bool:
                return event.kind == "pong" and event.data == frame

        else:
            await session.send_text(text)

            def until(event: Event) -> bool:
                return event.kind != "pong" and dialect.answers(event.text, ident)

        await self.collect(session, outcome, until=until, wait=wait or self.options.reply_timeout)
        if dialect.sequential and outcome.answered and outcome.close is None:
            await self.collect(session, outcome, wait=GRACE, late=True)
        broken = session.broken
        if broken is not None:  # nothing it sends can be read: the scan cannot judge
            raise CheckError(f"the target sent a frame that breaks RFC 6455: {broken}")
        return outcome

    async def collect(
        self,
        session: Session,
        outcome: Outcome,
        *,
        until: Callable[[Event], bool] | None = None,
        wait: float,
        late: bool = False,
    ) -> Outcome:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            event = await session.next_event(max(0.0, deadline - loop.time()))
            if event is None:
                return outcome
            if event.kind == "close":
                outcome.close = event
                if event.reason:
                    self.record("close reason", event.reason)
                return outcome
            is_answer = until is not None and until(event)
            if event.kind not in ("text", "binary"):
                if is_answer:
                    outcome.answered = True
                    return outcome
                continue
            text = event.text
            if late and self.dialect.is_pong(text):
                continue  # a pong to an earlier probe (answers carry no id)
            if self.classify(text) == "error":
                outcome.errors.append(text)
                self.record("error frame", text)
                if is_answer:  # the ping itself was refused: still alive
                    outcome.answered = True
                    return outcome
            elif is_answer:
                outcome.answered = True
                return outcome
            else:
                outcome.replies.append(text)
                self.record("message", text)

    async def exchange(
        self, session: Session, data: str | bytes, *, binary: bool = False
    ) -> Outcome:
        """Send one message, then a ping barrier: what did the target say about it?"""
        if binary:
            await session.send_binary(data if isinstance(data, bytes) else data.encode())
        else:
            await session.send_text(data)
        return await self.barrier(session)

    async def alive(self) -> tuple[bool, str]:
        """Does the target still answer (after something hostile)? Any HTTP answer counts,
        a refusal or a throttle included: dead is no answer at all, or an upgraded
        connection that neither answers nor closes."""
        self.rotate()
        result = await self.connect()
        if result.status is None:
            return False, result.describe()
        if result.session is None:
            return True, result.describe()
        try:
            outcome = await self.barrier(result.session)
        finally:
            await result.session.close()
        return outcome.answered or outcome.close is not None, outcome.describe()

    def record(self, where: str, text: str) -> None:
        if len(self.transcript) < 5000:
            self.transcript.append((where, text[:4096]))


def judge(result: Handshake) -> str:
    """A handshake's answer: "upgraded", "refused" (a definite no before the upgrade) or
    "inconclusive" (no answer in time, a server error, a throttle: nothing was judged)."""
    if not result.reached:
        raise CheckError(f"cannot reach the target: {result.describe()}")
    if result.status == 101:
        return "upgraded"
    if result.status is not None and result.status < 300:
        # a success that is no upgrade: not a WebSocket endpoint, nothing was refused
        raise CheckError(f"not a WebSocket endpoint: {result.describe()} to an upgrade request")
    if result.status is None:
        return "inconclusive" if result.error == "timeout" else "refused"  # dropped: a no
    if result.status == 408 or result.status in THROTTLED or result.status >= 500:
        return "inconclusive"
    return "refused"


async def settle(ctx: ScanContext, result: Handshake) -> tuple[str, str]:
    """After a hostile handshake: ("refused", how) before the upgrade; ("inconclusive",
    how) when nothing was judged; ("late", how) when upgraded then closed or refused for
    authentication; ("silent", how) when upgraded and left open without answering a ping
    (in-band authentication?); ("accepted", how) when the socket is usable."""
    answer = judge(result)
    if answer != "upgraded":
        return answer, result.describe()
    if result.session is None:  # a 101 websockets rejects: the server did upgrade
        return "accepted", result.describe()
    session = result.session
    try:
        outcome = await ctx.barrier(session)
    finally:
        await session.close()
    close = outcome.close
    if close is not None:
        if (
            close.code not in _PLAIN_CLOSES
            or _AUTH.search(close.reason)
            or any(_AUTH.search(error) for error in outcome.errors)
        ):
            return "late", f"upgraded, then {outcome.describe()}"
        # closed, but not for the credential (a normal close, an error): no judgement
        return "inconclusive", f"upgraded, then {outcome.describe()} (no sign of a refusal)"
    if any(_AUTH.search(error) for error in outcome.errors):
        if outcome.answered and ctx.dialect.mode != "control":
            # an error that speaks of authentication, and yet the probe's message was
            # answered: the connection is usable, whatever the error said
            return "accepted", f"upgraded; {outcome.describe()}"
        return "late", f"upgraded, then {outcome.describe()}"
    if outcome.answered and not outcome.errors and ctx.dialect.mode == "control":
        # every WebSocket server answers ping frames: that says nothing about the credential
        return "silent", "upgraded and answering ping frames (no application message to try)"
    if outcome.answered and not outcome.errors:
        return "accepted", "upgraded and answered a ping"
    if outcome.answered or outcome.errors:
        return "accepted", f"upgraded; {outcome.describe()}"  # it handles our messages
    return "silent", "upgraded and left open, no answer to a ping (in-band authentication?)"


def about_authentication(outcome: Outcome) -> bool:
    """Whether *outcome* is refused for want of authentication (a close 4001/4003, a close
    reason or an error frame that speaks of authentication): a target that authenticates
    in-band refuses every message of a connection that has not, which says nothing about
    the message."""
    close = outcome.close
    if close is not None and (close.code in _AUTH_CLOSES or _AUTH.search(close.reason)):
        return True
    return bool(outcome.errors) and all(_AUTH.search(error) for error in outcome.errors)


# closes that refuse nothing by themselves (normal, going away, none at all): right after
# an upgrade, with no reason about authentication, they are no sign of a refusal
_PLAIN_CLOSES = frozenset({1000, 1001, 1005, 1006})
# an error frame that refuses for lack of authentication (vs. one about the message): words
# about credentials, not a bare "forbidden" or "denied" ("binary frames forbidden" is a
# refusal of the message)
_AUTH = re.compile(
    r"auth|token|credential|log.?in|sign.?in|session.expired|not.logged", re.IGNORECASE
)
# application close codes used for "unauthenticated" / "unauthorized"
_AUTH_CLOSES = frozenset({4001, 4003})
