"""AES-256-GCM share encryption: any tamper or wrong binding raises one DecryptionError."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfed.crypto import aead
from secfed.errors import ConfigError, DecryptionError

KEY = secrets.token_bytes(32)
AD_FIELDS = {"session_id": b"\x01" * 32, "round_number": 7, "sender": "acme", "receiver": "globex"}
AD = aead.binding_ad(**AD_FIELDS)
PLAINTEXT = b"a 35-byte Shamir share goes here.."
BLOB = aead.seal(KEY, PLAINTEXT, associated_data=AD)


def test_round_trip_and_layout() -> None:
    assert aead.open_sealed(KEY, BLOB, associated_data=AD) == PLAINTEXT
    assert len(BLOB) == aead.NONCE_BYTES + len(PLAINTEXT) + aead.TAG_BYTES
    assert aead.seal(KEY, PLAINTEXT, associated_data=AD)[:12] != BLOB[:12]  # fresh nonces


@pytest.mark.parametrize("index", range(len(BLOB)))
def test_flipping_any_byte_of_nonce_ciphertext_or_tag_raises(index) -> None:
    for flip in (0x01, 0x80):
        tampered = bytearray(BLOB)
        tampered[index] ^= flip
        with pytest.raises(DecryptionError) as info:
            aead.open_sealed(KEY, bytes(tampered), associated_data=AD)
        assert str(info.value) == "authenticated decryption failed"


@pytest.mark.parametrize(
    "change",
    [
        {"session_id": b"\x02" * 32},
        {"session_id": b"\x01" * 31},
        {"round_number": 8},
        {"sender": "globex", "receiver": "acme"},  # swapped direction
        {"sender": "acme2"},
        {"receiver": "globe"},
    ],
)
def test_changing_any_associated_data_field_raises(change) -> None:
    other = aead.binding_ad(**{**AD_FIELDS, **change})
    assert other != AD
    with pytest.raises(DecryptionError):
        aead.open_sealed(KEY, BLOB, associated_data=other)


def test_field_boundaries_are_unambiguous() -> None:
    # Length prefixes: moving a character from sender to receiver changes the AD.
    a = aead.binding_ad(session_id=b"s", round_number=1, sender="ab", receiver="c")
    b = aead.binding_ad(session_id=b"s", round_number=1, sender="a", receiver="bc")
    assert a != b


@settings(max_examples=50, deadline=None)
@given(blob=st.binary(max_size=80))
def test_arbitrary_bytes_never_open(blob) -> None:
    with pytest.raises(DecryptionError):
        aead.open_sealed(KEY, blob, associated_data=AD)


def test_wrong_key_and_truncation_raise_the_same_error() -> None:
    for key, blob in ((secrets.token_bytes(32), BLOB), (KEY, BLOB[:27]), (KEY[:16], BLOB)):
        with pytest.raises(DecryptionError, match="^authenticated decryption failed$"):
            aead.open_sealed(key, blob, associated_data=AD)


def test_bad_parameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="32 bytes \\(got 16\\)"):
        aead.seal(KEY[:16], b"x", associated_data=AD)
    with pytest.raises(ConfigError, match="round_number must be in \\[0, 2\\^64\\) \\(got -1\\)"):
        aead.binding_ad(session_id=b"s", round_number=-1, sender="a", receiver="b")
    with pytest.raises(ConfigError, match="sender must be a non-empty str"):
        aead.binding_ad(session_id=b"s", round_number=1, sender="", receiver="b")
    with pytest.raises(ConfigError, match="session_id must be non-empty"):
        aead.binding_ad(session_id=b"", round_number=1, sender="a", receiver="b")
