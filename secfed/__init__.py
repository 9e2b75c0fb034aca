"""secfed -- privacy-first secure aggregation for cross-silo federated fine-tuning."""

from secfed.crypto.errors import SecfedError

__version__ = "0.1.0"
__all__ = ["SecfedError", "__version__"]
