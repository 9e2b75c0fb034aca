"""Re-export of the secfed exception family (defined in :mod:`secfed.crypto.errors`)."""

from secfed.crypto.errors import *  # noqa: F403
from secfed.crypto.errors import __all__  # noqa: F401
