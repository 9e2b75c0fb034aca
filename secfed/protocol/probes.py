"""Verified linear probes of masked uploads: norm checks and contribution shares (pure maths).

A masked upload is linear in its parts, ``y_i = u_i + b_i + sum_j (+-) m_ij`` in Z_2^r, so for a
public vector ``v`` the coordinator learns ``<u_i, v>`` exactly once it knows the mask terms
``<b_i, v>`` and ``<m_ij, v>``: each end of a pair reports ``<m_ij, v>`` (the two reports must
agree), the self-mask term is checked when unmasking reveals the seed ``b_i``, and a dropped
peer's pairwise masks are rebuilt from its reconstructed key as in unmasking.

Two kinds of ``v``:

* **norm probes**: ``k`` vectors of independent uniform +-1 entries drawn from an AES-CTR stream
  keyed by :func:`probe_seed`, a hash of the session id and of the SHA-256 of *every* masked
  upload in the sum. Nobody can know the probes before every upload is fixed: an upload that
  depended on them would have to be a fixed point of SHA-256. ``E <u, v>^2 = ||u||^2`` for +-1
  entries, so :func:`norm_estimate` (the root mean square of the ``k`` products) is a
  Johnson-Lindenstrauss estimate of ``||u_i||`` whose square has relative standard deviation
  at most ``sqrt(2/k)`` (Achlioptas 2003).
* **the round's aggregate** ``U`` (rounded to a coarser grid so no product wraps the ring,
  :func:`contribution_vector`): ``<u_i, U> / <U, U>`` is enterprise i's contribution share; the
  shares of the survivors sum to one because their updates sum to ``U`` exactly in the ring.

Inner products are computed exactly in the ring: a ring word is split into 22-bit limbs held in
float64, and each chunk of at most :data:`CHUNK` coordinates is multiplied by the +-1 matrix in
one BLAS call (every partial sum stays below 2^53, so the float arithmetic is exact).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from secfed import names
from secfed.crypto.errors import ConfigError
from secfed.crypto.prg import SEED_BYTES, KeystreamReader

__all__ = [
    "DEFAULT_PROBES",
    "MAX_PROBES",
    "DEFAULT_PROBE_MARGIN",
    "CHUNK",
    "upload_digest",
    "probe_seed",
    "probe_signs",
    "probe_products",
    "ring_dot",
    "centered",
    "norm_estimate",
    "contribution_vector",
    "mask_products",
]

DEFAULT_PROBES = 32  # k: the squared estimate's relative s.d. <= sqrt(2/32) = 0.25
MAX_PROBES = 256  # each probe reveals one more scalar per enterprise; more buys little
# Exclusion at margin x bound: an update at the bound is excluded when the mean of k squared
# +-1 projections exceeds margin^2 = 2.25 x its expectation: for k = 32 the chi^2_32 tail gives
# 6.5e-5 (Gaussian projections; +-1 projections of a spread-out vector behave alike, measured in
# bench/probes.py), while an update at 10x the bound passes only if that mean falls below 0.0225
# x its expectation (3e-21); at 2x the bound it passes with 0.022.
DEFAULT_PROBE_MARGIN = 1.5
CHUNK = 1 << 15  # coordinates per BLAS call: C x 2^22 < 2^53 with room to spare
_LIMB_BITS = 22  # 3 limbs hold a 64-bit word; partial sums <= d x 2^22 < 2^53 for d < 2^31

UArray = npt.NDArray[np.unsignedinteger]


def upload_digest(vector: bytes) -> bytes:
    """SHA-256 of a masked upload's vector bytes (what :func:`probe_seed` binds)."""
    return hashlib.sha256(vector).digest()


def probe_seed(session_id: bytes, uploads: Sequence[tuple[str, bytes]]) -> bytes:
    """The probes' AES key: SHA-256(label || session id || (id, upload digest) in spec order).

    Fixed only once every listed upload is: the probes are a function of every upload's bytes.

    Raises:
        ConfigError: a digest that is not 32 bytes.
    """
    h = hashlib.sha256(names.LABEL_PROBES + session_id)
    for sender, digest in uploads:
        if len(digest) != 32:
            raise ConfigError(f"upload digest must be 32 bytes (got {len(digest)})")
        raw = sender.encode("utf-8")
        h.update(len(raw).to_bytes(2, "big") + raw + digest)
    return h.digest()


def _stride(length: int) -> int:
    """Keystream bytes per probe: one bit per coordinate, padded to whole AES blocks."""
    return -(-length // 128) * 16


def probe_signs(seed: bytes, k: int, start: int, stop: int, *, length: int) -> npt.NDArray[np.float64]:
    """The +-1 entries of probes ``0..k-1`` at coordinates ``start..stop`` of a ``length``-long
    vector, as a (k, stop-start) float64 matrix. Probe j owns keystream bytes
    ``j*stride .. (j+1)*stride`` (stride = ceil(length/128) AES blocks); bit i (little-endian
    within each byte) is its sign at coordinate i, 1 meaning -1. ``start`` must be a multiple of
    :data:`CHUNK`.

    Raises:
        ConfigError: k out of range or an unaligned chunk.
    """
    if not 1 <= k <= MAX_PROBES:
        raise ConfigError(f"probes must be in [1, {MAX_PROBES}] (got {k})")
    if start % CHUNK or not start <= stop <= length:
        raise ConfigError(f"probe chunk must start on a multiple of {CHUNK} (got {start}..{stop})")
    stride = _stride(length)
    nbytes = -(-(stop - start) // 8)
    raw = np.empty((k, nbytes), dtype=np.uint8)
    for j in range(k):
        KeystreamReader(seed, offset_bytes=j * stride + start // 8, length_bytes=nbytes).read_into(
            raw[j].data.cast("B")
        )
    bits = np.unpackbits(raw, axis=1, count=stop - start, bitorder="little")
    signs = bits.astype(np.float64)
    signs *= -2.0
    signs += 1.0
    return signs


def _limbs(words: UArray, out: npt.NDArray[np.float64], row: int) -> int:
    """Write the 22-bit limbs of ``words`` into rows ``row..`` of ``out``; returns the count."""
    bits = words.dtype.itemsize * 8
    count = -(-bits // _LIMB_BITS)
    mask = np.uint64((1 << _LIMB_BITS) - 1)
    wide = words.astype(np.uint64, copy=False)
    for limb in range(count):
        out[row + limb, : words.shape[0]] = (wide >> np.uint64(limb * _LIMB_BITS)) & mask
    return count


def _check_sources(sources: Sequence[UArray | bytes], length: int, ring_bits: int) -> None:
    want = np.dtype(f"u{ring_bits // 8}")
    for i, src in enumerate(sources):
        if isinstance(src, bytes | bytearray):
            if len(src) != SEED_BYTES:
                raise ConfigError(f"sources[{i}] seed must be {SEED_BYTES} bytes (got {len(src)})")
        elif src.shape != (length,) or src.dtype.newbyteorder("=") != want:
            raise ConfigError(
                f"sources[{i}] must be {length} words of Z_2^{ring_bits} (got {src.dtype}{src.shape})"
            )


def probe_products(
    sources: Sequence[UArray | bytes],
    *,
    seed: bytes,
    k: int,
    ring_bits: int,
    length: int,
) -> list[tuple[int, ...]]:
    """``<x, v_j> mod 2^ring_bits`` for every source ``x`` and probe ``j < k``.

    A source is a ring vector of ``length`` words, or a 32-byte mask seed whose AES-CTR
    keystream (the mask :func:`secfed.crypto.masking.apply_masks` adds) is expanded chunk by
    chunk here and never held whole.

    Raises:
        ConfigError: a source of the wrong length, dtype or seed size; k out of range.
    """
    _check_sources(sources, length, ring_bits)
    dtype = np.dtype(f"<u{ring_bits // 8}")
    per = -(-ring_bits // _LIMB_BITS)
    acc = np.zeros((per * len(sources), k), dtype=np.int64)
    # one contiguous row per limb of each source: OpenBLAS multiplies (rows x C) by (C x k)
    # about 20x faster than the transposed shapes at these sizes (measured)
    limbs = np.zeros((per * len(sources), min(CHUNK, length)), dtype=np.float64)
    readers = [
        KeystreamReader(bytes(s), length_bytes=length * dtype.itemsize)
        if isinstance(s, bytes | bytearray) else None
        for s in sources
    ]
    buf = np.empty(min(CHUNK, length), dtype=dtype)
    # One BLAS thread: these skinny products are memory-bound, and OpenBLAS's threads made
    # them 10-25x slower on the shared 2-core reference machine (measured).
    with threadpool_limits(limits=1, user_api="blas"):
        _accumulate(sources, readers, buf, limbs, acc, seed=seed, k=k, length=length, per=per)
    modulus = 1 << ring_bits
    out = []
    for i in range(len(sources)):
        out.append(tuple(
            sum(int(acc[i * per + limb, j]) << (limb * _LIMB_BITS) for limb in range(per)) % modulus
            for j in range(k)
        ))
    return out


def _accumulate(
    sources: Sequence[UArray | bytes],
    readers: Sequence[KeystreamReader | None],
    buf: UArray,
    limbs: npt.NDArray[np.float64],
    acc: npt.NDArray[np.int64],
    *,
    seed: bytes,
    k: int,
    length: int,
    per: int,
) -> None:
    for start in range(0, length, CHUNK):
        stop = min(start + CHUNK, length)
        signs = probe_signs(seed, k, start, stop, length=length)
        for i, src in enumerate(sources):
            reader = readers[i]
            if reader is not None:
                chunk = buf[: stop - start]
                reader.read_into(chunk.data.cast("B"))
            else:
                assert not isinstance(src, bytes | bytearray)
                chunk = src[start:stop]
            _limbs(chunk, limbs, i * per)
        # every entry of this product is an integer below C x 2^22 < 2^53: exact in float64
        acc += np.rint(limbs[:, : stop - start] @ signs.T).astype(np.int64)


def ring_dot(x: UArray, y: UArray) -> int:
    """``<x, y> mod 2^r`` for two ring vectors of one dtype (numpy's unsigned products and sums
    wrap mod 2^r: exactly the ring arithmetic)."""
    if x.shape != y.shape or x.dtype.itemsize != y.dtype.itemsize:
        raise ConfigError(f"ring vectors must match (got {x.dtype}{x.shape} and {y.dtype}{y.shape})")
    native = np.dtype(f"u{x.dtype.itemsize}")
    total = 0
    for start in range(0, x.shape[0], 1 << 20):  # bounded temporaries
        a = x[start:start + (1 << 20)].astype(native, copy=False)
        b = y[start:start + (1 << 20)].astype(native, copy=False)
        total += int(np.multiply(a, b).sum(dtype=native))
    return total % (1 << (8 * x.dtype.itemsize))


def mask_products(
    seeds: Sequence[bytes], vector: UArray, *, ring_bits: int
) -> list[int]:
    """``<PRG(seed), vector> mod 2^r`` for each mask seed, expanding each keystream in chunks.

    Raises:
        ConfigError: a bad seed or vector.
    """
    length = vector.shape[0]
    _check_sources([*seeds, vector], length, ring_bits)
    dtype = np.dtype(f"<u{ring_bits // 8}")
    out = []
    step = 1 << 17
    buf = np.empty(min(step, length), dtype=dtype)
    for seed in seeds:
        reader = KeystreamReader(bytes(seed), length_bytes=length * dtype.itemsize)
        total = 0
        for start in range(0, length, step):
            stop = min(start + step, length)
            chunk = buf[: stop - start]
            reader.read_into(chunk.data.cast("B"))
            total += ring_dot(chunk, vector[start:stop])
        out.append(total % (1 << ring_bits))
    return out


def centered(value: int, ring_bits: int) -> int:
    """The representative of ``value mod 2^r`` in ``[-2^(r-1), 2^(r-1))``."""
    value %= 1 << ring_bits
    return value - (1 << ring_bits) if value >= 1 << (ring_bits - 1) else value


def norm_estimate(products: Sequence[int], *, ring_bits: int, scale_bits: int) -> float:
    """The JL estimate ``sqrt(mean_j <u, v_j>^2)`` of ``||u||`` from ``<enc(u), v_j> mod 2^r``.

    A product that wrapped the ring (an update far above any bound) reads as a uniformly random
    ring element, so it makes the estimate huge rather than small.
    """
    if not products:
        raise ConfigError("norm estimate needs at least one probe product")
    mean_square = sum(centered(p, ring_bits) ** 2 for p in products) / len(products)
    return math.sqrt(mean_square) / 2.0**scale_bits


def contribution_vector(
    ring_sum: UArray, *, ring_bits: int, scale_bits: int, update_bound: float
) -> tuple[UArray, int]:
    """``U'``: the aggregate on the coarser grid 2^-s' so that ``<enc(u_i), U'>`` cannot wrap.

    ``ring_sum`` is the unmasked ring sum (``U`` at scale ``scale_bits``); ``update_bound`` bounds
    every included ``||u_i||``. ``|<enc(u_i), U'>| <= 2^s ||u_i|| 2^s' (||U|| + sqrt(d) 2^-s')``,
    so s' = ring_bits - 3 - s - ceil(log2(bound x (||U|| + 1))) (never above s: U lies on the
    2^-s grid already) keeps it below 2^(r-2). U' = round(U_int / 2^(s - s')), computed in
    integers, so coordinator and enterprises derive the same words. Returns ``(U', s')``.
    """
    signed = ring_sum.astype(np.dtype(f"i{ring_sum.dtype.itemsize}"), copy=False).astype(np.int64)
    norm = float(np.linalg.norm(signed.astype(np.float64))) / 2.0**scale_bits
    span = max(update_bound, 2.0**-scale_bits) * (norm + 1.0)
    coarse = min(scale_bits, ring_bits - 3 - scale_bits - math.ceil(math.log2(span)))
    shift = scale_bits - coarse
    if shift == 0:
        rounded = signed
    else:
        rounded = (signed >> np.int64(shift)) + ((signed >> np.int64(shift - 1)) & np.int64(1))
    return rounded.astype(np.dtype(f"u{ring_sum.dtype.itemsize}")), coarse
