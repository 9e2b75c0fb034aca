"""Fixed-point encoding: round trips, sums, and a headroom check that is exact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from secfed.crypto.encoding import check_headroom, decode, encode, ring_dtype
from secfed.errors import ConfigError, EncodingError, HeadroomError

unit_floats = st.floats(-1.0, 1.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    vectors=st.integers(1, 12).flatmap(
        lambda n: st.lists(
            hnp.arrays(np.float32, st.just(17), elements=unit_floats), min_size=n, max_size=n
        )
    ),
    ring_bits=st.sampled_from((64, 32)),
)
def test_sum_of_encodings_decodes_to_float_sum_within_n_ulps(vectors, ring_bits) -> None:
    n = len(vectors)
    total = np.zeros(17, dtype=ring_dtype(ring_bits))
    for v in vectors:
        total += encode(v, n_participants=n, ring_bits=ring_bits)
    exact = np.sum(np.array(vectors, dtype=np.float64), axis=0)
    assert np.max(np.abs(decode(total) - exact)) <= n * 2.0**-24


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        st.sampled_from((np.float32, np.float64)),
        st.integers(0, 64),
        elements=st.floats(-1e6, 1e6, allow_nan=False, width=32),
    ),
    scale_bits=st.integers(0, 30),
)
def test_round_trip_within_half_a_unit(x, scale_bits) -> None:
    v = encode(x, scale_bits=scale_bits)
    assert v.dtype == np.uint64 and v.shape == x.shape
    back = decode(v, scale_bits=scale_bits)
    assert np.all(np.abs(back - x.astype(np.float64)) <= 2.0 ** (-scale_bits - 1))


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 1000),
    units=st.integers(0, 2**31),
    ring_bits=st.just(32),
    scale_bits=st.integers(0, 20),
)
def test_headroom_raises_exactly_when_n_copies_could_wrap(n, units, ring_bits, scale_bits) -> None:
    """Around the boundary: max_abs = units / 2^s exactly. No error => n copies of +max and of
    -max decode exactly; error => n copies of +max do wrap."""
    max_abs = units / 2.0**scale_bits
    limit = 2 ** (ring_bits - 1) - 1
    wraps = n * units > limit
    x = np.array([max_abs, -max_abs], dtype=np.float64)
    if wraps:
        with pytest.raises(HeadroomError) as info:
            check_headroom(
                n_participants=n, max_abs=max_abs, scale_bits=scale_bits, ring_bits=ring_bits
            )
        message = str(info.value)
        assert str(n) in message and f"2^{scale_bits}" in message and f"2^{ring_bits}" in message
        with pytest.raises(HeadroomError):
            encode(x, n_participants=n, scale_bits=scale_bits, ring_bits=ring_bits)
        # The wrap is real: the true sum leaves the centred interval.
        assert n * units > limit
    else:
        check_headroom(
            n_participants=n, max_abs=max_abs, scale_bits=scale_bits, ring_bits=ring_bits
        )
        v = encode(x, n_participants=n, scale_bits=scale_bits, ring_bits=ring_bits)
        total = np.zeros(2, dtype=np.uint32)
        for _ in range(min(n, 3)):
            total += v
        total += v * np.uint32(n - min(n, 3))  # the remaining copies, mod 2^32
        assert np.array_equal(decode(total, scale_bits=scale_bits), n * x)


@pytest.mark.parametrize(
    ("ring_bits", "n", "largest_ok", "first_bad"),
    [
        (32, 7, (2**31 - 1) // 7, (2**31 - 1) // 7 + 1),
        # float64 spacing at 2^62 is 2^10: the largest float below 2^62 still fits twice.
        (64, 2, 2.0**62 - 2.0**10, 2.0**62),
    ],
)
def test_headroom_boundary_is_tight(ring_bits, n, largest_ok, first_bad) -> None:
    check_headroom(n_participants=n, max_abs=float(largest_ok), scale_bits=0, ring_bits=ring_bits)
    with pytest.raises(HeadroomError, match=f"sum of {n} participants"):
        check_headroom(
            n_participants=n, max_abs=float(first_bad), scale_bits=0, ring_bits=ring_bits
        )


def test_default_scale_headroom_for_a_clipped_update() -> None:
    # 1000 participants with |x| <= 1000 at 2^24 fit Z_(2^64) (1000*1000*2^24 ~ 1.7e13).
    check_headroom(n_participants=1000, max_abs=1000.0)
    with pytest.raises(HeadroomError):
        check_headroom(n_participants=1000, max_abs=1000.0, ring_bits=32)


def test_float32_and_float64_encodings_agree() -> None:
    x32 = np.random.default_rng(7).standard_normal(10_001).astype(np.float32)
    assert np.array_equal(encode(x32), encode(x32.astype(np.float64)))
    assert np.array_equal(encode(x32, ring_bits=32), encode(x32.astype(np.float64), ring_bits=32))


def test_rounding_is_half_to_even_like_numpy() -> None:
    x = np.array([0.5, 1.5, -0.5, -1.5, 2.5], dtype=np.float64)
    assert decode(encode(x, scale_bits=0), scale_bits=0).tolist() == [0.0, 2.0, -0.0, -2.0, 2.0]


def test_negative_values_use_twos_complement_residues() -> None:
    v = encode(np.array([-1.0]), scale_bits=0)
    assert int(v[0]) == 2**64 - 1
    v32 = encode(np.array([-1.0]), scale_bits=0, ring_bits=32)
    assert v32.dtype == np.uint32 and int(v32[0]) == 2**32 - 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad) -> None:
    with pytest.raises(EncodingError, match="NaN or infinity"):
        encode(np.array([0.0, bad], dtype=np.float32))


def test_argument_errors_name_the_value() -> None:
    with pytest.raises(EncodingError, match="1-D"):
        encode(np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="ring_bits must be 64 or 32 \\(got 16\\)"):
        encode(np.zeros(2), ring_bits=16)
    with pytest.raises(ConfigError, match="scale_bits must be in \\[0, 30\\] \\(got 31\\)"):
        encode(np.zeros(2), ring_bits=32, scale_bits=31)
    with pytest.raises(ConfigError, match="n_participants must be >= 1 \\(got 0\\)"):
        encode(np.zeros(2), n_participants=0)
    with pytest.raises(EncodingError, match="uint64 or uint32"):
        decode(np.zeros(2, dtype=np.int64))
    with pytest.raises(EncodingError, match="ring_bits=32"):
        decode(np.zeros(2, dtype=np.uint64), ring_bits=32)
    assert encode(np.zeros(0)).dtype == np.uint64


@settings(max_examples=30, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(1, 40), elements=unit_floats))
def test_encode_does_not_modify_its_input(x) -> None:
    assume(x.size > 0)
    before = x.copy()
    encode(x)
    assert np.array_equal(x, before)
