"""Signing secrets are base64url, read strictly in every place one is written: the keys
file, the client's ``signing_key`` and the scanner's ``--signing-key``. A lenient decoder
drops the characters outside the alphabet and reads another key than the one written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wsguard.config.keys import load_signing_keys
from wsguard.core.integrity import decode_secret
from wsguard.errors import ConfigError, KeyLoadError
from wsguard.scanner.options import parse_signing_key

GOOD = "A" * 43  # 32 bytes
BAD = [
    "A" * 42 + "+/",  # standard base64
    "this is my long shared passphrase!! it is certainly not base64url text at all",
    "AAAA=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # padding inside
    "A" * 45,  # a length no encoding gives
]


def test_a_base64url_secret_decodes() -> None:
    assert decode_secret(GOOD) == bytes(32)
    assert decode_secret(GOOD + "=") == bytes(32)


@pytest.mark.parametrize("text", BAD)
def test_anything_else_is_refused_everywhere(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match="base64url"):
        decode_secret(text)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"kid": "k1", "subject": "alice", "secret": text}]}))
    keys.chmod(0o600)
    with pytest.raises(KeyLoadError, match="not base64url"):
        load_signing_keys(keys)
    with pytest.raises(ConfigError, match="base64url"):
        parse_signing_key(f"k1:{text}")
