"""The secfed exception family: one import name for every layer above ``secfed.crypto``.

The root :class:`SecfedError` and the crypto layer's errors (``ConfigError``, ``CryptoError``,
``DecryptionError``, ``InvalidSignature``, ``EncodingError``, ``HeadroomError``, ``ShamirError``,
``CkksError``) are defined in :mod:`secfed.crypto.errors`, the lowest layer, and re-exported
here; the errors of the protocol, privacy, training, models, data, transport and audit layers
are defined below. Leaves also inherit the builtin they refine, so ordinary ``except
ValueError`` code keeps working. Messages name the field, the rule and the value received --
never a secret.
"""

from __future__ import annotations

from secfed.crypto.errors import (
    CkksError,
    ConfigError,
    CryptoError,
    DecryptionError,
    EncodingError,
    HeadroomError,
    InvalidSignature,
    SecfedError,
    ShamirError,
)

# This module's own errors, then (re-exported) the root and the crypto layer's.
__all__ = [
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
__all__ += [
    "CkksError",
    "ConfigError",
    "CryptoError",
    "DecryptionError",
    "EncodingError",
    "HeadroomError",
    "InvalidSignature",
    "SecfedError",
    "ShamirError",
]


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
