"""Shamir secret sharing over GF(2^256 + 297): the prime, thresholds, secrecy on a toy field."""

from __future__ import annotations

import itertools
import secrets
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfed.crypto import shamir
from secfed.errors import ShamirError

# Deterministic Miller-Rabin bases: the first 13 primes make the test exact below 3.3e24, and
# above that 64 fixed bases leave a composite a chance below 4^-64 -- ample for a constant.
MR_BASES = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41] + list(range(43, 300, 4))


def is_probable_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_prime_is_prime_and_the_smallest_above_2_256() -> None:
    assert shamir.PRIME == 2**256 + 297
    assert is_probable_prime(shamir.PRIME)
    assert not any(is_probable_prime(2**256 + k) for k in range(1, 297))
    # The test itself distinguishes primes from composites.
    assert is_probable_prime(2**127 - 1) and not is_probable_prime((2**61 - 1) * (2**31 - 1))


def test_any_32_byte_secret_is_one_field_element() -> None:
    assert 2**256 - 1 < shamir.PRIME
    top = b"\xff" * 32
    shares = shamir.split_secret(top, threshold=3, n_shares=5)
    assert shamir.combine_shares(shares[2:], threshold=3) == top


@settings(max_examples=25, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(1, 12),
    data=st.data(),
)
def test_any_t_shares_reconstruct_and_t_minus_1_do_not(secret, n, data) -> None:
    t = data.draw(st.integers(1, n))
    shares = shamir.split_secret(secret, threshold=t, n_shares=n)
    assert [s.x for s in shares] == list(range(1, n + 1))
    chosen = data.draw(st.permutations(shares))[:t]
    assert shamir.combine_shares(chosen, threshold=t) == secret
    wire = [shamir.Share.from_bytes(s.to_bytes()) for s in chosen]
    assert shamir.combine_shares(wire, threshold=t) == secret
    if t > 1:
        with pytest.raises(ShamirError, match=f"need {t} shares"):
            shamir.combine_shares(chosen[: t - 1], threshold=t)
        # Interpolating t-1 shares as if the threshold were t-1 gives an unrelated value.
        guess = shamir.combine_int(chosen[: t - 1], threshold=t - 1)
        assert guess != int.from_bytes(secret, "big")


TOY_PRIME = 11


@pytest.mark.parametrize(("t", "n"), [(2, 3), (3, 4)])
def test_toy_field_every_secret_equally_consistent_with_any_t_minus_1_shares(t, n) -> None:
    """Over GF(11), enumerate every polynomial of degree < t (through secfed's own share
    evaluation). For every choice of t-1 share indices and every value those shares take,
    each of the 11 secrets is consistent with exactly the same number of polynomials: the
    t-1 shares carry no information about the secret."""
    p = TOY_PRIME
    for indices in itertools.combinations(range(1, n + 1), t - 1):
        seen: dict[tuple[int, ...], Counter[int]] = {}
        for coefficients in itertools.product(range(p), repeat=t):
            values = tuple(shamir.evaluate_polynomial(coefficients, x, prime=p) for x in indices)
            seen.setdefault(values, Counter())[coefficients[0]] += 1
        assert len(seen) == p ** (t - 1)  # every share tuple occurs
        for counts in seen.values():
            assert sorted(counts) == list(range(p))
            assert set(counts.values()) == {1}  # p^t polynomials / p^(t-1) share tuples / p
    # And t shares do determine the secret, through secfed's split/combine on the toy field.
    for secret in range(p):
        shares = shamir.split_int(secret, threshold=t, n_shares=n, prime=p)
        for subset in itertools.combinations(shares, t):
            assert shamir.combine_int(list(subset), threshold=t, prime=p) == secret


def test_split_int_shares_are_uniform_over_toy_field() -> None:
    # With t=2 the single share at x=1 is secret + a1, a1 uniform: a chi-square-free check
    # that every residue occurs and none dominates.
    counts = Counter(
        shamir.split_int(3, threshold=2, n_shares=2, prime=TOY_PRIME)[0].y for _ in range(2200)
    )
    assert set(counts) == set(range(TOY_PRIME))
    assert max(counts.values()) < 2 * 200


def test_toy_field_refuses_more_shares_than_nonzero_points() -> None:
    # x = p would be x = 0: the share that is the secret itself.
    with pytest.raises(ShamirError, match="n_shares must be in \\[1, 10\\] \\(got 11\\)"):
        shamir.split_int(1, threshold=2, n_shares=TOY_PRIME, prime=TOY_PRIME)


def test_duplicate_and_out_of_range_indices_are_refused() -> None:
    shares = shamir.split_secret(secrets.token_bytes(32), threshold=3, n_shares=5)
    with pytest.raises(ShamirError, match="distinct \\(got duplicates \\[2\\]\\)"):
        shamir.combine_shares([shares[1], shares[1], shares[3]], threshold=3)
    with pytest.raises(ShamirError, match="share index must be in"):
        shamir.combine_shares([shamir.Share(0, 5), shares[1], shares[2]], threshold=3)
    with pytest.raises(ShamirError, match="share index must be in"):
        shamir.combine_shares(
            [shamir.Share(shamir.MAX_SHARES + 1, 5), shares[1], shares[2]], threshold=3
        )
    with pytest.raises(ShamirError, match="field element"):
        shamir.combine_shares([shamir.Share(1, shamir.PRIME), shares[1], shares[2]], threshold=3)
    with pytest.raises(ShamirError, match="Share objects"):
        shamir.combine_shares([(1, 2), shares[1], shares[2]], threshold=3)  # type: ignore[list-item]


def test_share_wire_format() -> None:
    share = shamir.split_secret(bytes(32), threshold=1, n_shares=3)[2]
    raw = share.to_bytes()
    assert len(raw) == 35 and raw[:2] == b"\x00\x03"
    assert shamir.Share.from_bytes(raw) == share
    for bad in (raw[:-1], raw + b"\x00", b"\x00\x00" + raw[2:], raw[:2] + b"\xff" * 33):
        with pytest.raises(ShamirError):
            shamir.Share.from_bytes(bad)
    assert "redacted" in repr(share) and str(share.y) not in repr(share)


def test_parameter_errors_name_the_value() -> None:
    with pytest.raises(ShamirError, match="threshold must be in \\[1, 3\\] \\(got 4\\)"):
        shamir.split_secret(bytes(32), threshold=4, n_shares=3)
    with pytest.raises(ShamirError, match="n_shares must be in \\[1, 65535\\] \\(got 0\\)"):
        shamir.split_secret(bytes(32), threshold=1, n_shares=0)
    with pytest.raises(ShamirError, match="secret must be 32 bytes \\(got 31\\)"):
        shamir.split_secret(bytes(31), threshold=1, n_shares=1)
    with pytest.raises(ShamirError, match="field element"):
        shamir.split_int(shamir.PRIME, threshold=1, n_shares=1)


def test_shares_of_a_secret_differ_between_splits() -> None:
    secret = secrets.token_bytes(32)
    a = shamir.split_secret(secret, threshold=2, n_shares=2)
    b = shamir.split_secret(secret, threshold=2, n_shares=2)
    assert a[0].y != b[0].y  # fresh CSPRNG coefficients each time


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=40))
def test_share_parser_accepts_only_well_formed_shares(raw) -> None:
    try:
        share = shamir.Share.from_bytes(raw)
    except ShamirError:
        assert (
            len(raw) != 35
            or raw[:2] == b"\x00\x00"
            or int.from_bytes(raw[2:], "big") >= shamir.PRIME
        )
        return
    assert share.to_bytes() == raw


@settings(max_examples=40, deadline=None)
@given(xs=st.lists(st.integers(1, 500), min_size=1, max_size=12, unique=True))
def test_lagrange_weights_reproduce_low_degree_polynomials_at_zero(xs) -> None:
    """f(0) = sum w_i f(x_i) for every polynomial of degree < t: checked on 1, x, ..., x^(t-1)
    (for x^k, k >= 1, the value at zero is 0; for the constant, 1)."""
    p = shamir.PRIME
    weights = shamir.lagrange_weights_at_zero(tuple(xs), p)
    for k in range(len(xs)):
        value = sum(w * pow(x, k, p) for w, x in zip(weights, xs, strict=True)) % p
        assert value == (1 if k == 0 else 0)


def test_cached_weights_serve_many_secrets_and_any_share_order() -> None:
    secrets_ = [secrets.token_bytes(32) for _ in range(6)]
    splits = [shamir.split_secret(s, threshold=4, n_shares=7) for s in secrets_]
    for secret, shares in zip(secrets_, splits, strict=True):
        chosen = [shares[6], shares[2], shares[4], shares[0]]  # same x-set, shuffled order
        assert shamir.combine_shares(chosen, threshold=4) == secret
        assert shamir.combine_shares(sorted(chosen, key=lambda s: s.x), threshold=4) == secret
