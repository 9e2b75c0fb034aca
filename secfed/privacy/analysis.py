"""Pure privacy maths: RDP curves of our mechanisms and the RDP -> (ε, δ) conversion.

No bookkeeping here; :mod:`secfed.privacy.accounting` composes events with these functions and
with Opacus' analysis modules.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

import numpy as np


def _opacus_rdp() -> ModuleType:
    """Opacus' RDP analysis module (``opacus/accountants/analysis/rdp.py``: numpy and scipy).

    Importing it the usual way runs ``opacus/__init__``, which imports torch (seconds): a
    budget check needs none of that. Unless opacus is already imported, the same file is loaded
    under a private name without running the package's ``__init__``.
    """
    name = "opacus.accountants.analysis.rdp"
    if name in sys.modules or "opacus" in sys.modules:
        from opacus.accountants.analysis import rdp

        return rdp
    package = importlib.util.find_spec("opacus")  # finds, does not run, the package
    if package is None or not package.submodule_search_locations:
        raise ImportError("opacus must be installed (its RDP analysis is the reference)")
    path = f"{list(package.submodule_search_locations)[0]}/accountants/analysis/rdp.py"
    spec = importlib.util.spec_from_file_location("secfed.privacy._opacus_rdp", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


opacus_rdp = _opacus_rdp()

__all__ = ["RDP_ORDERS", "subsampled_gaussian_rdp", "skellam_rdp", "rdp_to_epsilon"]

# Opacus' RDPAccountant.DEFAULT_ALPHAS, so the reference values of its docs reproduce exactly.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def subsampled_gaussian_rdp(
    *, sample_rate: float, noise_multiplier: float, steps: int, orders: Sequence[float] = RDP_ORDERS
) -> np.ndarray:
    """RDP of ``steps`` Poisson-subsampled Gaussian steps (Mironov et al. 2019, via Opacus)."""
    return np.asarray(
        opacus_rdp.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=list(orders)
        ),
        dtype=np.float64,
    )


def skellam_rdp(
    *, l2_sensitivity: float, l1_sensitivity: float, variance: float, count: int = 1,
    orders: Sequence[float] = RDP_ORDERS,
) -> np.ndarray:
    """RDP of ``count`` releases of the multi-dimensional Skellam mechanism.

    Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
    Learning" (NeurIPS 2021), Theorem 3.5 / Corollary 3.6: for integer α > 1, per-coordinate
    noise variance μ and integer-grid sensitivities Δ1, Δ2,
    ``ε(α) ≤ α Δ2² / (2μ) + min(((2α − 1) Δ2² + 6 Δ1) / (4 μ²), 3 Δ1 / (2μ))``.
    The bound is only proven for integer orders: other orders get +inf (never chosen).
    """
    out = np.empty(len(orders), dtype=np.float64)
    d2sq = float(l2_sensitivity) ** 2
    d1 = float(l1_sensitivity)
    mu = float(variance)
    for i, alpha in enumerate(orders):
        if alpha <= 1 or float(alpha) != math.floor(alpha):
            out[i] = math.inf
            continue
        out[i] = alpha * d2sq / (2 * mu) + min(((2 * alpha - 1) * d2sq + 6 * d1) / (4 * mu**2),
                                               3 * d1 / (2 * mu))
    return out * count


def rdp_to_epsilon(rdp: np.ndarray, *, delta: float, orders: Sequence[float] = RDP_ORDERS) -> float:
    """(ε, δ) from an RDP curve (Balle et al. 2020, Theorem 21, as in Opacus)."""
    if not np.any(rdp):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the optimum sits at an end of the orders
        eps, _ = opacus_rdp.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)
