"""Key agreement, identities and labelled derivation beyond the known-answer vectors."""

from __future__ import annotations

from typing import Any

import pytest

from secfed.crypto import keys
from secfed.errors import ConfigError, CryptoError, InvalidSignature

SESSION = b"\x07" * 32


def test_agreement_is_symmetric_and_fresh() -> None:
    a, b = keys.X25519KeyPair.generate(), keys.X25519KeyPair.generate()
    assert keys.agree(a, b.public_bytes()) == keys.agree(b, a.public_bytes())
    assert keys.X25519KeyPair.generate().public_bytes() != a.public_bytes()
    again = keys.X25519KeyPair.from_private_bytes(a.private_bytes())
    assert again.public_bytes() == a.public_bytes()


def test_small_order_public_key_is_rejected() -> None:
    with pytest.raises(CryptoError, match="small-order"):
        keys.agree(keys.X25519KeyPair.generate(), bytes(32))  # u = 0


def test_derived_keys_are_separated_by_purpose_session_and_context() -> None:
    shared = b"\x42" * 32
    derived = {keys.derive_key(shared, session_id=SESSION, purpose=label) for label in keys.LABELS}
    assert len(derived) == len(keys.LABELS)
    base = keys.derive_key(shared, session_id=SESSION, purpose=keys.LABEL_PAIRWISE_MASK)
    assert base != keys.derive_key(
        shared, session_id=b"\x08" * 32, purpose=keys.LABEL_PAIRWISE_MASK
    )
    assert base != keys.derive_key(
        shared, session_id=SESSION, purpose=keys.LABEL_PAIRWISE_MASK, context=b"round 2"
    )
    # The construction is exactly HKDF(salt=session, info=label + context).
    assert base == keys.hkdf(shared, salt=SESSION, info=keys.LABEL_PAIRWISE_MASK)
    assert all(label.startswith(b"secfed/v1/") for label in keys.LABELS)


def test_derive_key_refuses_unknown_labels_and_empty_sessions() -> None:
    with pytest.raises(ConfigError, match="registered secfed/v1 labels"):
        keys.derive_key(b"k" * 32, session_id=SESSION, purpose=b"secfed/v1/other")
    with pytest.raises(ConfigError, match="session_id must be non-empty"):
        keys.derive_key(b"k" * 32, session_id=b"", purpose=keys.LABEL_SELF_MASK)
    with pytest.raises(ConfigError, match="hkdf length must be in \\[1, 8160\\] \\(got 8161\\)"):
        keys.hkdf(b"k", salt=b"s", info=b"i", length=8161)


def test_identity_sign_verify_and_pem_round_trip() -> None:
    identity = keys.IdentityKey.generate()
    message = b"round 3 key advertisement"
    signature = identity.sign(message)
    keys.verify_signature(identity.public_bytes(), signature, message)
    loaded = keys.IdentityKey.from_pem(identity.to_pem())
    assert loaded.public_bytes() == identity.public_bytes()
    keys.verify_signature(loaded.public_bytes(), loaded.sign(message), message)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda pk, sig, msg: (pk, sig, msg + b"!"),
        lambda pk, sig, msg: (pk, bytes([sig[0] ^ 1]) + sig[1:], msg),
        lambda pk, sig, msg: (pk, sig[:63], msg),
        lambda pk, sig, msg: (pk[:31], sig, msg),
        lambda pk, sig, msg: (keys.IdentityKey.generate().public_bytes(), sig, msg),
        lambda pk, sig, msg: (b"\xff" * 32, sig, msg),  # not a curve point
    ],
)
def test_every_verification_failure_is_one_opaque_error(mutate) -> None:
    identity = keys.IdentityKey.generate()
    args = mutate(identity.public_bytes(), identity.sign(b"m"), b"m")
    with pytest.raises(InvalidSignature) as info:
        keys.verify_signature(*args)
    assert str(info.value) == "signature verification failed"


def test_from_pem_refuses_garbage_and_other_key_types() -> None:
    with pytest.raises(ConfigError, match="PKCS#8 PEM"):
        keys.IdentityKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    other = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigError, match="must be Ed25519 \\(got X25519PrivateKey\\)"):
        keys.IdentityKey.from_pem(other)


def test_reprs_never_show_private_material() -> None:
    pair = keys.X25519KeyPair.generate()
    identity = keys.IdentityKey.generate()
    assert pair.private_bytes().hex() not in repr(pair)
    assert pair.private_bytes().hex()[:16] not in repr(pair)
    assert identity.private_bytes().hex()[:16] not in repr(identity)


def test_constant_time_equal() -> None:
    assert keys.constant_time_equal(b"abc", b"abc")
    assert not keys.constant_time_equal(b"abc", b"abd")
    assert not keys.constant_time_equal(b"abc", b"ab")


def test_private_key_length_is_checked() -> None:
    with pytest.raises(ConfigError, match="x25519 private key must be 32 bytes \\(got 31\\)"):
        keys.X25519KeyPair.from_private_bytes(bytes(31))
    with pytest.raises(ConfigError, match="peer public key must be 32 bytes"):
        keys.agree(keys.X25519KeyPair.generate(), bytes(33))


def test_ed25519_public_key_from_every_form(tmp_path) -> None:
    """Raw, hex, PEM public and PEM private forms give the same 32 bytes; other keys and junk
    are refused with an error that names the source and quotes no key material."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from secfed.crypto.keys import IdentityKey, ed25519_public_key_from
    from secfed.errors import ConfigError

    ident = IdentityKey.generate()
    raw = ident.public_bytes()
    pub_pem = ident.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for form in (raw, raw.hex().encode() + b"\n", pub_pem, ident.to_pem()):
        assert ed25519_public_key_from(form, source="key file k") == raw
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ConfigError, match="key file k must hold an Ed25519 key"):
        ed25519_public_key_from(ec_pem, source="key file k")
    with pytest.raises(ConfigError, match="key file k: key must be 32 bytes") as info:
        ed25519_public_key_from(raw.hex()[:40].encode(), source="key file k")
    assert raw.hex()[:40] not in str(info.value)
    with pytest.raises(ConfigError, match="not hex, raw 32 bytes or PEM"):
        ed25519_public_key_from(b"\xff\xfe not a key", source="key file k")


class _CountingEd25519:
    """crypto.keys' Ed25519PublicKey, counting the verifications that really run."""

    calls = 0

    def __init__(self, key: Any) -> None:
        self._key = key

    @classmethod
    def from_public_bytes(cls, data: bytes) -> _CountingEd25519:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return cls(Ed25519PublicKey.from_public_bytes(data))

    def verify(self, signature: bytes, message: bytes) -> None:
        type(self).calls += 1
        self._key.verify(signature, message)


def test_shared_verifications_answer_a_repeat_from_memory_and_never_a_forgery(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A process hosting many sites (Flower's simulation actor) checks each signature once; a
    # remembered success must be exactly that triple: another message, signature or key is
    # verified for real, and a failure is never remembered.
    monkeypatch.setattr(keys, "_VERIFIED", None)
    monkeypatch.setattr(keys, "Ed25519PublicKey", _CountingEd25519)
    _CountingEd25519.calls = 0
    signer, other = keys.IdentityKey.generate(), keys.IdentityKey.generate()
    message = b"consistency: survivors 0..99"
    sig = signer.sign(message)
    keys.verify_signature(signer.public_bytes(), sig, message)
    keys.verify_signature(signer.public_bytes(), sig, message)
    assert _CountingEd25519.calls == 2  # off by default: every check runs

    keys.share_verifications()
    keys.verify_signature(signer.public_bytes(), sig, message)
    for _ in range(5):
        keys.verify_signature(signer.public_bytes(), sig, message)
    assert _CountingEd25519.calls == 3  # on: the repeats come from memory
    forged = [
        (signer.public_bytes(), sig, message + b"!"),  # another message
        (other.public_bytes(), sig, message),  # another key
        (signer.public_bytes(), bytes(64), message),  # another signature
    ]
    for _ in range(2):
        for key, signature, msg in forged:
            with pytest.raises(InvalidSignature):
                keys.verify_signature(key, signature, msg)
    assert _CountingEd25519.calls == 3 + 2 * len(forged)  # failures are checked every time
