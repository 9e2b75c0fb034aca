"""secfed.crypto -- the sharp layer: pure cryptographic primitives.

Imports no torch and does no I/O. These functions do exactly what they say and assume the caller
knows the protocol; the safe front doors are :mod:`secfed.protocol`, :mod:`secfed.participant`
and :mod:`secfed.coordinator`.
"""

from secfed.crypto.errors import SecfedError

__all__ = ["SecfedError"]
