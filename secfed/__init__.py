"""secfed -- privacy-first secure aggregation for cross-silo federated fine-tuning.

The public Python API for a site that keeps its own training loop: implement :class:`Site`
and call :func:`join` (see ``secfed.participant.site`` and ``examples/custom_site.py``). They
are imported on first use, so ``import secfed`` stays light.
"""

from __future__ import annotations

from typing import Any

from secfed.errors import SecfedError

__version__ = "0.1.0"
__all__ = ["Mechanism", "SecfedError", "Site", "Update", "__version__", "join", "site_settings"]

_SITE_API = ("Mechanism", "Site", "Update", "join", "site_settings")


def __getattr__(name: str) -> Any:
    if name in _SITE_API:
        # imported by name: the torch-free layers (and mypy's strict run over them) never load
        # the participant package through this module
        import importlib

        return getattr(importlib.import_module("secfed.participant.site"), name)
    raise AttributeError(f"module 'secfed' has no attribute {name!r}")
