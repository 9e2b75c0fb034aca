"""The secfed exception family.

Every error secfed raises on purpose derives from :class:`SecfedError`; leaves also inherit the
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
    "MessageFormatError",
    "ProtocolError",
    "ProtocolAbort",
    "PrivacyError",
    "BudgetExceeded",
    "LedgerError",
    "LedgerVerificationError",
    "DPGuardError",
    "TrainingError",
    "ModelError",
    "DataError",
    "TransportError",
    "AuditError",
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


class MessageFormatError(SecfedError, ValueError):
    """A wire message could not be decoded (wrong version, lengths, byte order, fields)."""


class ProtocolError(SecfedError, RuntimeError):
    """A protocol state machine received something it must not act on."""


class ProtocolAbort(ProtocolError):
    """The round was aborted cleanly; no secret was released by the party raising it."""

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage


class PrivacyError(SecfedError):
    """A differential-privacy rule would be broken."""


class BudgetExceeded(PrivacyError, RuntimeError):
    """The charge for a round would take an enterprise over its privacy budget."""


class LedgerError(PrivacyError, RuntimeError):
    """The privacy ledger cannot be read or written as asked."""


class LedgerVerificationError(LedgerError):
    """The ledger failed verification (hash chain, signature, recomputed epsilon)."""

    def __init__(self, message: str, *, entry: int | None = None) -> None:
        super().__init__(message)
        self.entry = entry


class DPGuardError(PrivacyError, ValueError):
    """A guardrail against a silent DP mistake tripped (sampler, q/sigma mismatch, bad delta)."""


class TrainingError(SecfedError, RuntimeError):
    """Local training failed."""


class ModelError(SecfedError, ValueError):
    """A model directory, adapter or flat-vector layout is unusable."""


class DataError(SecfedError, ValueError):
    """A dataset directory or record is unusable."""


class TransportError(SecfedError, ConnectionError):
    """The network exchange with the coordinator failed."""


class AuditError(SecfedError):
    """An audit could not be produced or found a failed check."""
