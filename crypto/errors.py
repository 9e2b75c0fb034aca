"""The root of the secfed exception family and the crypto layer's own errors.

The other layers' errors (protocol, privacy, training, models, data, transport, audit) are
defined in :mod:`secfed.errors`, which re-exports these too: code outside ``secfed.crypto``
imports every error from ``secfed.errors``. Every error secfed raises on purpose derives from
:class:`SecfedError`; leaves also inherit the
builtin they refine so ordinary ``except ValueError`` code keeps working. Messages name the
field, the rule and the value received -- never a secret.
"""

from __future__ import annotations

__all__ = [
    "SecfedError",
    "ConfigError",
    "CryptoError",
    "DecryptionError",
    "InvalidSignature",
    "EncodingError",
    "HeadroomError",
    "ShamirError",
    "CkksError",
]


class SecfedError(Exception):
    """Root of every error secfed raises on purpose."""


class ConfigError(SecfedError, ValueError):
    """A setting is missing, malformed or outside its allowed range."""


class CryptoError(SecfedError):
    """A cryptographic operation failed."""


class DecryptionError(CryptoError, ValueError):
    """Authenticated decryption failed. Deliberately says nothing about why."""

    def __init__(self, message: str = "authenticated decryption failed") -> None:
        super().__init__(message)


class InvalidSignature(CryptoError, ValueError):
    """A signature did not verify. Deliberately says nothing about why."""

    def __init__(self, message: str = "signature verification failed") -> None:
        super().__init__(message)


class EncodingError(SecfedError, ValueError):
    """A vector cannot be encoded into / decoded from the ring as asked."""


class HeadroomError(EncodingError, OverflowError):
    """The sum of the encoded inputs could wrap the ring."""


class ShamirError(CryptoError, ValueError):
    """Shamir split/combine was asked something impossible (bad indices, too few shares)."""


class CkksError(CryptoError, ValueError):
    """A CKKS context or ciphertext is unusable for the operation asked."""
