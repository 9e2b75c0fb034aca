"""Generate secfed's own test vectors for masks (AES-256-CTR keystream, apply_masks) and Shamir.

Run from the repository root:  .venv/bin/python tests/crypto/vectors/generate.py

Writes ``secfed_masks.json`` and ``secfed_shamir.json`` next to this file. The mask vectors are
deterministic (fixed seeds derived from labels with SHA-256); the Shamir vectors use fresh
random coefficients each run (split_secret draws them from the OS CSPRNG), so regenerating them
changes the shares but never what they must reconstruct. The tests re-check every vector with
code independent of the code that produced it (AES-ECB on explicit counter blocks; a separate
Lagrange/Vandermonde solver).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from secfed.crypto import masking, prg, shamir

HERE = Path(__file__).resolve().parent


def label_seed(label: str) -> bytes:
    """A fixed 32-byte test seed: SHA-256 of a label (test data, not a key)."""
    return hashlib.sha256(b"secfed test vector/" + label.encode()).digest()


def high_bit_twin(seed: bytes) -> bytes:
    """The same seed with only the top bit of its first byte flipped (Flower #7522 regression)."""
    return bytes([seed[0] ^ 0x80]) + seed[1:]


def initial_accumulator(n: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """A deterministic, non-trivial starting vector (so add and subtract both wrap)."""
    values = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0xA5A5)
    return values.astype(dtype)


def mask_vectors() -> dict[str, object]:
    keystream_cases = []
    base = label_seed("keystream-0")
    seeds = [
        ("keystream-0", base),
        ("keystream-0-high-bit-twin", high_bit_twin(base)),
        ("keystream-1", label_seed("keystream-1")),
    ]
    for name, seed in seeds:
        for dtype, n, offset in ((np.uint64, 37, 0), (np.uint32, 101, 0), (np.uint64, 9, 4096)):
            out = np.empty(n, dtype=dtype)
            prg.keystream_into(seed, out, offset_bytes=offset)
            keystream_cases.append(
                {
                    "name": name,
                    "seed": seed.hex(),
                    "dtype": np.dtype(dtype).name,
                    "length": n,
                    "offset_bytes": offset,
                    "words": [int(w) for w in out[:8]],
                    "sha256": hashlib.sha256(out.tobytes()).hexdigest(),
                }
            )
    apply_cases = []
    for dtype, n in ((np.uint64, 1), (np.uint64, 70001), (np.uint32, 140003)):
        masks = [(label_seed(f"apply-{i}"), 1 if i % 3 else -1) for i in range(5)]
        acc = initial_accumulator(n, dtype)
        masking.apply_masks(acc, masks, workers=1)
        apply_cases.append(
            {
                "dtype": np.dtype(dtype).name,
                "length": n,
                "masks": [{"seed": s.hex(), "sign": sign} for s, sign in masks],
                "initial": "initial_accumulator(length, dtype) in generate.py",
                "sha256": hashlib.sha256(acc.tobytes()).hexdigest(),
            }
        )
    return {
        "source": "secfed's own vectors, written by tests/crypto/vectors/generate.py "
        "with secfed.crypto.prg/masking; checked independently by tests/crypto/test_crypto_vectors.py",
        "keystream": keystream_cases,
        "apply_masks": apply_cases,
    }


def shamir_vectors() -> dict[str, object]:
    cases = []
    for threshold, n_shares in ((1, 1), (2, 3), (3, 5), (7, 10)):
        secret = label_seed(f"shamir-{threshold}-of-{n_shares}")
        shares = shamir.split_secret(secret, threshold=threshold, n_shares=n_shares)
        cases.append(
            {
                "threshold": threshold,
                "n_shares": n_shares,
                "secret": secret.hex(),
                "shares": [s.to_bytes().hex() for s in shares],
            }
        )
    edge = (shamir.PRIME - 1).to_bytes(33, "big")  # the largest field element
    edge_shares = shamir.split_int(shamir.PRIME - 1, threshold=2, n_shares=2)
    return {
        "source": "secfed's own vectors, written by tests/crypto/vectors/generate.py with "
        "secfed.crypto.shamir (random coefficients); checked independently by "
        "tests/crypto/test_crypto_vectors.py",
        "prime": hex(shamir.PRIME),
        "cases": cases,
        "largest_element": {
            "value": edge.hex(),
            "threshold": 2,
            "shares": [s.to_bytes().hex() for s in edge_shares],
        },
    }


def main() -> None:
    for name, content in (
        ("secfed_masks.json", mask_vectors()),
        ("secfed_shamir.json", shamir_vectors()),
    ):
        (HERE / name).write_text(json.dumps(content, indent=1) + "\n")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
