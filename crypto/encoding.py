"""Fixed-point encoding of float vectors into the ring Z_(2^64) (or the compact Z_(2^32)).

Sharp layer. ``encode`` maps x to round(x * 2^scale_bits) mod 2^k; ``decode`` lifts each ring
element to the centred interval [-2^(k-1), 2^(k-1)) and divides by the scale. The sum of n
encodings decodes to the float sum (within n * 2^-scale_bits / 2) as long as the true sum never
leaves the centred interval -- :func:`check_headroom` refuses inputs for which it could.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from secfed.crypto.errors import ConfigError, EncodingError, HeadroomError

__all__ = [
    "DEFAULT_SCALE_BITS",
    "RING_BITS",
    "ring_dtype",
    "check_headroom",
    "encode",
    "decode",
]

DEFAULT_SCALE_BITS = 24  # 2^-24 ~ 6e-8 resolution: below fp32 noise of a LoRA delta
RING_BITS = (64, 32)

RingBits = Literal[64, 32]


def ring_dtype(ring_bits: int) -> type[np.unsignedinteger]:
    """``np.uint64`` for Z_(2^64), ``np.uint32`` for Z_(2^32)."""
    if ring_bits == 64:
        return np.uint64
    if ring_bits == 32:
        return np.uint32
    raise ConfigError(f"ring_bits must be 64 or 32 (got {ring_bits})")


def _check_scale(scale_bits: int, ring_bits: int) -> None:
    if not 0 <= scale_bits < ring_bits - 1:
        raise ConfigError(f"scale_bits must be in [0, {ring_bits - 2}] (got {scale_bits})")


def _max_units(max_abs: float, scale_bits: int) -> int:
    """The largest |encoded value| a float of magnitude ``max_abs`` rounds to (exact integer)."""
    # max_abs * 2^s is exact in binary floating point and rint rounds half to even exactly
    # like encode() does, so this is the exact worst case, not an estimate.
    return int(np.rint(float(max_abs) * 2.0**scale_bits))


def check_headroom(
    *,
    n_participants: int,
    max_abs: float,
    scale_bits: int = DEFAULT_SCALE_BITS,
    ring_bits: int = 64,
) -> None:
    """Raise exactly when ``n_participants`` encodings of magnitude <= ``max_abs`` could wrap.

    With m = round(max_abs * 2^scale_bits), the sum of n such encodings lies in [-n*m, n*m];
    the centred lift decodes it correctly iff n*m <= 2^(ring_bits-1) - 1. The check is exact
    integer arithmetic, so it raises for the first max_abs that could wrap and never before.

    Raises:
        HeadroomError: the sum could wrap; the message names all four numbers.
        EncodingError: ``max_abs`` is not finite.
        ConfigError: bad parameters.
    """
    ring_dtype(ring_bits)
    _check_scale(scale_bits, ring_bits)
    if isinstance(n_participants, bool) or not isinstance(n_participants, int | np.integer):
        raise ConfigError(f"n_participants must be an int (got {type(n_participants).__name__})")
    if n_participants < 1:
        raise ConfigError(f"n_participants must be >= 1 (got {n_participants})")
    if not np.isfinite(max_abs):
        raise EncodingError(f"vector contains a non-finite value (max |x| = {max_abs})")
    if max_abs < 0:
        raise ConfigError(f"max_abs must be >= 0 (got {max_abs})")
    worst = int(n_participants) * _max_units(max_abs, scale_bits)
    limit = 2 ** (ring_bits - 1) - 1
    if worst > limit:
        raise HeadroomError(
            f"sum of {n_participants} participants with max |x| = {max_abs:.9g} at scale "
            f"2^{scale_bits} reaches {worst} (= {worst / 2.0**scale_bits:.6g} after scaling), "
            f"which wraps the ring Z_(2^{ring_bits}) (largest safe sum 2^{ring_bits - 1} - 1)"
        )


def encode(
    x: npt.ArrayLike,
    *,
    scale_bits: int = DEFAULT_SCALE_BITS,
    ring_bits: int = 64,
    n_participants: int = 1,
) -> npt.NDArray[np.unsignedinteger]:
    """Encode a float vector into the ring, checking headroom for ``n_participants`` summands.

    float32 input is scaled and rounded in float32 (exact: the scale is a power of two and
    every rounded value is an integer float32 represents), other input in float64; one
    temporary of the input's width and the output are the only allocations.

    Raises:
        EncodingError: non-finite values or a non-1-D input.
        HeadroomError: the sum of ``n_participants`` such vectors could wrap the ring.
    """
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise EncodingError(f"vector must be 1-D (got shape {arr.shape})")
    dtype = ring_dtype(ring_bits)
    _check_scale(scale_bits, ring_bits)
    if arr.size == 0:
        return np.zeros(0, dtype=dtype)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    # max and min instead of max(abs(x)): no temporary; NaN propagates through both.
    max_abs = max(float(arr.max()), -float(arr.min()))
    if not np.isfinite(max_abs):
        raise EncodingError("vector contains NaN or infinity; refusing to encode")
    check_headroom(
        n_participants=n_participants, max_abs=max_abs, scale_bits=scale_bits, ring_bits=ring_bits
    )
    scaled = np.multiply(arr, arr.dtype.type(2.0**scale_bits))
    np.rint(scaled, out=scaled)
    encoded: npt.NDArray[np.unsignedinteger]
    if ring_bits == 64:
        encoded = scaled.astype(np.int64).view(np.uint64)
    else:
        # |value| <= 2^31 - 1 after the headroom check, so int32 holds it; the uint32 view is
        # the residue mod 2^32.
        encoded = scaled.astype(np.int32).view(np.uint32)
    return encoded


def decode(
    v: npt.NDArray[np.unsignedinteger],
    *,
    scale_bits: int = DEFAULT_SCALE_BITS,
    ring_bits: int | None = None,
) -> npt.NDArray[np.float64]:
    """Centred lift of ring elements, divided by 2^scale_bits (float64).

    Raises:
        EncodingError: ``v`` is not a uint64/uint32 vector or disagrees with ``ring_bits``.
    """
    if not isinstance(v, np.ndarray):
        raise EncodingError(f"encoded vector must be a numpy array (got {type(v).__name__})")
    if v.dtype == np.uint64:
        bits = 64
        signed = v.view(np.int64)
    elif v.dtype == np.uint32:
        bits = 32
        signed = v.view(np.int32)
    else:
        raise EncodingError(f"encoded vector must be uint64 or uint32 (got {v.dtype})")
    if ring_bits is not None and ring_bits != bits:
        raise EncodingError(f"vector is in Z_(2^{bits}) but ring_bits={ring_bits} was asked")
    _check_scale(scale_bits, bits)
    out = signed.astype(np.float64)
    out *= 2.0**-scale_bits  # exact: a power of two
    return out
