"""Regression for Flower issue #7522 (a seed folded to 32 bits): distinct 256-bit seeds, even ones
that agree on 32 (or 255) bits, never give the same mask."""

from __future__ import annotations

import numpy as np

from secfed.crypto.keys import LABEL_PAIRWISE_MASK, derive_key
from secfed.crypto.masking import apply_masks


def _mask(seed: bytes, d: int = 4096) -> np.ndarray:
    acc = np.zeros(d, dtype=np.uint64)
    apply_masks(acc, [(seed, 1)])
    return acc


def test_seeds_sharing_low_32_bits_give_different_masks() -> None:
    low = bytes(range(4))
    seeds = [bytes([hi]) * 28 + low for hi in range(16)]
    masks = {_mask(s).tobytes() for s in seeds}
    assert len(masks) == len(seeds)


def test_one_bit_apart_gives_unrelated_masks() -> None:
    a = bytes(32)
    for bit in (0, 31, 32, 128, 255):
        b = bytearray(a)
        b[bit // 8] ^= 1 << (bit % 8)
        ma, mb = _mask(a), _mask(bytes(b))
        # unrelated streams: about half of all bits differ
        differing = np.unpackbits((ma ^ mb).view(np.uint8)).mean()
        assert 0.45 < differing < 0.55


def test_pairwise_seeds_are_bound_to_the_session() -> None:
    shared = bytes(range(32))
    s1 = derive_key(shared, session_id=b"\x01" * 32, purpose=LABEL_PAIRWISE_MASK)
    s2 = derive_key(shared, session_id=b"\x02" * 32, purpose=LABEL_PAIRWISE_MASK)
    assert s1 != s2 and not np.array_equal(_mask(s1), _mask(s2))
