"""DP-SGD noise from the OS CSPRNG, snapped to a grid: the rounded Gaussian mechanism.

What the DP optimizer releases per step (before dividing by the expected batch size) is, for
each coordinate of the clipped sum ``x`` (float32, exact as a float64),

    y = gamma * k,   k = floor((x + Z) / gamma + 1/2),   Z ~ N(0, std^2),   std = sigma * C,

with the grid step ``gamma = 2^(floor(log2 std) - GRID_BITS)`` (a power of two between
``std / 2^11`` and ``std / 2^10``). ``y`` is a deterministic function of the Gaussian
mechanism's real-valued output ``x + Z``, so it is exactly as private as that mechanism
(post-processing): the RDP accountant's epsilon for (q, sigma, steps) is the epsilon of what
runs. Rounding adds at most ``gamma^2 / 4 <= std^2 / 2^20`` of variance per coordinate.

Why a grid (Mironov 2012, "On significance of the least significant bits for differential
privacy"): ``x + fl(Z)`` computed in floating point has output sets full of holes whose position
depends on ``x``, so the low-order bits of a noised value can reveal ``x`` exactly. Here every
released value is an integer multiple of ``gamma``, and the integer ``k`` has *exactly* the
distribution of the ideal real-valued computation; nothing below ``gamma`` is released.

How ``k`` is sampled exactly (no floating-point rounding decides it): Z = +/- std * A with a
random sign bit and ``A = Phi^-1(1 - W/2) >= 0`` for a uniform ``W`` in (0, 1) whose binary
digits come from the AES-256-CTR keystream of a fresh 256-bit ``secrets.token_bytes`` seed per
step (:mod:`secfed.crypto.prg`). One 64-bit word per coordinate gives the sign and 63 bits of
``W``, i.e. ``W`` is known to lie in an interval of width 2^-63; ``k`` is the bucket of every
``W`` in that interval or it is not yet decided:

- fast path (numpy, vectorised): ``t = u +/- s * A(W_mid)`` with ``u = x / gamma`` and
  ``s = std / gamma`` in [2^10, 2^11), ``A`` from ``scipy.special.ndtri``. While ``A <= 6``,
  ``|u| <= 2^27``, the error of ``t`` over the whole ``W`` interval plus all float64 rounding is
  below 2e-7 grid units: ``2^-63 / (2 phi(6.01)) <= 9.2e-12`` from the ``W`` interval,
  ``2^-52 * 1.26`` from rounding ``W`` (Mills ratio), ``6 * 2^-40`` assumed for ``ndtri``'s
  relative error (Cephes' own tests: peak 7.2e-16; checked in the tests), times ``s < 2^11``,
  plus ``2^-51 (|u| + s A)`` for the products and sums. A coordinate is decided by the fast path only if ``t`` lies more than
  ``FAST_MARGIN = 2^-16`` (~1.5e-5, 75x that bound) from a bucket edge.
- exact path (the rest, ~3e-5 of the coordinates): the bucket edges are mapped to ``W``
  through ``erfc`` in ``mpmath`` at 128 bits beyond the bits of ``W`` drawn, and compared with
  the ``W`` interval with a relative tolerance of 2^-64 of that precision; an interval that
  straddles an edge draws 64 more bits of ``W`` (``secrets.randbits``) and tries again. It never
  guesses: if 16 refinements do not decide, it raises.

So the sampler outputs ``k(W)`` for a ``W`` whose digits are the CSPRNG's; the only gap to the
ideal mechanism is AES-256-CTR being a PRG rather than true randomness (computational), and the
fast path's reliance on ``ndtri`` meeting the error bound above (checked against the exact path
in ``tests/training/test_noise.py``). The noise never comes from torch's, numpy's or ``random``'s
generators, and no seed is accepted: ``torch.manual_seed`` cannot make it repeat.
"""

from __future__ import annotations

import math
import secrets
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy.special import ndtri

from secfed.crypto.prg import keystream
from secfed.errors import DPGuardError

__all__ = [
    "FAST_MARGIN",
    "GRID_BITS",
    "SecureGaussianNoise",
    "noise_grid",
]

GRID_BITS = 10  # gamma = 2^(floor(log2 std) - 10): rounding variance <= std^2 / 2^20
FAST_MARGIN = 2.0**-16  # grid units; 75x the fast path's worst-case error (module docstring)
_FAST_MAX_A = 6.0  # phi(6.01) >= 5.9e-9 keeps the W-interval term of the error bound small
_FAST_MAX_U = 2.0**27  # |u| bound so that float64 ulps stay below 2^-24 grid units
_W_BITS = 63  # bits of W in the first word (the 64th is the sign)
_REFINE_BITS = 64
_MAX_REFINEMENTS = 16
_GUARD_BITS = 128  # mpmath precision beyond the bits of W known


def noise_grid(std: float) -> float:
    """The grid step gamma for noise of standard deviation ``std`` (a power of two).

    Raises:
        DPGuardError: ``std`` not finite and > 0.
    """
    if not (isinstance(std, int | float) and math.isfinite(std) and std > 0):
        raise DPGuardError(f"guard noise: noise std must be a finite number > 0 (got {std!r})")
    return math.ldexp(1.0, math.floor(math.log2(std)) - GRID_BITS)


class SecureGaussianNoise:
    """``values -> gamma * round((values + N(0, std^2 I)) / gamma)``; see the module docstring.

    ``std = 0`` (tests of the clipping path only, never a release) returns the values unchanged.
    Stateless apart from ``std``: every call draws a fresh 256-bit seed from the OS CSPRNG.
    """

    def __init__(self, std: float) -> None:
        if std == 0:
            self.std, self.grid, self._scale = 0.0, 0.0, Fraction(0)
            return
        self.grid = noise_grid(std)
        self.std = float(std)
        # s = std / gamma exactly (gamma is a power of two); the ideal noise std is exactly the
        # product sigma * C the optimizer was given, as a float.
        self._scale = Fraction(self.std) / Fraction(self.grid)
        self._scale_f = float(self._scale)  # exact too: division by a power of two
        self.exact_path_count = 0  # coordinates decided by the exact path (diagnostics, tests)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """A new tensor (same dtype and device) of the noised, grid-snapped ``values`` (1-D).

        Non-finite values are returned unchanged (the trainer's delta guard refuses them).

        Raises:
            DPGuardError: ``values`` not a 1-D float32 or float64 tensor.
        """
        if values.dim() != 1 or not values.is_floating_point():
            raise DPGuardError(f"guard noise: values must be a 1-D float tensor (got "
                               f"{values.dim()}-D {values.dtype})")
        if self.std == 0:
            return values.clone()
        x_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(values.dtype)
        if x_dtype is None:
            raise DPGuardError(f"guard noise: values must be float32 or float64 (got "
                               f"{values.dtype})")
        # numpy for the dtype casts: torch's .to() costs ~10x more here (thread-pool dispatch)
        x = values.detach().cpu().numpy().astype(np.float64)
        finite = np.isfinite(x)
        # NaN/inf stay as they are (as x + z would): the trainer's delta guard refuses them and
        # puts the adapter back; they carry no noise decision.
        all_finite = bool(finite.all())
        u = (x if all_finite else np.where(finite, x, 0.0)) / self.grid  # exact: 2^n divisor
        out = self.sample_buckets(u).astype(np.float64) * self.grid
        if not all_finite:
            out = np.where(finite, out, x)
        return torch.from_numpy(out.astype(x_dtype)).to(values.device)

    def sample_buckets(self, u: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """``k_i = floor(u_i + s Z_i + 1/2)`` with ``Z_i ~ N(0, 1)`` i.i.d. and ``s = std/gamma``
        (the grid units of the module docstring), sampled exactly."""
        words = keystream(secrets.token_bytes(32), u.size, np.uint64)
        k, fast = self._fast_buckets(u, words)
        for i in np.flatnonzero(~fast):
            word = int(words[i])
            k[i] = self._exact_bucket(float(u[i]), word >> _W_BITS == 1,
                                      word & ((1 << _W_BITS) - 1), int(k[i]))
            self.exact_path_count += 1
        return k

    def _fast_buckets(self, u: npt.NDArray[np.float64], words: npt.NDArray[np.uint64]
                      ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Float64 buckets from one word per coordinate (sign bit, 63 bits of W) and the mask of
        those certified (farther than FAST_MARGIN from an edge, A <= 6, |u| <= 2^27)."""
        negative = words >= np.uint64(1 << 63)  # the sign bit
        half_w = (words & np.uint64((1 << _W_BITS) - 1)).astype(np.float64)
        half_w += 0.5
        half_w *= 2.0 ** -(_W_BITS + 1)  # W_mid / 2, W_mid = (j + 1/2) 2^-63
        a = ndtri(half_w)
        np.negative(a, out=a)  # A = Phi^-1(1 - W/2) = -Phi^-1(W/2) >= 0
        t = a * self._scale_f
        np.negative(t, out=t, where=negative)
        t += u
        k = np.floor(t + 0.5)
        edge_distance = 0.5 - np.abs(t - k)  # t - k in [-1/2, 1/2): distance to k -/+ 1/2
        fast = (edge_distance > FAST_MARGIN) & (a <= _FAST_MAX_A) & (np.abs(u) <= _FAST_MAX_U)
        return k.astype(np.int64), fast

    def _exact_bucket(self, u: float, negative: bool, j: int, guess: int) -> int:
        """The bucket of every ``W`` in ``[j, j+1) 2^-bits``, refining ``W`` until decided."""
        import mpmath

        bits = _W_BITS
        k = guess
        for _ in range(_MAX_REFINEMENTS + 1):
            with mpmath.workprec(bits + _GUARD_BITS):
                w_lo = mpmath.ldexp(mpmath.mpf(j), -bits)
                w_hi = mpmath.ldexp(mpmath.mpf(j + 1), -bits)
                tol = mpmath.ldexp(mpmath.mpf(1), -(bits + _GUARD_BITS - 64))
                moved = True
                for _ in range(64):  # walk from the guess to the bucket holding W's interval
                    side = self._side(u, negative, k, w_lo, w_hi, tol, mpmath)
                    if side == 0:
                        return k
                    if side is None:
                        moved = False
                        break
                    k += side
                if moved:
                    raise DPGuardError("guard noise: exact sampler did not converge")
            j = (j << _REFINE_BITS) | secrets.randbits(_REFINE_BITS)
            bits += _REFINE_BITS
        raise DPGuardError("guard noise: exact sampler could not decide a bucket")

    def _side(self, u: float, negative: bool, k: int, w_lo: Any, w_hi: Any, tol: Any,
              mp: Any) -> int | None:
        """0: every W in [w_lo, w_hi) puts t in bucket k; -1/+1: all of them below/above it;
        None: the interval straddles an edge (or is within ``tol`` of one)."""
        below = self._w_fraction_with_t_below(u, negative, k - 0.5, w_lo, w_hi, tol, mp)
        if below == "all":
            return -1
        above = self._w_fraction_with_t_below(u, negative, k + 0.5, w_lo, w_hi, tol, mp)
        if above == "none":
            return 1
        if below == "none" and above == "all":
            return 0
        return None

    def _w_fraction_with_t_below(self, u: float, negative: bool, h: float, w_lo: Any,
                                 w_hi: Any, tol: Any, mp: Any) -> str:
        """Whether ``t(W) < h`` holds for "all", "none" or "some" W in the interval.

        t = u + s A (sign +) or u - s A (sign -), with A = sqrt(2) erfcinv(W) >= 0 decreasing
        in W, so the W with ``A >= a`` are exactly ``W <= erfc(a / sqrt 2)``.
        """
        m = mp  # the mpmath module (it ships no type information)
        s = m.mpf(self._scale.numerator) / self._scale.denominator
        if not negative:
            # t < h  <=>  A < (h - u)/s  <=>  W > erfc(a/sqrt2) (a > 0); never if a <= 0
            a = (m.mpf(h) - m.mpf(u)) / s
            if a <= 0:
                return "none"
            edge = m.erfc(a / m.sqrt(2))
            if w_lo > edge * (1 + tol):
                return "all"
            if w_hi <= edge * (1 - tol):
                return "none"
            return "some"
        # t < h  <=>  A > (u - h)/s  <=>  W < erfc(a/sqrt2) (a >= 0); always if a < 0
        a = (m.mpf(u) - m.mpf(h)) / s
        if a < 0:
            return "all"
        edge = m.erfc(a / m.sqrt(2))
        if w_hi <= edge * (1 - tol):
            return "all"
        if w_lo >= edge * (1 + tol):
            return "none"
        return "some"
