"""AES-256-GCM with associated data that binds a message to its session, round and parties.

Sharp layer. Nonces are 96 random bits from the OS CSPRNG (each key encrypts few messages).
Any failure to open -- a flipped bit anywhere, the wrong key, wrong associated data, a
truncated blob -- raises one :class:`DecryptionError` and says nothing more.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secfed import names
from secfed.crypto.errors import ConfigError, DecryptionError

__all__ = ["NONCE_BYTES", "TAG_BYTES", "KEY_BYTES", "seal", "open_sealed", "binding_ad"]

NONCE_BYTES = 12  # GCM's native nonce size (NIST SP 800-38D)
TAG_BYTES = 16
KEY_BYTES = 32
_AD_LABEL = names.LABEL_AEAD_AD


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def binding_ad(*, session_id: bytes, round_number: int, sender: str, receiver: str) -> bytes:
    """Canonical associated data binding (session id, round, sender, receiver)."""
    if isinstance(round_number, bool) or not isinstance(round_number, int):
        raise ConfigError(f"round_number must be an int (got {type(round_number).__name__})")
    if not 0 <= round_number < 2**64:
        raise ConfigError(f"round_number must be in [0, 2^64) (got {round_number})")
    if not isinstance(session_id, bytes | bytearray) or not session_id:
        raise ConfigError("session_id must be non-empty bytes")
    for name, party in (("sender", sender), ("receiver", receiver)):
        if not isinstance(party, str) or not party:
            raise ConfigError(f"{name} must be a non-empty str (got {party!r})")
    return (
        _AD_LABEL
        + _field(bytes(session_id))
        + struct.pack(">Q", round_number)
        + _field(sender.encode("utf-8"))
        + _field(receiver.encode("utf-8"))
    )


def seal(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """Encrypt and authenticate; returns ``nonce || ciphertext || tag``.

    Raises:
        ConfigError: the key is not 32 bytes.
    """
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise ConfigError(f"AES-256-GCM key must be {KEY_BYTES} bytes (got {len(key)})")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(bytes(key)).encrypt(nonce, bytes(plaintext), bytes(associated_data))


def open_sealed(key: bytes, blob: bytes, *, associated_data: bytes) -> bytes:
    """Authenticate and decrypt :func:`seal` output.

    Raises:
        DecryptionError: for any failure at all.
    """
    try:
        if len(key) != KEY_BYTES or len(blob) < NONCE_BYTES + TAG_BYTES:
            raise DecryptionError()
        return AESGCM(bytes(key)).decrypt(
            bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), bytes(associated_data)
        )
    except DecryptionError:
        raise
    except (InvalidTag, ValueError, TypeError) as exc:
        raise DecryptionError() from exc
