"""Key agreement (X25519), identities (Ed25519) and labelled key derivation (HKDF-SHA256).

Sharp layer: no protocol logic. Every derived key uses ``HKDF(salt=session_id,
info=b"secfed/v1/<purpose>" + context)``; the purposes are the constants below, one per use.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar

from cryptography.exceptions import InvalidSignature as _PycaInvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secfed import names
from secfed.crypto.errors import ConfigError, CryptoError, InvalidSignature

__all__ = [
    "LABEL_PAIRWISE_MASK",
    "LABEL_SHARE_ENCRYPTION",
    "LABEL_SELF_MASK",
    "LABEL_NOISE",
    "LABEL_LEDGER",
    "LABELS",
    "KEY_BYTES",
    "X25519KeyPair",
    "IdentityKey",
    "agree",
    "hkdf",
    "derive_key",
    "verify_signature",
    "share_verifications",
    "constant_time_equal",
    "ed25519_public_key_from",
]

KEY_BYTES = 32  # X25519 / Ed25519 raw key size and every derived key (AES-256).

# One HKDF info label per purpose (CONVENTIONS.md: "key derivation is labelled").
LABEL_PAIRWISE_MASK = names.LABEL_PAIRWISE_MASK  # seed of the AES-CTR pairwise mask
LABEL_SHARE_ENCRYPTION = names.LABEL_SHARE_ENCRYPTION  # AES-GCM key for Shamir shares
LABEL_SELF_MASK = names.LABEL_SELF_MASK  # expansion of a self-mask seed
LABEL_NOISE = names.LABEL_NOISE  # distributed-DP noise stream (reserved)
LABEL_LEDGER = names.LABEL_LEDGER  # ledger entry signatures (domain separation)
LABELS = names.KEY_LABELS


def _check_len(name: str, value: bytes, expected: int) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ConfigError(f"{name} must be bytes (got {type(value).__name__})")
    if len(value) != expected:
        raise ConfigError(f"{name} must be {expected} bytes (got {len(value)})")


_PrivateKeyT = TypeVar("_PrivateKeyT", X25519PrivateKey, Ed25519PrivateKey)


@dataclass(frozen=True, slots=True, repr=False)
class _RawKeyPair(Generic[_PrivateKeyT]):
    """What an X25519 and an Ed25519 key pair share: one pyca private key, moved as 32 raw bytes,
    and a ``repr`` that shows only the start of the public key."""

    private: _PrivateKeyT

    # Set by each subclass: the pyca class of ``private`` (typed loosely: a ClassVar cannot
    # name _PrivateKeyT) and the algorithm's name for errors.
    _KEY_TYPE: ClassVar[type[Any]]
    _ALGORITHM: ClassVar[str]

    @classmethod
    def generate(cls) -> Self:
        """A new key pair from the OS CSPRNG."""
        return cls(cls._KEY_TYPE.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Self:
        """Rebuild from the 32-byte raw private key (for Shamir recovery and test vectors)."""
        _check_len(f"{cls._ALGORITHM} private key", raw, KEY_BYTES)
        return cls(cls._KEY_TYPE.from_private_bytes(bytes(raw)))

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key. Secret: never log it."""
        return self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key (what the roster pins for an identity)."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def __repr__(self) -> str:  # never print the secret
        return f"{type(self).__name__}(public={self.public_bytes().hex()[:16]}...)"


@dataclass(frozen=True, slots=True, repr=False)
class X25519KeyPair(_RawKeyPair[X25519PrivateKey]):
    """An ephemeral X25519 key pair (fresh per session; never persisted by the protocol)."""

    _KEY_TYPE = X25519PrivateKey
    _ALGORITHM = "x25519"


def agree(private: X25519KeyPair, peer_public: bytes) -> bytes:
    """X25519 shared secret with ``peer_public`` (raw 32 bytes).

    Raises:
        ConfigError: ``peer_public`` is not 32 bytes.
        CryptoError: the agreement yields the all-zero secret (small-order point).
    """
    _check_len("peer public key", peer_public, KEY_BYTES)
    try:
        shared = private.private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as exc:  # pyca raises on an all-zero shared secret
        raise CryptoError("x25519 agreement rejected a small-order public key") from exc
    return shared


_HKDF_MAX_LENGTH = 255 * 32  # RFC 5869: L <= 255 * HashLen


def hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) extract-and-expand.

    Raises:
        ConfigError: ``length`` outside [1, 8160].
    """
    if not 1 <= length <= _HKDF_MAX_LENGTH:
        raise ConfigError(f"hkdf length must be in [1, {_HKDF_MAX_LENGTH}] (got {length})")
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=bytes(salt), info=bytes(info)
    ).derive(bytes(ikm))


def derive_key(
    shared_secret: bytes,
    *,
    session_id: bytes,
    purpose: bytes,
    context: bytes = b"",
    length: int = KEY_BYTES,
) -> bytes:
    """A key for one ``purpose`` (a ``LABEL_*`` constant) bound to ``session_id`` and ``context``.

    Raises:
        ConfigError: ``purpose`` is not one of the registered labels or session id is empty.
    """
    if purpose not in LABELS:
        raise ConfigError(
            f"purpose must be one of the registered secfed/v1 labels (got {purpose!r})"
        )
    if not session_id:
        raise ConfigError("session_id must be non-empty (it salts every derived key)")
    return hkdf(shared_secret, salt=session_id, info=purpose + context, length=length)


@dataclass(frozen=True, slots=True, repr=False)
class IdentityKey(_RawKeyPair[Ed25519PrivateKey]):
    """A long-term Ed25519 identity (an enterprise's or the coordinator's), pinned in the roster."""

    _KEY_TYPE = Ed25519PrivateKey
    _ALGORITHM = "ed25519"

    @classmethod
    def from_pem(cls, pem: bytes) -> IdentityKey:
        """Load a PKCS#8 PEM private key (unencrypted, as written to a startup kit)."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError("identity key file is not an unencrypted PKCS#8 PEM key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"identity key must be Ed25519 (got {type(key).__name__})")
        return cls(key)

    def to_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature over ``message``."""
        return self.private.sign(bytes(message))


# Signatures already found valid in this process (see share_verifications); None = off.
_VERIFIED: dict[bytes, None] | None = None
VERIFIED_ENTRIES = 1 << 17  # then forgotten all at once (about 100 bytes each)
VERIFIED_MESSAGE_BYTES = 1 << 16  # longer messages are verified every time (one party's uploads)


def share_verifications() -> None:
    """From now on, remember in this process which (public key, signature, message) triples
    verified, and answer a repeat from memory.

    For a process that hosts many parties at once -- Flower's simulation engine runs every
    virtual site in one actor (:mod:`secfed.flower.client` turns this on when it opens a
    second site) -- where each signature a site must check is also checked by the other sites
    that receive it (at n = 100 with SecAgg+, a consistency signature by ~56 of them, an advert
    by its k neighbours). Ed25519 verification (RFC 8032, as pyca's OpenSSL backend runs it) is
    a deterministic function of these bytes, so a remembered success is the answer every party
    would compute; failures are never remembered, and the key binds the whole message (by
    SHA-256). Nothing here is secret: keys, signatures and signed messages are all public.
    Off by default: a site's own process hosts one party and would gain nothing.
    """
    global _VERIFIED
    if _VERIFIED is None:
        _VERIFIED = {}


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Verify an Ed25519 signature; returns ``None`` or raises.

    Raises:
        InvalidSignature: for any failure (bad key encoding, bad length, wrong signature) --
            one opaque error at the trust boundary.
    """
    memo, tag = _VERIFIED, b""
    if memo is not None and len(message) <= VERIFIED_MESSAGE_BYTES:
        tag = bytes(public_key) + bytes(signature) + hashlib.sha256(bytes(message)).digest()
        if tag in memo:
            return
    try:
        if len(public_key) != KEY_BYTES or len(signature) != 64:
            raise InvalidSignature()
        key = Ed25519PublicKey.from_public_bytes(bytes(public_key))
        key.verify(bytes(signature), bytes(message))
    except (_PycaInvalidSignature, ValueError, TypeError) as exc:
        raise InvalidSignature() from exc
    if tag and memo is not None:
        if len(memo) >= VERIFIED_ENTRIES:
            memo.clear()
        memo[tag] = None


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare two secrets (or MACs, hashes of secrets) in constant time."""
    return hmac.compare_digest(bytes(a), bytes(b))


def ed25519_public_key_from(data: bytes, *, source: str) -> bytes:
    """The raw 32-byte Ed25519 public key in ``data``: raw bytes, hex text, a PEM public key,
    or a PEM private key (its public half). ``source`` names where ``data`` came from in errors.

    Raises:
        ConfigError: not an Ed25519 key in any of those forms (the message never quotes key
            material).
    """
    if len(data) == KEY_BYTES:
        return data
    if b"-----BEGIN" in data:
        if b"PRIVATE KEY" in data:
            return IdentityKey.from_pem(data).public_bytes()
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"{source} is not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{source} must hold an Ed25519 key (got {type(key).__name__})")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        raw = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{source} is not hex, raw 32 bytes or PEM") from exc
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"{source}: key must be 32 bytes (got {len(raw)})")
    return raw
