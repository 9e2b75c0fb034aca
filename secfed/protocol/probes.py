"""Verified linear probes of masked uploads: norm checks and contribution shares (pure maths).

A masked upload is linear in its parts, ``y_i = u_i + b_i + sum_j (+-) m_ij`` in Z_2^r, so for a
public vector ``v`` the coordinator learns ``<u_i, v>`` exactly once it knows the mask terms
``<b_i, v>`` and ``<m_ij, v>``: each end of a pair reports ``<m_ij, v>`` (the two reports must
agree), the self-mask term is checked when unmasking reveals the seed ``b_i``, and a dropped
peer's pairwise masks are rebuilt from its reconstructed key as in unmasking.

Two kinds of ``v``:

* **norm probes**: ``k`` vectors of +-1 entries drawn from an AES-CTR stream keyed by
  :func:`probe_seed`, a hash of the session id and of the SHA-256 of *every* masked upload in
  the sum. Nobody can know the probes before every upload is fixed: an upload that depended on
  them would have to be a fixed point of SHA-256. Each probe is ``v_j = S^T w_j`` with ``S`` a
  random signed folding of the vector to :data:`SKETCH` words and ``w_j`` uniform +-1
  (:class:`ProbeBasis`): ``||S x||^2`` estimates ``||x||^2`` within a relative s.d. of
  ``sqrt(2/SKETCH)`` for every x, and the root mean square of the ``k`` products
  (:func:`norm_estimate`) is then a Johnson-Lindenstrauss estimate of ``||u_i||`` whose square
  has relative standard deviation at most ``sqrt(2/k + 2/SKETCH)`` (Achlioptas 2003).
* **the round's aggregate** ``U`` (rounded to a coarser grid so no product wraps the ring,
  :func:`contribution_vector`): ``<u_i, U> / <U, U>`` is enterprise i's contribution share; the
  shares of the survivors sum to one because their updates sum to ``U`` exactly in the ring.

Inner products are computed exactly in the ring: each source is folded to ``SKETCH`` words
with ring arithmetic (one multiply and one add per coordinate), the folded words are split into
32-bit limbs held in float64, and all sources meet the ``k`` rows in one BLAS call (every sum
stays below 2^53, so the float arithmetic is exact).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController

from secfed import names
from secfed.crypto.prg import SEED_BYTES, ZERO_PIECE_BYTES, KeystreamReader
from secfed.errors import ConfigError

__all__ = [
    "DEFAULT_PROBES",
    "MAX_PROBES",
    "DEFAULT_PROBE_MARGIN",
    "SKETCH",
    "ProbeBasis",
    "probe_basis",
    "upload_digest",
    "probe_seed",
    "probe_products",
    "folded_products",
    "mask_pieces",
    "fold_sources",
    "piece_step",
    "ring_dot",
    "centered",
    "norm_estimate",
    "contribution_vector",
    "sum_of_squares",
    "grid_exponent",
    "signed_words",
    "signed_dot",
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
SKETCH = 1 << 16  # folded width: ||S x||^2 has relative s.d. <= sqrt(2 / 2^16) = 0.55 %
PIECE_WORDS = 1 << 17  # mask keystream expanded this many words at a time
# 2 limbs hold a 64-bit word; a sum of width <= 2^16 signed limbs stays below 2^16 x 2^32 < 2^53
_LIMB_BITS = 32

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


def _layout(length: int) -> tuple[int, int]:
    """(sketch width, blocks): the vector is cut into blocks of ``width`` coordinates."""
    width = min(SKETCH, length)
    return width, -(-length // width)


def _read(reader: KeystreamReader, out: npt.NDArray[Any]) -> None:
    """Fill ``out`` (a contiguous array) from ``reader`` in pieces the reader accepts."""
    view = out.reshape(-1).view(np.uint8)
    for at in range(0, view.shape[0], ZERO_PIECE_BYTES):
        reader.read_into(view[at:at + ZERO_PIECE_BYTES].data.cast("B"))


@dataclass(frozen=True)
class ProbeBasis:
    """The ``k`` probes of one round, ``v_j = S^T w_j``: ``S`` (width x length) sends coordinate
    ``i`` of block ``f`` to ``(i mod width + shift_f) mod width`` with sign ``sign_i``, and
    ``w_j`` are ``k`` rows of uniform +-1 of length width, so every ``v_j`` entry is +-1.

    ``<x, v_j> = <S x, w_j>``: each source is first folded to ``width`` words in the ring (one
    sign multiply and one add per coordinate, exact mod 2^r), and the k products are taken on
    the folded vector only. Any two coordinates share a bucket with probability 1/width (block
    shifts are uniform; within a block never), and signs are independent, so ``||S x||^2`` is
    an unbiased estimate of ``||x||^2`` with relative s.d. at most ``sqrt(2/width)`` (0.55 % at
    2^16) for every ``x`` (CountSketch; Charikar, Chen, Farach-Colton 2002); conditioned on S
    the k products give the usual +-1 JL estimate of ``||S x||``.
    """

    k: int
    length: int
    ring_bits: int
    signs: UArray  # (length,): 1 or 2^r - 1 (that is, -1 in the ring)
    shifts: tuple[int, ...]
    rows: npt.NDArray[np.float64]  # (k, width): the w_j

    @property
    def width(self) -> int:
        return int(self.rows.shape[1])

    def fold_into(self, out: UArray, piece: UArray, start: int) -> None:
        """Add ``S`` applied to coordinates ``start..start+len(piece)`` to ``out`` (width
        words); ``start`` must be a multiple of the width."""
        width = self.width
        signed = np.multiply(piece, self.signs[start:start + piece.shape[0]])  # wraps mod 2^r
        for at in range(0, piece.shape[0], width):
            block = signed[at:at + width]
            shift = self.shifts[(start + at) // width]
            head = min(block.shape[0], width - shift)
            out[shift:shift + head] += block[:head]
            if block.shape[0] > head:
                out[: block.shape[0] - head] += block[head:]

    def vectors(self) -> npt.NDArray[np.int8]:
        """The probes as a dense (k, length) +-1 matrix (for checking; length x k bytes)."""
        width = self.width
        idx = np.arange(self.length)
        bucket = (idx % width + np.asarray(self.shifts)[idx // width]) % width
        sign = np.where(self.signs == 1, 1, -1).astype(np.int8)
        return (self.rows[:, bucket].astype(np.int8) * sign).astype(np.int8)


def probe_basis(seed: bytes, k: int, *, length: int, ring_bits: int) -> ProbeBasis:
    """See :func:`_probe_basis`. The last one is kept (a pure function of its arguments: the
    coordinator derives the same probes at stage probe and again at unmask); it holds one ring
    word per coordinate (the signs), as much as one upload."""
    return _probe_basis(bytes(seed), k, length, ring_bits)


@functools.lru_cache(maxsize=1)
def _probe_basis(seed: bytes, k: int, length: int, ring_bits: int) -> ProbeBasis:
    """Derive the round's probes from ``seed`` (:func:`probe_seed`): one AES-CTR stream read in
    order: ``length`` sign bits (bit i little-endian within each byte, 1 meaning -1), then one
    little-endian uint32 per block (its shift, taken mod width: bias below width / 2^32), then
    ``k`` rows of ``width`` bits (bit b of row j, 1 meaning -1).

    Raises:
        ConfigError: k out of range, a bad length or ring.
    """
    if not 1 <= k <= MAX_PROBES:
        raise ConfigError(f"probes must be in [1, {MAX_PROBES}] (got {k})")
    if length < 1 or ring_bits not in (32, 64):
        raise ConfigError(f"probes need length >= 1 and ring_bits 32 or 64 (got {length}, {ring_bits})")
    width, blocks = _layout(length)
    sign_bytes, row_bytes = -(-length // 8), -(-width // 8)
    reader = KeystreamReader(seed, length_bytes=sign_bytes + 4 * blocks + k * row_bytes)
    raw = np.empty(sign_bytes, dtype=np.uint8)
    _read(reader, raw)
    dtype = np.dtype(f"u{ring_bits // 8}")
    bits = np.unpackbits(raw, count=length, bitorder="little")
    signs = np.left_shift(bits, 1, dtype=dtype)
    np.subtract(dtype.type(1), signs, out=signs)  # 1 - 2b, wrapping to 2^r - 1 for b = 1
    shifts_raw = np.empty(blocks, dtype="<u4")
    _read(reader, shifts_raw)
    rows_raw = np.empty((k, row_bytes), dtype=np.uint8)
    _read(reader, rows_raw)
    rows = np.unpackbits(rows_raw, axis=1, count=width, bitorder="little").astype(np.float64)
    rows *= -2.0
    rows += 1.0
    shifts = tuple(int(v) % width for v in shifts_raw)
    signs.setflags(write=False)  # shared through the cache
    rows.setflags(write=False)
    return ProbeBasis(k, length, ring_bits, signs, shifts, rows)


def _limbs(words: UArray, out: npt.NDArray[np.float64], row: int) -> int:
    """Write the 32-bit limbs of ``words`` into rows ``row..`` of ``out``; returns the count."""
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


_CONTROLLER: list[ThreadpoolController] = []


def _blas() -> ThreadpoolController:
    """One controller per process: building one scans the loaded libraries (milliseconds)."""
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0]


def mask_pieces(
    seed: bytes, *, length: int, ring_bits: int, step: int = PIECE_WORDS,
    start: int = 0, stop: int | None = None,
) -> Iterator[tuple[int, UArray]]:
    """Words ``start..stop`` (default: all ``length``) of the mask ``PRG(seed)`` as successive
    ``(position, piece)``: each piece is a view of one reused buffer (valid until the next is
    yielded) of ``step`` words (the last may be shorter). The keystream is the one
    :func:`secfed.crypto.masking.apply_masks` adds, expanded once, piece by piece, never held
    whole. ``start`` must fall on a 16-byte keystream block.

    Raises:
        ConfigError: a seed that is not 32 bytes, an unaligned or out-of-range start.
    """
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"mask seed must be {SEED_BYTES} bytes (got {len(seed)})")
    stop = length if stop is None else stop
    if not 0 <= start <= stop <= length:
        raise ConfigError(f"mask range must lie in [0, {length}] (got {start}..{stop})")
    dtype = np.dtype(f"<u{ring_bits // 8}")
    native = dtype.newbyteorder("=")
    reader = KeystreamReader(bytes(seed), offset_bytes=start * dtype.itemsize,
                             length_bytes=(stop - start) * dtype.itemsize)
    buf = np.empty(max(0, min(step, stop - start)), dtype=dtype)
    for at in range(start, stop, step):
        piece = buf[: min(step, stop - at)]
        _read(reader, piece)
        yield at, piece.astype(native, copy=False)


def piece_step(basis: ProbeBasis) -> int:
    """Words per piece for :func:`mask_pieces` whose pieces :meth:`ProbeBasis.fold_into`
    accepts (every piece starts on a block boundary)."""
    return basis.width * max(1, PIECE_WORDS // basis.width)


PieceHook = Callable[[int, int, UArray], None]


def fold_sources(
    basis: ProbeBasis,
    sources: Sequence[UArray | bytes],
    *,
    each: PieceHook | None = None,
    workers: int = 1,
) -> list[UArray]:
    """``S x`` (:meth:`ProbeBasis.fold_into`) of every source: a ring vector of ``basis.length``
    words or a 32-byte mask seed, whose keystream is expanded piece by piece (never whole).
    ``each(i, position, piece)`` sees every piece of seed source ``i`` while it is in cache
    (the coordinator takes it off an upload there), in order within a range of coordinates.

    The coordinates are split into up to ``workers`` ranges on block boundaries, one thread
    each (pyca and numpy release the GIL): ``each`` must only touch ``position`` onwards for
    ``len(piece)`` words. Each thread folds into its own words; the folds are added mod 2^r.
    """
    length, native = basis.length, np.dtype(f"u{basis.ring_bits // 8}")
    step = piece_step(basis)
    per = max(step, -(-length // max(1, workers)))
    per = -(-per // step) * step  # ranges start on piece (hence block and AES-block) bounds
    ranges = [(a, min(a + per, length)) for a in range(0, length, per)]

    def fold_range(bounds: tuple[int, int]) -> list[UArray]:
        lo, hi = bounds
        outs = []
        for i, src in enumerate(sources):
            out = np.zeros(basis.width, dtype=native)
            if isinstance(src, bytes | bytearray):
                for at, piece in mask_pieces(bytes(src), length=length, ring_bits=basis.ring_bits,
                                             step=step, start=lo, stop=hi):
                    basis.fold_into(out, piece, at)
                    if each is not None:
                        each(i, at, piece)
            else:
                basis.fold_into(out, src[lo:hi].astype(native, copy=False), lo)
            outs.append(out)
        return outs

    if len(ranges) <= 1:
        return fold_range(ranges[0]) if ranges else [np.zeros(basis.width, native) for _ in sources]
    with ThreadPoolExecutor(max_workers=len(ranges) - 1) as pool:
        futures = [pool.submit(fold_range, r) for r in ranges[1:]]
        total = fold_range(ranges[0])  # the calling thread takes the first range itself
        for future in futures:
            for out, part in zip(total, future.result()):
                np.add(out, part, out=out)
    return total


def folded_products(basis: ProbeBasis, folded: Sequence[UArray]) -> list[tuple[int, ...]]:
    """``<x, v_j> mod 2^r`` for every source ``x`` given as its fold ``S x`` (``width`` ring
    words, :meth:`ProbeBasis.fold_into`), and every probe ``j < k``."""
    k, width = basis.k, basis.width
    per = -(-basis.ring_bits // _LIMB_BITS)
    limbs = np.zeros((per * len(folded), width), dtype=np.float64)
    for i, words in enumerate(folded):
        _limbs(words, limbs, i * per)
    # every entry of this product is an integer below width x 2^32 <= 2^48: exact in float64
    # whatever the summation order.
    # One BLAS thread: these skinny products are memory-bound, and OpenBLAS's threads made
    # them 10-25x slower on the shared 2-core reference machine (measured).
    with _blas().limit(limits=1, user_api="blas"):
        acc = np.rint(limbs @ basis.rows.T).astype(np.int64)
    modulus = 1 << basis.ring_bits
    return [
        tuple(
            sum(int(acc[i * per + limb, j]) << (limb * _LIMB_BITS) for limb in range(per)) % modulus
            for j in range(k)
        )
        for i in range(len(folded))
    ]


def probe_products(
    sources: Sequence[UArray | bytes],
    *,
    seed: bytes,
    k: int,
    ring_bits: int,
    length: int,
    workers: int = 1,
) -> list[tuple[int, ...]]:
    """``<x, v_j> mod 2^ring_bits`` for every source ``x`` and probe ``j < k`` (the probes of
    :func:`probe_basis`).

    A source is a ring vector of ``length`` words, or a 32-byte mask seed whose AES-CTR
    keystream (the mask :func:`secfed.crypto.masking.apply_masks` adds) is expanded piece by
    piece here and never held whole. Each source is folded to the sketch width in the ring
    (:func:`fold_sources`, on up to ``workers`` threads), then all folded sources are multiplied
    by the k rows at once.

    Raises:
        ConfigError: a source of the wrong length, dtype or seed size; k out of range.
    """
    _check_sources(sources, length, ring_bits)
    basis = probe_basis(seed, k, length=length, ring_bits=ring_bits)
    return folded_products(basis, fold_sources(basis, sources, workers=workers))


def ring_dot(x: UArray, y: UArray) -> int:
    """``<x, y> mod 2^r`` for two ring vectors of one dtype. numpy's integer dot (no BLAS, no
    temporary) accumulates in an unsigned 64-bit word, whose wrap-around is reduction mod 2^64,
    so the result is exactly the ring's (mod 2^32 for 32-bit words, as 32 divides 64)."""
    if x.shape != y.shape or x.dtype.itemsize != y.dtype.itemsize:
        raise ConfigError(f"ring vectors must match (got {x.dtype}{x.shape} and {y.dtype}{y.shape})")
    native = np.dtype(f"u{x.dtype.itemsize}")
    total = int(np.dot(x.astype(native, copy=False), y.astype(native, copy=False)))
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
    out = []
    for seed in seeds:
        total = 0
        for start, piece in mask_pieces(bytes(seed), length=length, ring_bits=ring_bits):
            total += ring_dot(piece, vector[start:start + piece.shape[0]])
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
    so s' = ring_bits - 3 - s - e (never above s: U lies on the 2^-s grid already), where e is
    the least integer with ``max(bound, 2^-s) x (||U|| + 1) <= 2^e``, keeps it below 2^(r-2).
    U' = round(U_int / 2^(s - s')). Every step is exact integer (or exact rational) arithmetic,
    never a float sum, so the coordinator and every enterprise derive the same words on any
    CPU and any BLAS: the pair reports along U' must agree bit for bit. Returns ``(U', s')``.

    Raises:
        ConfigError: a bound that is not finite.
    """
    signed = signed_words(ring_sum)
    e = grid_exponent(sum_of_squares(signed), scale_bits=scale_bits, update_bound=update_bound)
    coarse = min(scale_bits, ring_bits - 3 - scale_bits - e)
    shift = scale_bits - coarse
    unsigned = np.dtype(f"u{ring_sum.dtype.itemsize}")
    if shift == 0:
        return signed.astype(unsigned), coarse
    # round half up: (x >> (shift - 1)), then halve and add the bit shifted out
    rounded = signed >> np.int64(shift - 1)
    low = rounded & np.int64(1)
    rounded >>= np.int64(1)
    rounded += low
    if unsigned.itemsize == 8:
        return rounded.view(np.uint64), coarse
    return rounded.astype(unsigned), coarse


# sum_of_squares: 3 limbs of 22 bits hold |x| <= 2^63; a limb product is below 2^44, so a chunk
# of 2^18 of them sums below 2^62 in numpy's integer dot (exact: no BLAS, no float)
_SQUARE_LIMB_BITS = 22
_SQUARE_CHUNK = 1 << 18


def sum_of_squares(words: npt.NDArray[np.int64]) -> int:
    """``sum_i x_i^2`` of signed 64-bit words, exactly (a Python int: it can exceed 2^126).

    Each ``|x_i|`` is split into 22-bit limbs and the limb products are summed by numpy's
    integer dot in chunks that cannot overflow, so the result does not depend on the summation
    order, the CPU or the BLAS (a float dot's rounding does)."""
    mag = np.abs(words).view(np.uint64)  # |-2^63| wraps to -2^63, which reads 2^63 unsigned
    if mag.shape[0] == 0:
        return 0
    top = int(mag.max())
    count = max(1, -(-top.bit_length() // _SQUARE_LIMB_BITS))
    limb_mask = np.uint64((1 << _SQUARE_LIMB_BITS) - 1)
    total = 0
    for start in range(0, mag.shape[0], _SQUARE_CHUNK):
        part = mag[start:start + _SQUARE_CHUNK]
        limbs = [((part >> np.uint64(_SQUARE_LIMB_BITS * i)) & limb_mask).astype(np.int64)
                 for i in range(count)]
        for i in range(count):
            for j in range(i, count):
                cross = int(np.dot(limbs[i], limbs[j]))
                total += (cross << (_SQUARE_LIMB_BITS * (i + j))) * (1 if i == j else 2)
    return total


def grid_exponent(square_sum: int, *, scale_bits: int, update_bound: float) -> int:
    """The least integer e with ``max(bound, 2^-s) x (sqrt(N) / 2^s + 1) <= 2^e`` for
    ``N = square_sum`` (``||U||^2`` at scale s), decided exactly: with ``B`` the bound as the
    exact rational its float is, the condition is ``T_e = 2^s (2^e / B - 1) >= 0`` and
    ``N <= T_e^2``, monotone in e. A float guess starts the search; only exact comparisons
    decide, so the float's rounding never changes the answer.

    Raises:
        ConfigError: a bound that is not finite, or a negative square sum.
    """
    if not math.isfinite(update_bound) or square_sum < 0:
        raise ConfigError(
            f"contribution grid needs a finite bound and a square sum >= 0 (got {update_bound}, "
            f"{'negative' if square_sum < 0 else 'ok'})"
        )
    bound = max(Fraction(update_bound), Fraction(1, 1 << scale_bits))
    grid = 1 << scale_bits

    def fits(e: int) -> bool:
        power = Fraction(1 << e) if e >= 0 else Fraction(1, 1 << -e)
        t = grid * (power / bound - 1)
        return t >= 0 and square_sum <= t * t

    guess = float(bound) * (math.sqrt(square_sum) / grid + 1.0)
    e = math.ceil(math.log2(guess))
    while not fits(e):
        e += 1
    while fits(e - 1):
        e -= 1
    return e


def signed_words(ring: UArray) -> npt.NDArray[np.int64]:
    """The centred representatives of ring words as int64 (a view when the words already are
    native 64-bit)."""
    native = ring.dtype.newbyteorder("=")
    if ring.dtype == native and ring.dtype.itemsize == 8:
        return ring.view(np.int64)
    return ring.astype(np.dtype(f"i{ring.dtype.itemsize}")).astype(np.int64, copy=False)


def signed_dot(x: UArray, y: UArray) -> float:
    """``<x, y>`` of the centred representatives, in float64 (not reduced mod 2^r: a sum of
    squares can exceed the ring), on one BLAS thread."""
    a = signed_words(x).astype(np.float64)
    b = signed_words(y).astype(np.float64)
    with _blas().limit(limits=1, user_api="blas"):
        return float(np.dot(a, b))
