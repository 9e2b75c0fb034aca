"""secfed's own mask and Shamir vectors (tests/crypto/vectors/generate.py), re-checked two ways:
our code must reproduce them, and code independent of ours must agree with them."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
from crypto_vectors import VECTORS, load_vectors
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secfed.crypto import masking, prg, shamir
from secfed.errors import ShamirError

MASKS = load_vectors("secfed_masks.json")
SHAMIR = load_vectors("secfed_shamir.json")


def _generator_module():
    spec = importlib.util.spec_from_file_location(
        "secfed_vector_generator", VECTORS / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator_module()


def ecb_keystream(seed: bytes, first_block: int, nbytes: int) -> bytes:
    """AES-256 keystream built block by block with ECB on explicit big-endian counters --
    independent of the CTR mode path that secfed.crypto.prg uses."""
    n_blocks = -(-nbytes // 16)
    counters = b"".join(
        ((first_block + i) % (1 << 128)).to_bytes(16, "big") for i in range(n_blocks)
    )
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    return (ecb.update(counters) + ecb.finalize())[:nbytes]


def little_endian_words(raw: bytes, dtype_name: str) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.dtype(dtype_name).newbyteorder("<"))


@pytest.mark.parametrize("case", MASKS["keystream"], ids=lambda c: f"{c['name']}-{c['dtype']}")
def test_keystream_vector_reproduced_and_independently_confirmed(case: dict) -> None:
    seed = bytes.fromhex(case["seed"])
    dtype = np.dtype(case["dtype"])
    out = np.empty(case["length"], dtype=dtype)
    prg.keystream_into(seed, out, offset_bytes=case["offset_bytes"])
    assert hashlib.sha256(out.tobytes()).hexdigest() == case["sha256"]
    assert [int(w) for w in out[:8]] == case["words"]
    independent = ecb_keystream(seed, case["offset_bytes"] // 16, out.nbytes)
    assert hashlib.sha256(independent).hexdigest() == case["sha256"]
    assert [int(w) for w in little_endian_words(independent, case["dtype"])[:8]] == case["words"]


def test_high_bit_twin_seeds_give_unrelated_masks() -> None:
    by_name = {(c["name"], c["dtype"], c["offset_bytes"]): c for c in MASKS["keystream"]}
    for dtype, offset in (("uint64", 0), ("uint32", 0), ("uint64", 4096)):
        a = by_name[("keystream-0", dtype, offset)]
        b = by_name[("keystream-0-high-bit-twin", dtype, offset)]
        assert bytes.fromhex(a["seed"])[1:] == bytes.fromhex(b["seed"])[1:]
        assert a["sha256"] != b["sha256"]
        assert all(x != y for x, y in zip(a["words"], b["words"], strict=True))


@pytest.mark.parametrize("case", MASKS["apply_masks"], ids=lambda c: f"{c['dtype']}-{c['length']}")
def test_apply_masks_vector_reproduced_and_independently_confirmed(case: dict) -> None:
    dtype = np.dtype(case["dtype"])
    masks = [(bytes.fromhex(m["seed"]), m["sign"]) for m in case["masks"]]
    for workers in (1, 2, 3):
        acc = GENERATOR.initial_accumulator(case["length"], dtype.type)
        masking.apply_masks(acc, masks, workers=workers)
        assert hashlib.sha256(acc.tobytes()).hexdigest() == case["sha256"], workers
    # Independent: Python integers mod 2^k over ECB keystream words.
    modulus = 1 << (8 * dtype.itemsize)
    values = [int(v) for v in GENERATOR.initial_accumulator(case["length"], dtype.type)]
    for seed, sign in masks:
        raw = ecb_keystream(seed, 0, case["length"] * dtype.itemsize)
        words = little_endian_words(raw, case["dtype"]).tolist()
        values = [(v + sign * w) % modulus for v, w in zip(values, words, strict=True)]
    expected = np.array(values, dtype=dtype.newbyteorder("<")).tobytes()
    assert hashlib.sha256(expected).hexdigest() == case["sha256"]


def independent_interpolate_at_zero(points: list[tuple[int, int]], prime: int) -> int:
    """f(0) by solving the Vandermonde system with Gauss-Jordan elimination mod ``prime``
    (a different algorithm from secfed's Lagrange formula)."""
    t = len(points)
    rows = [[pow(x, k, prime) for k in range(t)] + [y % prime] for x, y in points]
    for col in range(t):
        pivot = next(r for r in range(col, t) if rows[r][col] % prime)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        inv = pow(rows[col][col], prime - 2, prime)  # Fermat inverse
        rows[col] = [v * inv % prime for v in rows[col]]
        for r in range(t):
            if r != col and rows[r][col]:
                factor = rows[r][col]
                rows[r] = [
                    (a - factor * b) % prime for a, b in zip(rows[r], rows[col], strict=True)
                ]
    return rows[0][t]


def parse_share(hex_share: str) -> tuple[int, int]:
    raw = bytes.fromhex(hex_share)
    assert len(raw) == 35
    return int.from_bytes(raw[:2], "big"), int.from_bytes(raw[2:], "big")


@pytest.mark.parametrize(
    "case", SHAMIR["cases"], ids=lambda c: f"{c['threshold']}-of-{c['n_shares']}"
)
def test_shamir_vector_every_threshold_subset(case: dict) -> None:
    prime = int(SHAMIR["prime"], 16)
    assert prime == shamir.PRIME
    secret = bytes.fromhex(case["secret"])
    t = case["threshold"]
    points = [parse_share(s) for s in case["shares"]]
    assert [x for x, _ in points] == list(range(1, case["n_shares"] + 1))
    shares = [shamir.Share.from_bytes(bytes.fromhex(s)) for s in case["shares"]]
    subsets = list(itertools.combinations(range(len(points)), t))[:40]
    for subset in subsets:
        chosen = [shares[i] for i in subset]
        assert shamir.combine_shares(chosen, threshold=t) == secret
        value = independent_interpolate_at_zero([points[i] for i in subset], prime)
        assert value.to_bytes(32, "big") == secret


def test_shamir_vector_all_shares_on_one_polynomial_of_degree_t_minus_1() -> None:
    prime = int(SHAMIR["prime"], 16)
    for case in SHAMIR["cases"]:
        t = case["threshold"]
        points = [parse_share(s) for s in case["shares"]]
        if len(points) == t:
            continue
        # Interpolate independently through the first t points; every other share must lie on it.
        # g(z) = f(z + x) has g(0) = f(x) and passes through (xi - x, yi).
        base = points[:t]
        for x, y in points[t:]:
            value = independent_interpolate_at_zero([(xi - x, yi) for xi, yi in base], prime)
            assert value == y


def test_shamir_vector_largest_field_element() -> None:
    edge = SHAMIR["largest_element"]
    shares = [shamir.Share.from_bytes(bytes.fromhex(s)) for s in edge["shares"]]
    value = shamir.combine_int(shares, threshold=edge["threshold"])
    assert value == shamir.PRIME - 1 == int(edge["value"], 16)
    # It is a field element but not a 32-byte secret: combine_shares must refuse it.
    with pytest.raises(ShamirError, match="not a 32-byte secret"):
        shamir.combine_shares(shares, threshold=2)


def test_generator_reproduces_the_committed_mask_vectors() -> None:
    assert GENERATOR.mask_vectors() == MASKS
    assert Path(GENERATOR.__file__).parent == VECTORS
