"""Differential-privacy accounting, the per-enterprise privacy ledger, budgets, distributed DP.

Front doors: :func:`compute_epsilon`, :func:`calibrate_noise`, :class:`Ledger`,
:func:`verify_ledger`. Heavy or optional pieces (``distributed``, ``empirical``) are imported
from their modules.
"""

from secfed.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_BUDGET_EPSILON,
    NoisePlan,
    calibrate_noise,
    check_accounting_matches,
    check_delta,
    compose_epsilon,
    compute_epsilon,
    default_delta,
    plan_noise,
)
from secfed.privacy.events import (
    DistributedDPEvent,
    DPSGDEvent,
    GaussianEvent,
    MechanismEvent,
    event_from_json,
)
from secfed.privacy.ledger import (
    Ledger,
    LedgerEntry,
    LedgerHead,
    LedgerReport,
    read_ledger,
    read_ledger_meta,
    verify_ledger,
)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_BUDGET_EPSILON",
    "calibrate_noise",
    "check_accounting_matches",
    "check_delta",
    "compose_epsilon",
    "compute_epsilon",
    "default_delta",
    "NoisePlan",
    "plan_noise",
    "DistributedDPEvent",
    "DPSGDEvent",
    "GaussianEvent",
    "MechanismEvent",
    "event_from_json",
    "Ledger",
    "LedgerEntry",
    "LedgerHead",
    "LedgerReport",
    "read_ledger",
    "read_ledger_meta",
    "verify_ledger",
]
