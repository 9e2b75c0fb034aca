"""CKKS contexts for addition-only aggregation: sums, what each kind of context may do, and
refusal of contexts and ciphertexts with other parameters."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secfed.crypto import ckks
from secfed.errors import CkksError


@pytest.fixture(scope="module")
def secret_ctx() -> ckks.CkksContext:
    return ckks.new_context()


@pytest.fixture(scope="module")
def public_ctx(secret_ctx: ckks.CkksContext) -> ckks.CkksContext:
    return ckks.load_context(secret_ctx.serialize(secret=False), expect_secret=False)


def raw_context(
    degree: int = 8192,
    bits: tuple[int, ...] = (60, 60),
    scale_bits: int = 40,
    encryption: ts.ENCRYPTION_TYPE = ts.ENCRYPTION_TYPE.SYMMETRIC,
) -> ts.Context:
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, degree, coeff_mod_bit_sizes=list(bits), encryption_type=encryption
    )
    ctx.global_scale = 2.0**scale_bits
    return ctx


def test_sum_of_ten_encrypted_vectors_matches_plaintext_sum(secret_ctx, public_ctx) -> None:
    rng = np.random.default_rng(2024)
    length = 100_000
    updates = [rng.uniform(-1.0, 1.0, length).astype(np.float32) for _ in range(10)]
    # Each enterprise loads its own copy of the secret context from its startup kit.
    enterprise = ckks.load_context(secret_ctx.serialize(secret=True), expect_secret=True)
    uploads = [ckks.encrypt(enterprise, u) for u in updates]
    assert all(len(cts) == ckks.n_ciphertexts(length) == 25 for cts in uploads)
    total = ckks.add_encrypted(public_ctx, uploads, length=length)
    decrypted = ckks.decrypt(enterprise, total, length)
    expected = np.sum(np.array(updates, dtype=np.float64), axis=0)
    assert decrypted.shape == (length,)
    assert np.max(np.abs(decrypted - expected)) < 1e-6


def test_ciphertext_size_is_eight_times_fp32(secret_ctx) -> None:
    cts = ckks.encrypt(secret_ctx, np.zeros(4 * ckks.SLOTS, dtype=np.float32))
    per_value = sum(map(len, cts)) / (4 * ckks.SLOTS)
    assert 8 * 4 <= per_value < 8.1 * 4


@pytest.mark.parametrize("length", [1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_packing_across_ciphertexts_round_trips(secret_ctx, public_ctx, length) -> None:
    x = np.linspace(-1, 1, length)
    cts = ckks.encrypt(secret_ctx, x, workers=2)
    assert len(cts) == -(-length // 4096)
    assert np.max(np.abs(ckks.decrypt(secret_ctx, cts, length, workers=1) - x)) < 1e-7
    doubled = ckks.add_encrypted(public_ctx, [cts, cts])  # length inferred from the last slot count
    assert np.max(np.abs(ckks.decrypt(secret_ctx, doubled, length) - 2 * x)) < 1e-7


def test_public_context_cannot_decrypt_or_encrypt(secret_ctx, public_ctx) -> None:
    cts = ckks.encrypt(secret_ctx, np.ones(10))
    with pytest.raises(CkksError, match="decryption needs the enterprise's secret"):
        ckks.decrypt(public_ctx, cts, 10)
    with pytest.raises(CkksError, match="encryption needs the enterprise's secret"):
        ckks.encrypt(public_ctx, np.ones(10))
    with pytest.raises(CkksError, match="no secret key"):
        public_ctx.serialize(secret=True)
    # Even TenSEAL itself refuses once the ciphertext is bound to the public context.
    vec = ts.ckks_vector_from(public_ctx.tenseal, cts[0])
    with pytest.raises(ValueError):
        vec.decrypt()


def test_public_serialisation_carries_no_keys(secret_ctx) -> None:
    public_bytes = secret_ctx.serialize(secret=False)
    loaded = ts.context_from(public_bytes)
    assert not loaded.has_secret_key()
    assert not loaded.has_galois_keys()
    assert not loaded.has_relin_keys()
    assert len(public_bytes) < 1024  # parameters only; a secret key alone is ~130 KB
    secret_bytes = secret_ctx.serialize(secret=True)
    assert not ts.context_from(secret_bytes).has_galois_keys()


def test_loading_refuses_the_wrong_kind_of_context(secret_ctx) -> None:
    with pytest.raises(
        CkksError, match="expected a public ckks context \\(got one with the secret"
    ):
        ckks.load_context(secret_ctx.serialize(secret=True), expect_secret=False)
    with pytest.raises(CkksError, match="expected a secret ckks context \\(got one without"):
        ckks.load_context(secret_ctx.serialize(secret=False), expect_secret=True)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"degree": 16384}, "poly_modulus_degree must be 8192 \\(got 16384\\)"),
        (
            {"bits": (60, 40, 60)},
            "coefficient moduli must be \\[60, 60\\] bits \\(got \\[60, 40, 60\\]\\)",
        ),
        ({"bits": (50, 50)}, "coefficient moduli must be \\[60, 60\\]"),
        ({"scale_bits": 30}, "global scale must be 2\\^40 \\(got 2\\^30\\)"),
        ({"encryption": ts.ENCRYPTION_TYPE.ASYMMETRIC}, "must use symmetric encryption"),
    ],
)
def test_wrong_parameter_contexts_are_refused(kwargs, pattern) -> None:
    raw = raw_context(**kwargs)
    for secret in (True, False):
        data = raw.serialize(
            save_public_key=False,
            save_secret_key=secret,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        with pytest.raises(CkksError, match=pattern):
            ckks.load_context(data, expect_secret=secret)
    with pytest.raises(CkksError, match=pattern):
        ckks.CkksContext(raw)


def test_context_with_galois_or_relin_keys_is_refused() -> None:
    raw = raw_context()
    raw.generate_galois_keys()
    data = raw.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=True, save_relin_keys=True
    )
    with pytest.raises(CkksError, match="no Galois or relinearisation keys"):
        ckks.load_context(data, expect_secret=False)


@pytest.mark.parametrize("data", [b"", b"\x00" * 40, b"not a context at all"])
def test_garbage_context_bytes_are_refused(data) -> None:
    with pytest.raises(CkksError):
        ckks.load_context(data, expect_secret=False)


def test_add_refuses_bad_contributions(secret_ctx, public_ctx) -> None:
    good = ckks.encrypt(secret_ctx, np.ones(5000))
    with pytest.raises(CkksError, match="at least one contribution"):
        ckks.add_encrypted(public_ctx, [])
    with pytest.raises(CkksError, match="contribution 1 must have 2 ciphertexts \\(got 1\\)"):
        ckks.add_encrypted(public_ctx, [good, good[:1]], length=5000)
    short = ckks.encrypt(secret_ctx, np.ones(10))
    with pytest.raises(CkksError, match="contribution 1\\[0\\]: ciphertext must hold 4096 values"):
        ckks.add_encrypted(public_ctx, [good, [short[0], good[1]]], length=5000)
    with pytest.raises(
        CkksError, match="contribution 0\\[1\\]: ciphertext bytes could not be parsed"
    ):
        ckks.add_encrypted(public_ctx, [[good[0], b"\x01\x02garbage"], good], length=5000)
    # Same parameters but another scale: loads in SEAL, refused by secfed.
    other = raw_context(scale_bits=30)
    odd_scale = ts.ckks_vector(other, [1.0] * 4096).serialize()
    with pytest.raises(CkksError, match="scale must be 2\\^40"):
        ckks.add_encrypted(public_ctx, [good, [odd_scale, good[1]]], length=5000)


def test_decrypt_refuses_mismatched_length(secret_ctx) -> None:
    cts = ckks.encrypt(secret_ctx, np.ones(5000))
    with pytest.raises(CkksError, match="must have 1 ciphertexts \\(got 2\\)"):
        ckks.decrypt(secret_ctx, cts, 4096)
    with pytest.raises(
        CkksError, match="ciphertext 1: ciphertext must hold 905 values \\(got 904\\)"
    ):
        ckks.decrypt(secret_ctx, cts, 5001)


def test_another_secret_key_decrypts_to_noise(secret_ctx) -> None:
    x = np.full(100, 0.5)
    cts = ckks.encrypt(secret_ctx, x)
    stranger = ckks.new_context()
    assert np.max(np.abs(ckks.decrypt(stranger, cts, 100) - x)) > 1.0


def test_encrypt_refuses_non_finite_and_bad_shapes(secret_ctx) -> None:
    with pytest.raises(CkksError, match="NaN or infinity"):
        ckks.encrypt(secret_ctx, np.array([1.0, np.nan]))
    with pytest.raises(CkksError, match="1-D and non-empty"):
        ckks.encrypt(secret_ctx, np.zeros((2, 2)))
    with pytest.raises(CkksError, match="1-D and non-empty"):
        ckks.encrypt(secret_ctx, np.zeros(0))


def test_repr_says_which_kind(secret_ctx, public_ctx) -> None:
    assert "secret" in repr(secret_ctx) and "public" in repr(public_ctx)
    assert secret_ctx.has_secret and not public_ctx.has_secret
    assert not secret_ctx.public().has_secret


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_ciphertexts_raise_only_ckks_error(secret_ctx, public_ctx, data) -> None:
    """Fuzz the coordinator's parser: truncated, extended or bit-flipped ciphertext bytes either
    add (HE ciphertexts are malleable; uploads are signed one layer up) or raise CkksError --
    never another exception, never a crash."""
    blob = _fuzz_base(secret_ctx)
    mutated = bytearray(blob)
    kind = data.draw(st.sampled_from(["truncate", "extend", "flip", "header"]))
    if kind == "truncate":
        mutated = mutated[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "extend":
        mutated += data.draw(st.binary(min_size=1, max_size=64))
    else:
        limit = 256 if kind == "header" else len(blob)
        for index in data.draw(st.lists(st.integers(0, limit - 1), min_size=1, max_size=8)):
            mutated[index] ^= data.draw(st.integers(1, 255))
    try:
        ckks.add_encrypted(public_ctx, [[bytes(mutated)], [blob]], length=ckks.SLOTS, workers=1)
    except CkksError:
        pass


_FUZZ_BASE: dict[str, bytes] = {}


def _fuzz_base(secret_ctx: ckks.CkksContext) -> bytes:
    if "blob" not in _FUZZ_BASE:
        _FUZZ_BASE["blob"] = ckks.encrypt(secret_ctx, np.ones(ckks.SLOTS))[0]
    return _FUZZ_BASE["blob"]


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_context_bytes_raise_only_ckks_error(data) -> None:
    with pytest.raises(CkksError):
        ckks.load_context(data, expect_secret=False)
