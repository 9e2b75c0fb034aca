"""The join loop's view of the site's privacy ledger (``secfed.privacy.Ledger``).

Three calls, in this order per round: :meth:`SiteLedger.check` before training (refuses a round
that would pass the budget), :meth:`SiteLedger.charge` after training and before anything leaves
the site (committed), and the signed head bytes the upload carries.
"""

from __future__ import annotations

from pathlib import Path

from secfed.crypto.keys import IdentityKey
from secfed.privacy import DPSGDEvent, Ledger

__all__ = ["SiteLedger", "open_site_ledger"]


class SiteLedger:
    """Budget check, charge (committed before the update leaves), head, epsilon spent."""

    def __init__(self, path: Path, *, enterprise_id: str, identity: IdentityKey,
                 budget_epsilon: float, delta: float):
        self._ledger = Ledger.open(path, enterprise_id=enterprise_id, identity=identity,
                                   budget_epsilon=budget_epsilon, delta=delta)

    def check(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon (budget accountant) after this charge.

        Raises:
            BudgetExceeded: the charge would pass the site's budget.
        """
        event = DPSGDEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return float(self._ledger.check_budget(event))

    def charge(self, *, round_number: int, session_id: bytes, noise_multiplier: float,
               sample_rate: float, steps: int) -> bytes:
        """Commit the charge; returns the signed ledger-head bytes for the upload."""
        event = DPSGDEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        self._ledger.charge(round_number=round_number, session_id=session_id, event=event)
        return self._ledger.head().to_bytes()

    def epsilon(self) -> float:
        """Epsilon spent so far (PRV accountant, the reported figure)."""
        return float(self._ledger.epsilon_spent()[0])


def open_site_ledger(path: Path, *, enterprise_id: str, identity: IdentityKey,
                     budget_epsilon: float, delta: float) -> SiteLedger:
    """Open (or create) the site's ledger at ``path``."""
    return SiteLedger(path, enterprise_id=enterprise_id, identity=identity,
                      budget_epsilon=budget_epsilon, delta=delta)
