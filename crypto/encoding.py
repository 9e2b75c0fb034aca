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


def check_headroom(
    *, n_participants: int, max_abs: float, scale_bits: int = DEFAULT_SCALE_BITS, ring_bits: int = 64
) -> None:
    """Raise unless ``n_participants * max_abs * 2^scale_bits`` stays inside the centred ring.

    Raises:
        HeadroomError: the sum could wrap; the message names all four numbers.
        ConfigError: bad parameters.
    """
    ring_dtype(ring_bits)
    _check_scale(scale_bits, ring_bits)
    if n_participants < 1:
        raise ConfigError(f"n_participants must be >= 1 (got {n_participants})")
    if not np.isfinite(max_abs):
        raise EncodingError(f"vector contains a non-finite value (max |x| = {max_abs})")
    # Each encoded value rounds to at most max_abs * 2^s + 1/2 in magnitude.
    worst = n_participants * (float(max_abs) * 2.0**scale_bits + 0.5)
    limit = 2.0 ** (ring_bits - 1) - 1
    if worst >= limit:
        raise HeadroomError(
            f"sum of {n_participants} participants with max |x| = {max_abs:.6g} at scale 2^{scale_bits}"
            f" reaches {worst:.6g}, which wraps the ring Z_(2^{ring_bits}) (limit 2^{ring_bits - 1})"
        )


def encode(
    x: npt.ArrayLike,
    *,
    scale_bits: int = DEFAULT_SCALE_BITS,
    ring_bits: int = 64,
    n_participants: int = 1,
) -> npt.NDArray[np.unsignedinteger]:
    """Encode a float vector into the ring, checking headroom for ``n_participants`` summands.

    Raises:
        EncodingError: non-finite values or a non-1-D input.
        HeadroomError: the sum of ``n_participants`` such vectors could wrap the ring.
    """
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise EncodingError(f"vector must be 1-D (got shape {arr.shape})")
    dtype = ring_dtype(ring_bits)
    if arr.size == 0:
        return np.zeros(0, dtype=dtype)
    arr = arr.astype(np.float64, copy=False)
    max_abs = float(np.max(np.abs(arr)))
    if not np.isfinite(max_abs):
        raise EncodingError("vector contains NaN or infinity; refusing to encode")
    check_headroom(
        n_participants=n_participants, max_abs=max_abs, scale_bits=scale_bits, ring_bits=ring_bits
    )
    ints = np.rint(arr * float(2**scale_bits)).astype(np.int64)
    if ring_bits == 64:
        return ints.view(np.uint64)
    return ints.astype(np.uint32)  # two's complement truncation == reduction mod 2^32


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
    return signed.astype(np.float64) / float(2**scale_bits)
