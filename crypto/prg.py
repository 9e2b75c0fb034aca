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

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from secfed.crypto.errors import ConfigError

__all__ = [
    "SEED_BYTES",
    "AES_BLOCK",
    "ZERO_PIECE_BYTES",
    "KeystreamReader",
    "keystream_into",
    "keystream",
    "chacha20_keystream_into",
]

SEED_BYTES = 32  # AES-256 key: 256-bit seeds, never folded
AES_BLOCK = 16  # bytes per CTR counter increment

# Fixed, immutable zero input for update_into. CPython allocates it with calloc, so its pages are
# the kernel's shared zero page: reading it touches no memory bandwidth. Outputs larger than it
# are produced in pieces (one pyca call per MiB costs ~1 us), so nothing grows, nothing is locked
# and concurrent threads can share it.
ZERO_PIECE_BYTES = 1 << 20
_ZEROS = memoryview(bytes(ZERO_PIECE_BYTES))


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        got = len(seed) if isinstance(seed, bytes | bytearray) else type(seed).__name__
        raise ConfigError(f"mask seed must be {SEED_BYTES} bytes (got {got})")


def _check_out(out: npt.NDArray[np.unsignedinteger]) -> None:
    if out.dtype not in (np.uint64, np.uint32):
        raise ConfigError(f"mask buffer dtype must be uint64 or uint32 (got {out.dtype})")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ConfigError("mask buffer must be C-contiguous and writeable")


_COUNTER_LIMIT = 1 << 128  # the 128-bit CTR counter must never wrap inside one stream


def _blocks(nbytes: int) -> int:
    return -(-nbytes // AES_BLOCK)


def _fill(enc: CipherContext, out: npt.NDArray[np.unsignedinteger]) -> None:
    """Encrypt zeros into ``out`` piece by piece: ``out`` then holds the raw keystream."""
    view = out.data.cast("B")
    total = view.nbytes
    for start in range(0, total, ZERO_PIECE_BYTES):
        stop = min(start + ZERO_PIECE_BYTES, total)
        enc.update_into(_ZEROS[: stop - start], view[start:stop])


def _check_offset(offset_bytes: int, nbytes: int) -> None:
    if offset_bytes % AES_BLOCK:
        raise ConfigError(
            f"keystream offset must be a multiple of {AES_BLOCK} (got {offset_bytes})"
        )
    if offset_bytes < 0 or offset_bytes // AES_BLOCK + _blocks(nbytes) > _COUNTER_LIMIT:
        raise ConfigError(
            f"keystream offset must be >= 0 and the stream must end below block 2^128 "
            f"(got offset {offset_bytes} for {nbytes} bytes)"
        )


class KeystreamReader:
    """A positioned AES-256-CTR keystream read forward into successive buffers.

    ``KeystreamReader(seed, offset_bytes=o, length_bytes=L)`` yields exactly the bytes
    ``o .. o+L`` of the stream that :func:`keystream_into` writes; each :meth:`read_into`
    continues where the previous one stopped. The cipher is set up once, so a caller that
    consumes a long stream in cache-sized chunks (``masking.apply_masks``) pays no per-chunk
    setup. Not thread-safe: one reader per thread.
    """

    __slots__ = ("_enc", "_left")

    def __init__(self, seed: bytes, *, offset_bytes: int = 0, length_bytes: int) -> None:
        _check_seed(seed)
        _check_offset(offset_bytes, length_bytes)
        counter = (offset_bytes // AES_BLOCK).to_bytes(AES_BLOCK, "big")
        self._enc = Cipher(algorithms.AES(bytes(seed)), modes.CTR(counter)).encryptor()
        self._left = length_bytes

    def read_into(self, view: memoryview) -> None:
        """Overwrite the byte view ``view`` (at most ZERO_PIECE_BYTES long) with the next bytes.

        Raises:
            ConfigError: the read would pass the length given at construction.
        """
        nbytes = view.nbytes
        if nbytes > self._left or nbytes > ZERO_PIECE_BYTES:
            raise ConfigError(
                f"keystream read of {nbytes} bytes exceeds the {self._left} bytes left "
                f"or the {ZERO_PIECE_BYTES}-byte piece"
            )
        self._left -= nbytes
        self._enc.update_into(_ZEROS[:nbytes], view)


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
    _check_offset(offset_bytes, out.nbytes)
    counter = (offset_bytes // AES_BLOCK).to_bytes(AES_BLOCK, "big")
    enc = Cipher(algorithms.AES(bytes(seed)), modes.CTR(counter)).encryptor()
    _fill(enc, out)


def keystream(
    seed: bytes, n: int, dtype: type[np.unsignedinteger] = np.uint64
) -> npt.NDArray[np.unsignedinteger]:
    """A new array of ``n`` keystream words (convenience over :func:`keystream_into`)."""
    if n < 0:
        raise ConfigError(f"keystream length must be >= 0 (got {n})")
    out = np.empty(n, dtype=dtype)
    keystream_into(seed, out)
    return out


def chacha20_keystream_into(
    seed: bytes, nonce: bytes, out: npt.NDArray[np.unsignedinteger]
) -> None:
    """ChaCha20 keystream into ``out`` (RFC 8439 test vectors and the benchmark's comparison).

    ``nonce`` is pyca's 16-byte form: 4-byte little-endian block counter then 12-byte nonce.
    """
    _check_seed(seed)
    _check_out(out)
    if not isinstance(nonce, bytes | bytearray) or len(nonce) != 16:
        raise ConfigError(f"chacha20 nonce must be 16 bytes (got {len(nonce)})")
    enc = Cipher(algorithms.ChaCha20(bytes(seed), bytes(nonce)), mode=None).encryptor()
    _fill(enc, out)
