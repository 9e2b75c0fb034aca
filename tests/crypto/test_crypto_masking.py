"""Keystream and masking properties: chunked/threaded == one-shot, masks cancel, seeds never
collide, bad input is refused before anything is written."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfed.crypto import masking, prg
from secfed.errors import ConfigError

DTYPES = (np.uint64, np.uint32)
seeds = st.binary(min_size=32, max_size=32)


def one_shot(acc: np.ndarray, masks: list[tuple[bytes, int]]) -> np.ndarray:
    """Reference: whole keystreams, added/subtracted with Python-free numpy wrap-around."""
    out = acc.copy()
    for seed, sign in masks:
        stream = prg.keystream(seed, acc.shape[0], acc.dtype.type)
        out = out + stream if sign > 0 else out - stream
    return out


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(min_value=0, max_value=3000),
    signs=st.lists(st.sampled_from((1, -1)), min_size=0, max_size=4),
    workers=st.integers(min_value=1, max_value=4),
    data=st.data(),
)
def test_apply_masks_equals_one_shot(dtype, n, signs, workers, data) -> None:
    masks = [(data.draw(seeds), s) for s in signs]
    start = np.arange(n, dtype=np.uint64).astype(dtype) * dtype(0x9E3779B9)
    acc = start.copy()
    masking.apply_masks(acc, masks, workers=workers)
    assert np.array_equal(acc, one_shot(start, masks))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, (1 << 16) + 3, 3 * (1 << 16) + 1, 200_001])
def test_apply_masks_threaded_odd_lengths_equal_one_shot(dtype, n) -> None:
    masks = [(secrets.token_bytes(32), sign) for sign in (1, -1, 1)]
    start = np.arange(n, dtype=np.uint64).astype(dtype)
    results = []
    for workers in (1, 2, 3):
        acc = start.copy()
        masking.apply_masks(acc, masks, workers=workers)
        results.append(acc)
    reference = one_shot(start, masks)
    for acc in results:
        assert np.array_equal(acc, reference)


def test_split_points_cover_range_on_block_boundaries() -> None:
    for itemsize in (4, 8):
        for n in (0, 1, 5, masking.MIN_WORDS_PER_WORKER * 2 + 3, 1_000_001):
            for workers in (1, 2, 3, 8):
                bounds = masking.split_points(n, itemsize, workers)
                assert len(bounds) <= workers
                covered = [i for a, b in bounds for i in (a, b)]
                if n:
                    assert covered[0] == 0 and covered[-1] == n
                    assert all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:]))
                    assert all((a * itemsize) % 16 == 0 for a, _ in bounds)


@settings(max_examples=30, deadline=None)
@given(
    n_parties=st.integers(min_value=2, max_value=7),
    length=st.integers(min_value=1, max_value=500),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_pairwise_masks_cancel_for_any_survivor_subset(n_parties, length, dtype, data) -> None:
    """Party i adds +PRG(s_ij) for j > i and -PRG(s_ij) for j < i. For any set of survivors,
    the survivors' masked sum, corrected by the masks they shared with dropped parties,
    equals the plaintext sum of the survivors mod 2^k."""
    pair_seed = {
        (i, j): data.draw(seeds) for i in range(n_parties) for j in range(i + 1, n_parties)
    }
    updates = [
        np.array(
            data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=length, max_size=length)),
            dtype=np.uint64,
        ).astype(dtype)
        for _ in range(n_parties)
    ]
    survivors = data.draw(
        st.lists(st.integers(0, n_parties - 1), min_size=1, max_size=n_parties, unique=True)
    )

    def masks_of(i: int) -> list[tuple[bytes, int]]:
        out = []
        for j in range(n_parties):
            if j != i:
                out.append((pair_seed[min(i, j), max(i, j)], 1 if j > i else -1))
        return out

    total = np.zeros(length, dtype=dtype)
    for i in survivors:
        masked = updates[i].copy()
        masking.apply_masks(masked, masks_of(i))
        masking.add_mod_(total, masked)
    # Remove the masks each survivor shared with a dropped party (as Shamir recovery allows).
    correction = [
        (pair_seed[min(i, j), max(i, j)], -1 if j > i else 1)
        for i in survivors
        for j in range(n_parties)
        if j not in survivors
    ]
    masking.apply_masks(total, correction)
    expected = np.zeros(length, dtype=dtype)
    for i in survivors:
        expected += updates[i]
    assert np.array_equal(total, expected)


@settings(max_examples=60, deadline=None)
@given(a=seeds, b=seeds)
def test_different_seeds_never_give_the_same_mask(a, b) -> None:
    if a == b:
        return
    ma = prg.keystream(a, 8)
    mb = prg.keystream(b, 8)
    assert not np.array_equal(ma, mb)


@pytest.mark.parametrize("byte_index", [0, 3, 4, 15, 16, 27, 28, 31])
def test_seeds_differing_in_one_byte_anywhere_give_unrelated_masks(byte_index) -> None:
    """Regression for Flower #7522 (a 256-bit seed folded to 32 bits into np.random): seeds
    differing only in high bytes (or only in low ones) must give unrelated masks."""
    base = bytes(32)
    for flip in (0x01, 0x80):
        other = bytearray(base)
        other[byte_index] ^= flip
        ma = prg.keystream(base, 1024)
        mb = prg.keystream(bytes(other), 1024)
        # Independent 64-bit words agree by chance with probability 2^-64 each.
        assert np.count_nonzero(ma == mb) == 0


def test_mask_words_look_uniform() -> None:
    words = prg.keystream(secrets.token_bytes(32), 1 << 16, np.uint32)
    bits = np.unpackbits(words.view(np.uint8))
    # 2^21 fair bits: mean within 6 sigma of 1/2 (sigma = 0.5 / sqrt(2^21)).
    assert abs(bits.mean() - 0.5) < 6 * 0.5 / np.sqrt(bits.size)


def test_keystream_is_little_endian_words_of_the_aes_stream() -> None:
    seed = secrets.token_bytes(32)
    words = prg.keystream(seed, 4, np.uint64)
    raw = prg.keystream(seed, 8, np.uint32).tobytes()
    assert words.tobytes() == raw
    assert int(words[0]) == int.from_bytes(raw[:8], "little")


def test_bad_inputs_are_refused_before_any_write() -> None:
    acc = np.arange(100_000, dtype=np.uint64)
    before = acc.copy()
    good = secrets.token_bytes(32)
    for masks, pattern in (
        ([(good, 1), (b"short", 1)], "masks\\[1\\] seed must be 32 bytes"),
        ([(good, 1), (good, 2)], "masks\\[1\\] sign must be \\+1 or -1"),
        ([(good, True)], "sign must be"),
        ([good], "must be a \\(seed, sign\\) pair"),
    ):
        with pytest.raises(ConfigError, match=pattern):
            masking.apply_masks(acc, masks, workers=2)
        assert np.array_equal(acc, before)
    with pytest.raises(ConfigError, match="1-D uint64/uint32"):
        masking.apply_masks(np.zeros(4, dtype=np.int64), [(good, 1)])
    with pytest.raises(ConfigError, match="C-contiguous"):
        masking.apply_masks(np.zeros(8, dtype=np.uint64)[::2], [(good, 1)])
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        masking.apply_masks(acc, [(good, 1)], workers=0)
    with pytest.raises(ConfigError, match="same dtype and shape"):
        masking.add_mod_(np.zeros(3, np.uint64), np.zeros(3, np.uint32))


def test_keystream_argument_checks() -> None:
    out = np.empty(4, dtype=np.uint64)
    with pytest.raises(ConfigError, match="multiple of 16"):
        prg.keystream_into(bytes(32), out, offset_bytes=8)
    with pytest.raises(ConfigError, match="mask seed must be 32 bytes \\(got 16\\)"):
        prg.keystream_into(bytes(16), out)
    with pytest.raises(ConfigError, match="dtype must be uint64 or uint32"):
        prg.keystream_into(bytes(32), np.empty(4, dtype=np.float64))
    with pytest.raises(ConfigError, match="below block 2\\^128"):
        prg.keystream_into(bytes(32), out, offset_bytes=((1 << 128) - 1) * 16)
    with pytest.raises(ConfigError, match="nonce must be 16 bytes"):
        prg.chacha20_keystream_into(bytes(32), bytes(12), out)


def test_keystream_larger_than_zero_piece_equals_piecewise() -> None:
    seed = secrets.token_bytes(32)
    n = (prg.ZERO_PIECE_BYTES * 2 + 40) // 8
    whole = prg.keystream(seed, n)
    tail = np.empty(n - prg.ZERO_PIECE_BYTES // 8, dtype=np.uint64)
    prg.keystream_into(seed, tail, offset_bytes=prg.ZERO_PIECE_BYTES)
    assert np.array_equal(whole[prg.ZERO_PIECE_BYTES // 8 :], tail)


@pytest.mark.parametrize("offset_blocks", [0, 1, 4097])
def test_keystream_reader_continues_the_same_stream(offset_blocks) -> None:
    seed = secrets.token_bytes(32)
    total = 3 * 1000 + 8
    whole = np.empty(total, dtype=np.uint32)
    prg.keystream_into(seed, whole, offset_bytes=offset_blocks * 16)
    reader = prg.KeystreamReader(seed, offset_bytes=offset_blocks * 16, length_bytes=total * 4)
    pieces = np.empty(total, dtype=np.uint32)
    view = pieces.data.cast("B")
    for start, stop in ((0, 1000 * 4), (1000 * 4, 2000 * 4), (2000 * 4, total * 4)):
        reader.read_into(view[start:stop])
    assert np.array_equal(pieces, whole)
    with pytest.raises(ConfigError, match="exceeds the 0 bytes left"):
        reader.read_into(view[:16])


def test_chunk_fits_one_zero_piece() -> None:
    assert masking.CHUNK_BYTES <= prg.ZERO_PIECE_BYTES
    assert masking.CHUNK_BYTES % prg.AES_BLOCK == 0
