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
from secfed.crypto.prg import AES_BLOCK, keystream_into

__all__ = ["add_mod_", "sub_mod_", "apply_masks", "DEFAULT_WORKERS", "CHUNK_BYTES"]

DEFAULT_WORKERS = 2  # this product's reference machine has two cores
CHUNK_BYTES = 1 << 18  # 256 KiB: keystream chunk stays in L2 while it is added

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
    item = acc.dtype.itemsize
    step = CHUNK_BYTES // item
    tmp = np.empty(min(step, stop - start), dtype=acc.dtype)
    pos = start
    while pos < stop:
        end = min(pos + step, stop)
        chunk = acc[pos:end]
        buf = tmp[: end - pos]
        for seed, sign in masks:
            keystream_into(seed, buf, offset_bytes=pos * item)
            if sign > 0:
                np.add(chunk, buf, out=chunk)
            else:
                np.subtract(chunk, buf, out=chunk)
        pos = end


def apply_masks(
    acc: UArray,
    masks: Sequence[tuple[bytes, int]],
    *,
    workers: int = DEFAULT_WORKERS,
) -> UArray:
    """Add ``sign * PRG(seed)`` for every ``(seed, sign)`` in ``masks`` to ``acc`` mod 2^k.

    ``sign`` is +1 or -1. Equivalent to generating each full mask with
    :func:`secfed.crypto.prg.keystream` and adding/subtracting it, but in cache-sized chunks
    and split over ``workers`` threads.

    Raises:
        ConfigError: bad dtype/layout, a sign other than +-1, or a bad seed.
    """
    if acc.dtype not in (np.uint64, np.uint32) or not acc.flags.c_contiguous:
        raise ConfigError(f"accumulator must be a contiguous uint64/uint32 array (got {acc.dtype})")
    for _, sign in masks:
        if sign not in (1, -1):
            raise ConfigError(f"mask sign must be +1 or -1 (got {sign})")
    n = acc.shape[0]
    if n == 0 or not masks:
        return acc
    item = acc.dtype.itemsize
    align = AES_BLOCK // item  # split points must fall on keystream block boundaries
    workers = max(1, min(workers, n // max(align, 1 << 14) or 1))
    if workers == 1:
        _apply_range(acc, masks, 0, n)
        return acc
    per = -(-n // workers)
    per += (-per) % align
    bounds = [(i * per, min((i + 1) * per, n)) for i in range(workers) if i * per < n]
    with ThreadPoolExecutor(max_workers=len(bounds)) as pool:
        for fut in [pool.submit(_apply_range, acc, masks, a, b) for a, b in bounds]:
            fut.result()
    return acc
