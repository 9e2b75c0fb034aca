"""Shamir secret sharing of 32-byte secrets, t-of-n, over the prime field GF(2^256 + 297).

Sharp layer. The prime exceeds 2^256 so any 32-byte seed or X25519 private key is a single
field element; share indices are x = 1..n. Coefficients come from :mod:`secrets` (OS CSPRNG).
"""

from __future__ import annotations

import functools
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from secfed.crypto.errors import ShamirError

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_Y_BYTES",
    "MAX_SHARES",
    "Share",
    "split_secret",
    "combine_shares",
    "split_int",
    "combine_int",
    "evaluate_polynomial",
    "lagrange_weights_at_zero",
]

PRIME = 2**256 + 297  # smallest prime above 2^256 (checked in tests/crypto/test_shamir.py)
SECRET_BYTES = 32
SHARE_Y_BYTES = 33  # y < PRIME < 2^264
MAX_SHARES = 65535  # x fits the 2-byte wire field


@dataclass(frozen=True, slots=True)
class Share:
    """One share: the evaluation point ``x`` (1..n) and ``y = f(x)`` in GF(PRIME)."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """2-byte big-endian x then 33-byte big-endian y."""
        return self.x.to_bytes(2, "big") + self.y.to_bytes(SHARE_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Share:
        """Parse :meth:`to_bytes` output. Raises ShamirError on a bad length or range."""
        if len(raw) != 2 + SHARE_Y_BYTES:
            raise ShamirError(f"share must be {2 + SHARE_Y_BYTES} bytes (got {len(raw)})")
        x = int.from_bytes(raw[:2], "big")
        y = int.from_bytes(raw[2:], "big")
        if not 1 <= x <= MAX_SHARES or y >= PRIME:
            raise ShamirError(
                f"share index must be in [1, {MAX_SHARES}] and value below the prime (got x={x})"
            )
        return cls(x, y)

    def __repr__(self) -> str:  # a share is secret material
        return f"Share(x={self.x}, y=<redacted>)"


def _check_params(threshold: int, n_shares: int, prime: int) -> None:
    # x must stay below the prime: x = prime would be x = 0, the share that IS the secret.
    top = min(MAX_SHARES, prime - 1)
    if not 1 <= n_shares <= top:
        raise ShamirError(f"n_shares must be in [1, {top}] (got {n_shares})")
    if not 1 <= threshold <= n_shares:
        raise ShamirError(f"threshold must be in [1, {n_shares}] (got {threshold})")


def evaluate_polynomial(coefficients: Sequence[int], x: int, *, prime: int = PRIME) -> int:
    """f(x) mod ``prime`` for f = c0 + c1 x + ... (Horner). The share computation, exposed so
    tests can enumerate every polynomial over a toy field."""
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % prime
    return y


def split_int(secret: int, *, threshold: int, n_shares: int, prime: int = PRIME) -> list[Share]:
    """Split a field element into ``n_shares`` shares, any ``threshold`` of which reconstruct it.

    The ``threshold - 1`` higher coefficients are uniform in GF(prime) from the OS CSPRNG, so
    any ``threshold - 1`` shares are independent of the secret.

    Raises:
        ShamirError: threshold/n_shares out of range, or the secret is not a field element.
    """
    _check_params(threshold, n_shares, prime)
    if isinstance(secret, bool) or not isinstance(secret, int) or not 0 <= secret < prime:
        raise ShamirError("secret must be a field element (0 <= s < prime)")
    coefficients = [secret] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    return [
        Share(x, evaluate_polynomial(coefficients, x, prime=prime)) for x in range(1, n_shares + 1)
    ]


def combine_int(shares: Sequence[Share], *, threshold: int, prime: int = PRIME) -> int:
    """Lagrange-interpolate f(0) from the first ``threshold`` of ``shares``.

    Raises:
        ShamirError: fewer than ``threshold`` shares, duplicate or out-of-range indices.
    """
    if threshold < 1:
        raise ShamirError(f"threshold must be >= 1 (got {threshold})")
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares to reconstruct (got {len(shares)})")
    top = min(MAX_SHARES, prime - 1)
    for s in shares:
        if not isinstance(s, Share):
            raise ShamirError(f"shares must be Share objects (got {type(s).__name__})")
        if not 1 <= s.x <= top:
            raise ShamirError(f"share index must be in [1, {top}] (got {s.x})")
        if not 0 <= s.y < prime:
            raise ShamirError("share value must be a field element (0 <= y < prime)")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        duplicates = sorted(x for x, count in Counter(xs).items() if count > 1)
        raise ShamirError(f"share indices must be distinct (got duplicates {duplicates})")
    use = sorted(shares[:threshold], key=lambda s: s.x)
    weights = lagrange_weights_at_zero(tuple(s.x for s in use), prime)
    secret = 0
    for share, weight in zip(use, weights, strict=True):
        secret = (secret + share.y * weight) % prime
    return secret


@functools.lru_cache(maxsize=256)
def lagrange_weights_at_zero(xs: tuple[int, ...], prime: int = PRIME) -> tuple[int, ...]:
    """Weights w_i with f(0) = sum(w_i * f(x_i)) for distinct nonzero ``xs`` in GF(prime).

    w_i = prod_{j != i} x_j / (x_j - x_i). Depends on the public indices only (never on share
    values), so it is cached: a coordinator that reconstructs one secret per enterprise from the
    same responders computes the O(t^2) weights once, then pays t multiplications per secret.
    The t denominators are inverted together (Montgomery's trick: one modular inversion).
    """
    numerators, denominators = [], []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        numerators.append(num)
        denominators.append(den)
    prefix = [1]
    for den in denominators:
        prefix.append(prefix[-1] * den % prime)
    inverse = pow(prefix[-1], -1, prime)
    weights = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):
        weights[i] = numerators[i] * inverse * prefix[i] % prime  # inverse * prefix = 1/den_i
        inverse = inverse * denominators[i] % prime
    return tuple(weights)


def split_secret(secret: bytes, *, threshold: int, n_shares: int) -> list[Share]:
    """Split a 32-byte secret (a seed or a private key) t-of-n."""
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_BYTES:
        got = len(secret) if isinstance(secret, bytes | bytearray) else type(secret).__name__
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes (got {got})")
    return split_int(int.from_bytes(secret, "big"), threshold=threshold, n_shares=n_shares)


def combine_shares(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Reconstruct a 32-byte secret from ``threshold`` shares.

    Raises:
        ShamirError: too few / duplicate / out-of-range shares, or shares that are not of one
            32-byte secret (the interpolated value does not fit in 32 bytes).
    """
    value = combine_int(shares, threshold=threshold)
    if value >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("shares are inconsistent: reconstructed value is not a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")
