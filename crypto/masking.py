"""Add and remove pseudorandom masks mod 2^k, vectorised and on several cores.

Sharp layer. ``uint64`` arithmetic in numpy wraps mod 2^64 and ``uint32`` mod 2^32, which is
exactly the ring arithmetic the protocol needs. :func:`apply_masks` adds ``sign * PRG(seed)``
for many seeds into one accumulator, chunk by chunk so each keystream chunk is consumed while
still in cache, with the vector split across worker threads (pyca releases the GIL).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from secfed.crypto.errors import ConfigError
from secfed.crypto.prg import AES_BLOCK, SEED_BYTES, KeystreamReader

__all__ = [
    "add_mod_",
    "sub_mod_",
    "apply_masks",
    "split_points",
    "DEFAULT_WORKERS",
    "CHUNK_BYTES",
    "MIN_WORDS_PER_WORKER",
]

DEFAULT_WORKERS = 2  # this product's reference machine has two cores
CHUNK_BYTES = 1 << 18  # 256 KiB: chunk + keystream stay in L2; must be <= prg.ZERO_PIECE_BYTES
MIN_WORDS_PER_WORKER = 1 << 16  # fewer words per thread: starting it costs more than it saves

UArray = npt.NDArray[np.unsignedinteger]


def _check_pair(acc: UArray, other: UArray) -> None:
    if acc.dtype != other.dtype or acc.shape != other.shape:
        raise ConfigError(
            f"mask and vector must have the same dtype and shape "
            f"(got {acc.dtype}{acc.shape} and {other.dtype}{other.shape})"
        )


def add_mod_(acc: UArray, other: UArray) -> UArray:
    """``acc += other`` mod 2^k in place; returns ``acc``."""
    _check_pair(acc, other)
    np.add(acc, other, out=acc)
    return acc


def sub_mod_(acc: UArray, other: UArray) -> UArray:
    """``acc -= other`` mod 2^k in place; returns ``acc``."""
    _check_pair(acc, other)
    np.subtract(acc, other, out=acc)
    return acc


def _apply_range(acc: UArray, masks: Sequence[tuple[bytes, int]], start: int, stop: int) -> None:
    """Apply every mask to ``acc[start:stop]``, one cache-sized chunk at a time.

    One keystream reader per mask streams through the range, so the per-chunk cost is two C
    calls per mask (keystream into the chunk buffer, then add/subtract), both releasing the GIL.
    """
    item = acc.dtype.itemsize
    step = CHUNK_BYTES // item
    readers = [
        (
            KeystreamReader(seed, offset_bytes=start * item, length_bytes=(stop - start) * item),
            np.add if sign > 0 else np.subtract,
        )
        for seed, sign in masks
    ]
    keystream_chunk = np.empty(min(step, stop - start), dtype=acc.dtype)
    chunk_bytes = keystream_chunk.data.cast("B")
    for pos in range(start, stop, step):
        end = min(pos + step, stop)
        chunk = acc[pos:end]
        buf = keystream_chunk[: end - pos]
        view = chunk_bytes[: (end - pos) * item]
        for reader, combine in readers:
            reader.read_into(view)
            combine(chunk, buf, out=chunk)


def _check_masks(masks: Sequence[tuple[bytes, int]]) -> None:
    # Every check happens before the first write, so a bad entry leaves ``acc`` untouched.
    for index, entry in enumerate(masks):
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise ConfigError(
                f"masks[{index}] must be a (seed, sign) pair (got {type(entry).__name__})"
            )
        seed, sign = entry
        if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
            got = len(seed) if isinstance(seed, bytes | bytearray) else type(seed).__name__
            raise ConfigError(f"masks[{index}] seed must be {SEED_BYTES} bytes (got {got})")
        if isinstance(sign, bool) or sign not in (1, -1):
            raise ConfigError(f"masks[{index}] sign must be +1 or -1 (got {sign!r})")


def split_points(n: int, itemsize: int, workers: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``workers`` contiguous ranges on keystream-block bounds.

    Each range gets at least :data:`MIN_WORDS_PER_WORKER` words, so a short vector is not
    split at all (a second thread costs more than it saves there).
    """
    align = AES_BLOCK // itemsize  # words per AES block: ranges must start on a block
    workers = max(1, min(workers, n // MIN_WORDS_PER_WORKER))
    per = -(-n // workers)
    per += (-per) % align
    return [(a, min(a + per, n)) for a in range(0, n, per)] if n else []


def apply_masks(
    acc: UArray,
    masks: Sequence[tuple[bytes, int]],
    *,
    workers: int = DEFAULT_WORKERS,
) -> UArray:
    """Add ``sign * PRG(seed)`` for every ``(seed, sign)`` in ``masks`` to ``acc`` mod 2^k.

    ``sign`` is +1 or -1. Equivalent to generating each full mask with
    :func:`secfed.crypto.prg.keystream` and adding/subtracting it, but in cache-sized chunks
    and split over ``workers`` threads (pyca and numpy release the GIL; the threads write
    disjoint ranges of ``acc``). Returns ``acc``.

    Raises:
        ConfigError: bad dtype/layout, a sign other than +-1, or a bad seed -- before any write.
    """
    if not isinstance(acc, np.ndarray) or acc.ndim != 1 or acc.dtype not in (np.uint64, np.uint32):
        got = f"{acc.dtype}{acc.shape}" if isinstance(acc, np.ndarray) else type(acc).__name__
        raise ConfigError(f"accumulator must be a 1-D uint64/uint32 array (got {got})")
    if not acc.flags.c_contiguous or not acc.flags.writeable:
        raise ConfigError("accumulator must be C-contiguous and writeable")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1 (got {workers})")
    _check_masks(masks)
    n = acc.shape[0]
    if n == 0 or not masks:
        return acc
    bounds = split_points(n, acc.dtype.itemsize, workers)
    if len(bounds) == 1:
        _apply_range(acc, masks, 0, n)
        return acc
    # The calling thread takes the first range itself: one thread start instead of two.
    with ThreadPoolExecutor(max_workers=len(bounds) - 1) as pool:
        futures = [pool.submit(_apply_range, acc, masks, a, b) for a, b in bounds[1:]]
        _apply_range(acc, masks, *bounds[0])
        for future in futures:
            future.result()
    return acc
