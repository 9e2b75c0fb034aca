"""CKKS (TenSEAL) contexts and packing for addition-only aggregation.

Sharp layer. Parameters are fixed for one job -- summing vectors -- and nothing else:
N = 8192 (4096 slots), coefficient moduli [60, 60] (one data prime plus the special prime,
so no multiplication is possible and none is needed), scale 2^40. Enterprises hold the secret
key and encrypt *symmetrically* with it (a symmetric ciphertext is as secure and half as costly
to make as a public-key one); the coordinator gets a *public* serialisation that carries no
secret, public, Galois or relinearisation keys -- it can only add ciphertexts it receives.
Whoever holds the secret key can decrypt every enterprise's update: this protects against a
coordinator that does not collude with an enterprise, and against nothing more.

A flat vector is packed across ciphertexts of 4096 slots; each ciphertext travels as TenSEAL's
own serialised bytes (protobuf + SEAL's format; never pickle). Every ciphertext a context
loads is checked against these parameters before it is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import tenseal as ts
import tenseal.sealapi  # noqa: F401  (registers SEAL's types, e.g. Modulus, with pybind11)

from secfed.crypto.errors import CkksError
from secfed.names import CKKS_SLOTS

__all__ = [
    "POLY_MODULUS_DEGREE",
    "COEFF_MOD_BIT_SIZES",
    "SCALE_BITS",
    "SLOTS",
    "DEFAULT_WORKERS",
    "CkksContext",
    "new_context",
    "load_context",
    "n_ciphertexts",
    "encrypt",
    "add_encrypted",
    "decrypt",
    "decrypt_sum",
]

POLY_MODULUS_DEGREE = 8192  # smallest N giving 128-bit security for a 120-bit modulus chain
COEFF_MOD_BIT_SIZES = (60, 60)  # one data prime + the special prime: additions only, no rescale
SCALE_BITS = 40  # 2^40 scale: ~1e-9 absolute error per value, far below fp32 LoRA noise
SLOTS = CKKS_SLOTS  # = POLY_MODULUS_DEGREE // 2: CKKS packs N/2 complex (here real) slots per ciphertext
# TenSEAL 0.3.18 holds the GIL while it encrypts, serialises and decrypts (measured: one
# 1e6-value encrypt call kept every other Python thread waiting for 0.69 s of its 1.1 s), so
# threads add no throughput; ``workers`` stays in the API for a TenSEAL that releases it.
DEFAULT_WORKERS = 1
_CIPHERTEXT_POLYS = 2  # a fresh or summed ciphertext; 3 would mean a multiplication happened

T = TypeVar("T")
R = TypeVar("R")


def _is_symmetric(ctx: ts.Context) -> bool:
    # TenSEAL exposes no getter for the encryption type; has_public_key() refuses to answer
    # exactly for symmetric contexts.
    try:
        ctx.has_public_key()
    except ValueError:
        return True
    return False


def _check_parameters(ctx: ts.Context) -> None:
    """Raise CkksError unless ``ctx`` has exactly secfed's CKKS parameters."""
    parms = ctx.seal_context().data.key_context_data().parms()
    scheme = parms.scheme()
    if scheme != ts.SCHEME_TYPE.CKKS.value:
        raise CkksError(f"ckks context scheme must be CKKS (got {scheme})")
    degree = int(parms.poly_modulus_degree())
    if degree != POLY_MODULUS_DEGREE:
        raise CkksError(f"ckks poly_modulus_degree must be {POLY_MODULUS_DEGREE} (got {degree})")
    bits = tuple(int(q.bit_count()) for q in parms.coeff_modulus())
    if bits != COEFF_MOD_BIT_SIZES:
        raise CkksError(
            f"ckks coefficient moduli must be {list(COEFF_MOD_BIT_SIZES)} bits (got {list(bits)})"
        )
    scale = float(ctx.global_scale)
    if scale != float(2**SCALE_BITS):
        got = f"2^{math.log2(scale):.3g}" if scale > 0 else f"{scale}"
        raise CkksError(f"ckks global scale must be 2^{SCALE_BITS} (got {got})")
    if not _is_symmetric(ctx):
        raise CkksError("ckks context must use symmetric encryption (got a public-key context)")


class CkksContext:
    """A validated TenSEAL context with secfed's parameters, with or without the secret key."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: ts.Context) -> None:
        _check_parameters(ctx)
        self._ctx = ctx

    @property
    def has_secret(self) -> bool:
        """True for an enterprise's context (can encrypt and decrypt)."""
        return bool(self._ctx.has_secret_key())

    @property
    def tenseal(self) -> ts.Context:
        """The underlying TenSEAL context (sharp: do not serialise it by other means)."""
        return self._ctx

    def serialize(self, *, secret: bool) -> bytes:
        """TenSEAL bytes of this context, never with Galois, relinearisation or public keys.

        ``secret=True`` includes the secret key (an enterprise's startup kit); ``secret=False``
        is what the coordinator gets.

        Raises:
            CkksError: ``secret=True`` on a context that holds no secret key.
        """
        if secret and not self.has_secret:
            raise CkksError(
                "cannot serialise a secret ckks context: this context has no secret key"
            )
        return bytes(
            self._ctx.serialize(
                save_public_key=False,
                save_secret_key=secret,
                save_galois_keys=False,
                save_relin_keys=False,
            )
        )

    def public(self) -> CkksContext:
        """A copy without the secret key (the coordinator's view)."""
        return load_context(self.serialize(secret=False), expect_secret=False)

    def __repr__(self) -> str:
        kind = "secret" if self.has_secret else "public"
        return f"CkksContext({kind}, N={POLY_MODULUS_DEGREE}, scale=2^{SCALE_BITS})"


def new_context() -> CkksContext:
    """A fresh context holding a new secret key (SEAL draws it from the OS CSPRNG)."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        POLY_MODULUS_DEGREE,
        coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        n_threads=1,
    )
    ctx.global_scale = float(2**SCALE_BITS)
    return CkksContext(ctx)


def load_context(data: bytes, *, expect_secret: bool) -> CkksContext:
    """Load a serialised context and check it is what the caller expects.

    ``expect_secret=False`` (the coordinator) refuses a context that carries a secret key;
    ``expect_secret=True`` (an enterprise) refuses one without it. Either way a context that
    carries Galois, relinearisation or public keys, or other parameters, is refused.

    Raises:
        CkksError: unparseable bytes, wrong parameters, or the wrong kind of context.
    """
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise CkksError("ckks context must be non-empty bytes")
    try:
        ctx = ts.context_from(bytes(data), n_threads=1)
    except Exception as exc:  # TenSEAL/protobuf/SEAL raise many unrelated types
        raise CkksError(f"ckks context bytes could not be parsed ({type(exc).__name__})") from exc
    _check_parameters(ctx)
    if ctx.has_galois_keys() or ctx.has_relin_keys():
        raise CkksError("ckks context must carry no Galois or relinearisation keys (got some)")
    has_secret = bool(ctx.has_secret_key())
    if has_secret != expect_secret:
        want = "a secret" if expect_secret else "a public"
        got = "one with the secret key" if has_secret else "one without the secret key"
        raise CkksError(f"expected {want} ckks context (got {got})")
    return CkksContext(ctx)


def n_ciphertexts(length: int) -> int:
    """How many 4096-slot ciphertexts a vector of ``length`` values packs into."""
    if length < 1:
        raise CkksError(f"vector length must be >= 1 (got {length})")
    return -(-length // SLOTS)


def _map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    if workers <= 1 or len(items) < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _load_ciphertext(ctx: ts.Context, blob: bytes, *, slots: int, where: str) -> Any:
    """Deserialise one ciphertext and check its shape against secfed's parameters."""
    try:
        vec = ts.ckks_vector_from(ctx, bytes(blob))
    except Exception as exc:
        raise CkksError(
            f"{where}: ciphertext bytes could not be parsed ({type(exc).__name__})"
        ) from exc
    if vec.size() != slots:
        raise CkksError(f"{where}: ciphertext must hold {slots} values (got {vec.size()})")
    inner = vec.ciphertext()
    if len(inner) != 1:
        raise CkksError(f"{where}: must be exactly one SEAL ciphertext (got {len(inner)})")
    ct = inner[0]
    if ct.size() != _CIPHERTEXT_POLYS:
        raise CkksError(
            f"{where}: ciphertext must have {_CIPHERTEXT_POLYS} polynomials (got {ct.size()})"
        )
    if ct.scale != float(2**SCALE_BITS):
        raise CkksError(f"{where}: ciphertext scale must be 2^{SCALE_BITS} (got {ct.scale:.6g})")
    if list(ct.parms_id()) != list(ctx.seal_context().data.first_parms_id()):
        raise CkksError(f"{where}: ciphertext is not at the context's data level")
    if ct.is_transparent():
        raise CkksError(f"{where}: ciphertext is transparent (it would reveal its plaintext)")
    return vec


def _slot_counts(length: int) -> list[int]:
    n = n_ciphertexts(length)
    return [SLOTS] * (n - 1) + [length - SLOTS * (n - 1)]


def encrypt(ctx: CkksContext, vec: npt.ArrayLike, *, workers: int = DEFAULT_WORKERS) -> list[bytes]:
    """Encrypt a flat vector with the secret key; one serialised ciphertext per 4096 values.

    Raises:
        CkksError: the context has no secret key, or the vector is empty, not 1-D or not finite.
    """
    if not ctx.has_secret:
        raise CkksError("encryption needs the enterprise's secret ckks context (got a public one)")
    arr = np.asarray(vec, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise CkksError(f"vector must be 1-D and non-empty (got shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise CkksError("vector contains NaN or infinity; refusing to encrypt")
    tctx = ctx.tenseal
    chunks = [arr[i : i + SLOTS] for i in range(0, arr.size, SLOTS)]

    def one(chunk: npt.NDArray[np.float64]) -> bytes:
        return bytes(ts.ckks_vector(tctx, chunk).serialize())

    return _map(one, chunks, workers)


def _check_blobs(cts: Sequence[bytes], expected: int, who: str) -> None:
    if not isinstance(cts, list | tuple):
        raise CkksError(f"{who} must be a list of ciphertexts (got {type(cts).__name__})")
    if len(cts) != expected:
        raise CkksError(f"{who} must have {expected} ciphertexts (got {len(cts)})")


def add_encrypted(
    ctx: CkksContext,
    contributions: Sequence[Sequence[bytes]],
    *,
    length: int | None = None,
    workers: int = DEFAULT_WORKERS,
) -> list[bytes]:
    """Sum several encrypted vectors ciphertext by ciphertext (the coordinator's job).

    Works with a public context. ``length`` (the plaintext vector length) fixes the expected
    number of ciphertexts and slots; without it the first contribution sets them.

    Raises:
        CkksError: no contributions, a contribution of the wrong length, or any ciphertext that
            does not parse or does not have secfed's parameters (naming the contribution).
    """
    if not contributions:
        raise CkksError("add_encrypted needs at least one contribution (got 0)")
    if length is None:
        length = _infer_length(ctx, contributions[0])
    counts = _slot_counts(length)
    for i, cts in enumerate(contributions):
        _check_blobs(cts, len(counts), f"contribution {i}")
    tctx = ctx.tenseal

    def one(position: int) -> bytes:
        vectors = (
            _load_ciphertext(
                tctx, cts[position], slots=counts[position], where=f"contribution {i}[{position}]"
            )
            for i, cts in enumerate(contributions)
        )
        total = next(vectors)
        for vec in vectors:
            total.add_(vec)
        return bytes(total.serialize())

    return _map(one, list(range(len(counts))), workers)


def _infer_length(ctx: CkksContext, cts: Sequence[bytes]) -> int:
    if not isinstance(cts, list | tuple) or not cts:
        raise CkksError("contribution 0 must be a non-empty list of ciphertexts")
    try:
        last = ts.ckks_vector_from(ctx.tenseal, bytes(cts[-1]))
    except Exception as exc:
        raise CkksError(
            f"contribution 0[-1]: ciphertext bytes could not be parsed ({type(exc).__name__})"
        ) from exc
    tail = int(last.size())
    if not 1 <= tail <= SLOTS:
        raise CkksError(f"contribution 0[-1]: ciphertext must hold 1..{SLOTS} values (got {tail})")
    return SLOTS * (len(cts) - 1) + tail


def decrypt(
    ctx: CkksContext, cts: Sequence[bytes], length: int, *, workers: int = DEFAULT_WORKERS
) -> npt.NDArray[np.float64]:
    """Decrypt a (summed) vector of ``length`` values with the secret key.

    Raises:
        CkksError: the context has no secret key, or the ciphertexts do not match ``length``.
    """
    if not ctx.has_secret:
        raise CkksError("decryption needs the enterprise's secret ckks context (got a public one)")
    counts = _slot_counts(length)
    _check_blobs(cts, len(counts), "encrypted vector")
    tctx = ctx.tenseal

    def one(position: int) -> list[float]:
        vec = _load_ciphertext(
            tctx, cts[position], slots=counts[position], where=f"ciphertext {position}"
        )
        return list(vec.decrypt())

    parts = _map(one, list(range(len(counts))), workers)
    out = np.empty(length, dtype=np.float64)
    for position, values in enumerate(parts):
        out[position * SLOTS : position * SLOTS + counts[position]] = values
    return out


def decrypt_sum(
    ctx: CkksContext, contributions: Sequence[Sequence[bytes]], length: int
) -> npt.NDArray[np.float64]:
    """Add several encrypted vectors of ``length`` values and decrypt only their sum.

    Each ciphertext is parsed and checked like :func:`add_encrypted` does; the sum is never
    serialised, and no individual contribution is ever decrypted.

    Raises:
        CkksError: no secret key, no contributions, a contribution of the wrong length, or a
            ciphertext that does not parse or has other parameters (naming it).
    """
    if not ctx.has_secret:
        raise CkksError("decryption needs the enterprise's secret ckks context (got a public one)")
    if not contributions:
        raise CkksError("decrypt_sum needs at least one contribution (got 0)")
    counts = _slot_counts(length)
    for i, cts in enumerate(contributions):
        _check_blobs(cts, len(counts), f"contribution {i}")
    tctx = ctx.tenseal
    out = np.empty(length, dtype=np.float64)
    for position, count in enumerate(counts):
        total = None
        for i, cts in enumerate(contributions):
            vec = _load_ciphertext(tctx, cts[position], slots=count, where=f"contribution {i}[{position}]")
            if total is None:
                total = vec
            else:
                total.add_(vec)
        assert total is not None
        out[position * SLOTS : position * SLOTS + count] = total.decrypt()
    return out
