"""Known-answer tests through secfed's own wrappers (sources noted in each vector file)."""

from __future__ import annotations

import numpy as np
import pytest
from crypto_vectors import load_vectors

from secfed.crypto import keys, prg
from secfed.errors import InvalidSignature

X25519 = load_vectors("rfc7748_x25519.json")
ED25519 = load_vectors("rfc8032_ed25519.json")
HKDF = load_vectors("rfc5869_hkdf_sha256.json")
CTR = load_vectors("sp800_38a_ctr_aes256.json")
CHACHA = load_vectors("rfc8439_chacha20.json")


def x25519(scalar: bytes, u: bytes) -> bytes:
    return keys.agree(keys.X25519KeyPair.from_private_bytes(scalar), u)


@pytest.mark.parametrize("case", X25519["scalar_mult"])
def test_x25519_rfc7748_scalar_mult(case: dict[str, str]) -> None:
    out = x25519(bytes.fromhex(case["scalar"]), bytes.fromhex(case["u"]))
    assert out.hex() == case["output"]


def test_x25519_rfc7748_iterated_1_and_1000() -> None:
    k = u = bytes.fromhex(X25519["iterated"]["start"])
    for i in range(1, 1001):
        k, u = x25519(k, u), k
        if i == 1:
            assert k.hex() == X25519["iterated"]["after_1"]
    assert k.hex() == X25519["iterated"]["after_1000"]


def test_x25519_rfc7748_diffie_hellman() -> None:
    dh = X25519["diffie_hellman"]
    alice = keys.X25519KeyPair.from_private_bytes(bytes.fromhex(dh["alice_private"]))
    bob = keys.X25519KeyPair.from_private_bytes(bytes.fromhex(dh["bob_private"]))
    assert alice.public_bytes().hex() == dh["alice_public"]
    assert bob.public_bytes().hex() == dh["bob_public"]
    assert keys.agree(alice, bob.public_bytes()).hex() == dh["shared"]
    assert keys.agree(bob, alice.public_bytes()).hex() == dh["shared"]


@pytest.mark.parametrize("case", ED25519["tests"], ids=lambda c: c["name"])
def test_ed25519_rfc8032(case: dict[str, str]) -> None:
    identity = keys.IdentityKey.from_private_bytes(bytes.fromhex(case["secret_key"]))
    message = bytes.fromhex(case["message"])
    assert identity.public_bytes().hex() == case["public_key"]
    signature = identity.sign(message)
    assert signature.hex() == case["signature"]  # Ed25519 is deterministic
    keys.verify_signature(bytes.fromhex(case["public_key"]), signature, message)
    with pytest.raises(InvalidSignature):
        keys.verify_signature(bytes.fromhex(case["public_key"]), signature, message + b"\x00")


@pytest.mark.parametrize("case", HKDF["cases"], ids=lambda c: c["name"])
def test_hkdf_sha256_rfc5869(case: dict[str, object]) -> None:
    okm = keys.hkdf(
        bytes.fromhex(str(case["ikm"])),
        salt=bytes.fromhex(str(case["salt"])),
        info=bytes.fromhex(str(case["info"])),
        length=int(str(case["length"])),
    )
    assert okm.hex() == case["okm"]


def test_aes256_ctr_sp800_38a_f55_through_keystream_into() -> None:
    # keystream_into counts blocks from offset_bytes / 16, so NIST's initial counter block is
    # reached by the offset counter * 16.
    counter = int(CTR["initial_counter"], 16)
    n_blocks = len(CTR["blocks"])
    stream = np.empty(n_blocks * 16 // 8, dtype=np.uint64)
    prg.keystream_into(bytes.fromhex(CTR["key"]), stream, offset_bytes=counter * 16)
    raw = stream.tobytes()
    for i, block in enumerate(CTR["blocks"]):
        plaintext = bytes.fromhex(block["plaintext"])
        ciphertext = bytes(a ^ b for a, b in zip(plaintext, raw[16 * i : 16 * i + 16], strict=True))
        assert ciphertext.hex() == block["ciphertext"]


def test_aes256_ctr_chunked_from_nist_counter_equals_one_shot() -> None:
    counter = int(CTR["initial_counter"], 16)
    whole = np.empty(8, dtype=np.uint32)
    prg.keystream_into(bytes.fromhex(CTR["key"]), whole, offset_bytes=counter * 16)
    second = np.empty(4, dtype=np.uint32)
    prg.keystream_into(bytes.fromhex(CTR["key"]), second, offset_bytes=(counter + 1) * 16)
    assert np.array_equal(whole[4:], second)


@pytest.mark.parametrize("case", CHACHA["cases"], ids=lambda c: c["name"])
def test_chacha20_rfc8439(case: dict[str, object]) -> None:
    if "plaintext_ascii" in case:
        plaintext = str(case["plaintext_ascii"]).encode("ascii")
    else:
        plaintext = bytes.fromhex(str(case["plaintext_hex"]))
    # pyca's ChaCha20 nonce: 4-byte little-endian block counter, then the 12-byte RFC nonce.
    nonce16 = int(str(case["counter"])).to_bytes(4, "little") + bytes.fromhex(str(case["nonce"]))
    stream = np.empty(-(-len(plaintext) // 8), dtype=np.uint64)
    prg.chacha20_keystream_into(bytes.fromhex(str(case["key"])), nonce16, stream)
    raw = stream.tobytes()[: len(plaintext)]
    ciphertext = bytes(a ^ b for a, b in zip(plaintext, raw, strict=True))
    assert ciphertext.hex() == case["ciphertext"]
