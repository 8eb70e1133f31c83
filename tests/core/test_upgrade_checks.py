"""The upgrade request's structural checks against their definitions, on any input.

``check_upgrade`` decides with compiled patterns and a fast path for the usual request;
the references here are the definitions themselves: a key is what base64 decodes to 16
bytes (RFC 6455 §4.2.1), ``Upgrade`` is the list ``[websocket]`` and ``Connection`` a
list holding ``upgrade`` (case-insensitive, RFC 9110 §7.8), and a request target has
no control character, space or DEL.
"""

from __future__ import annotations

import base64
import binascii
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from wsguard.core.handshake import check_upgrade
from wsguard.core.headers import Headers, split_list
from wsguard.core.request import HandshakeRequest

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def request(headers: list[tuple[str, str]], target: str = "/") -> HandshakeRequest:
    return HandshakeRequest(
        peer="127.0.0.1", target=target, headers=Headers(headers), tls=False, method="GET"
    )


def valid(**replace: list[str]) -> list[tuple[str, str]]:
    fields = {
        "Host": ["example.com"],
        "Upgrade": ["websocket"],
        "Connection": ["Upgrade"],
        "Sec-WebSocket-Version": ["13"],
        "Sec-WebSocket-Key": [KEY],
    } | {name.replace("_", "-"): values for name, values in replace.items()}
    return [(name, value) for name, values in fields.items() for value in values]


def refusal(headers: list[tuple[str, str]], target: str = "/") -> tuple[int, str] | None:
    refused = check_upgrade(request(headers, target))
    return None if refused is None else (refused.status, refused.detail or "")


def key_is_valid(value: str) -> bool:
    value = value.strip(" \t")  # optional whitespace: SP and HTAB (RFC 9110 §5.6.3)
    if len(value) != 24 or not value.isascii():
        return False
    try:
        return len(base64.b64decode(value, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


_KEY_TEXT = st.one_of(
    st.text(alphabet="ABCxyz019+/=-_ \t.", min_size=20, max_size=26),
    st.binary(min_size=16, max_size=16).map(lambda b: base64.b64encode(b).decode()),
    st.binary(min_size=15, max_size=17).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=26),
)


@settings(max_examples=2000)
@given(_KEY_TEXT)
@example(KEY)
@example(" " + KEY + " ")
@example("dGhlIHNhbXBsZSBub25jZQ=")
@example("dGhlIHNhbXBsZSBub25jZR==")  # trailing bits set: base64 accepts it
@example("dGhlIHNhbXBsZSBub2=jZQ==")
@example("dGhlIHNhbXBsZSBub25jZQ==\n")
@example("dGhlIHNhbXBsZSBub25jZ\u00e9==")
def test_the_key_is_accepted_exactly_when_it_is_16_bytes_of_base64(key: str) -> None:
    expected = None if key_is_valid(key) else (400, "key")
    assert refusal(valid(Sec_WebSocket_Key=[key])) == expected


_LIST = st.lists(
    st.sampled_from(
        ["websocket", "WebSocket", "upgrade", "Upgrade", "keep-alive", "h2c", "", " ", ",",
         "websocket, h2c", " websocket ", "upgrade,", "websockets", "WEBSOCKET", "upgraded",
         "no-upgrade, keep-alive", "websocket\xa0", "upgrade\x85", "@", "websocket/13"]
    ),
    max_size=3,
)  # fmt: skip


@settings(max_examples=2000)
@given(_LIST, _LIST)
@example(["websocket"], ["keep-alive, Upgrade"])
@example(["websocket", "websocket"], ["Upgrade"])
@example([" websocket"], ["upgrade "])
@example(["websocket\xa0"], ["Upgrade"])
@example(["websocket"], ["Upgrade, @"])
@example(["websocket/13"], ["Upgrade"])
def test_upgrade_names_websocket_alone_and_connection_holds_upgrade(
    upgrade: list[str], connection: list[str]
) -> None:
    got = refusal(valid(Upgrade=upgrade, Connection=connection))
    if not _token_list(upgrade, versioned=True):
        assert got == (400, "upgrade")
        return
    if not _token_list(connection, versioned=False):
        assert got == (400, "connection")
        return
    upgrades = [v.lower() for v in split_list(upgrade)]
    connections = [v.lower() for v in split_list(connection)]
    ok = upgrades == ["websocket"] and "upgrade" in connections
    assert got == (None if ok else (426, "missing upgrade headers"))


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ELEMENT = {False: _TOKEN, True: re.compile(rf"{_TOKEN.pattern}(?:/{_TOKEN.pattern})?")}


def _token_list(lines: list[str], *, versioned: bool) -> bool:
    """RFC 9110 §5.6.1 ``1#element`` on every field line: elements separated by commas
    with optional SP/HTAB around them, empty ones ignored, at least one per line."""
    element = _ELEMENT[versioned]
    for line in lines:
        items = [item.strip(" \t") for item in line.split(",")]
        items = [item for item in items if item]
        if not items or not all(element.fullmatch(item) for item in items):
            return False
    return True


@settings(max_examples=500)
@given(st.lists(st.text(alphabet='abc.v1 \t,\xa0\x85@"', max_size=8), min_size=1, max_size=3))
@example(["chat ,\twsguard.v1"])
@example([","])
@example(["wsguard.v1\x85"])
def test_subprotocols_are_a_list_of_tokens(lines: list[str]) -> None:
    got = refusal(valid(Sec_WebSocket_Protocol=lines))
    assert got == (None if _token_list(lines, versioned=False) else (400, "subprotocol"))


@settings(max_examples=1000)
@given(st.text(max_size=12).map(lambda text: "/" + text))
@example("/chat?room=1&lang=en")
@example("/a b")
@example("/a\x7fb")
@example("/a\x00")
@example("/caf\u00e9")
@example("/chat#frag")
def test_a_target_with_a_control_character_space_del_or_fragment_is_refused(target: str) -> None:
    bad = (
        target.startswith("//")
        or not target.isascii()
        or any(ch <= " " or ch in "\x7f#" for ch in target)
    )
    assert refusal(valid(), target) == ((400, "target") if bad else None)


@pytest.mark.parametrize("target", ["chat", "//evil.example/", "/" + "a" * 4096, "/#x", "/a?b#c"])
def test_targets_refused_for_their_form_or_size(target: str) -> None:
    assert refusal(valid(), target) == (400, "target")
