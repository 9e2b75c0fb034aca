"""The mask generator: an AES-256-CTR keystream written straight into numpy buffers.

Sharp layer. A 32-byte seed is the AES-256 key; the counter block starts at zero, so each seed
must be used for exactly one vector (the protocol derives a fresh seed per session, pair and
purpose). Output goes into caller-owned ``uint64``/``uint32`` buffers through pyca's
``update_into``: no Python loop per element and no per-call allocation of the zero input. pyca
releases the GIL while it encrypts, so independent ranges run on separate cores.

Never use numpy's or Python's ``random`` for masks: their seeds are small and their output is
predictable (Flower issue #7522 folds a seed to 32 bits).
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secfed.crypto.errors import ConfigError

__all__ = ["SEED_BYTES", "AES_BLOCK", "keystream_into", "keystream", "chacha20_keystream_into"]

SEED_BYTES = 32  # AES-256 key: 256-bit seeds, never folded
AES_BLOCK = 16  # bytes per CTR counter increment

_zero_lock = threading.Lock()
_zero_buf: bytes = bytes(1 << 20)


def _zeros(nbytes: int) -> memoryview:
    """A read-only view of ``nbytes`` zero bytes from one shared, grown-on-demand buffer."""
    global _zero_buf
    if nbytes > len(_zero_buf):
        with _zero_lock:
            if nbytes > len(_zero_buf):
                _zero_buf = bytes(max(nbytes, 2 * len(_zero_buf)))
    return memoryview(_zero_buf)[:nbytes]


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        got = len(seed) if isinstance(seed, bytes | bytearray) else type(seed).__name__
        raise ConfigError(f"mask seed must be {SEED_BYTES} bytes (got {got})")


def _check_out(out: npt.NDArray[np.unsignedinteger]) -> None:
    if out.dtype not in (np.uint64, np.uint32):
        raise ConfigError(f"mask buffer dtype must be uint64 or uint32 (got {out.dtype})")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ConfigError("mask buffer must be C-contiguous and writeable")


def keystream_into(
    seed: bytes, out: npt.NDArray[np.unsignedinteger], *, offset_bytes: int = 0
) -> None:
    """Fill ``out`` with the AES-256-CTR keystream of ``seed`` starting at byte ``offset_bytes``.

    The keystream position ``offset_bytes`` must be a multiple of 16 so that a vector can be
    produced in independent chunks (on several cores) and still equal the one-shot stream.

    Raises:
        ConfigError: bad seed length, buffer dtype/layout, or an unaligned offset.
    """
    _check_seed(seed)
    _check_out(out)
    if offset_bytes % AES_BLOCK:
        raise ConfigError(f"keystream offset must be a multiple of {AES_BLOCK} (got {offset_bytes})")
    counter = (offset_bytes // AES_BLOCK).to_bytes(AES_BLOCK, "big")
    enc = Cipher(algorithms.AES(bytes(seed)), modes.CTR(counter)).encryptor()
    view = memoryview(out).cast("B")
    enc.update_into(_zeros(view.nbytes), view)


def keystream(seed: bytes, n: int, dtype: type[np.unsignedinteger] = np.uint64) -> npt.NDArray[np.unsignedinteger]:
    """A new array of ``n`` keystream words (convenience over :func:`keystream_into`)."""
    out = np.empty(n, dtype=dtype)
    keystream_into(seed, out)
    return out


def chacha20_keystream_into(seed: bytes, nonce: bytes, out: npt.NDArray[np.unsignedinteger]) -> None:
    """ChaCha20 keystream into ``out`` (RFC 8439 test vectors and the benchmark's comparison).

    ``nonce`` is pyca's 16-byte form: 4-byte little-endian block counter then 12-byte nonce.
    """
    _check_seed(seed)
    _check_out(out)
    if len(nonce) != 16:
        raise ConfigError(f"chacha20 nonce must be 16 bytes (got {len(nonce)})")
    enc = Cipher(algorithms.ChaCha20(bytes(seed), bytes(nonce)), mode=None).encryptor()
    view = memoryview(out).cast("B")
    enc.update_into(_zeros(view.nbytes), view)
