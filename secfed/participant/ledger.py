"""The join loop's view of the site's privacy ledger (``secfed.privacy.Ledger``).

Three calls, in this order per round: :meth:`SiteLedger.check` before training (refuses a round
that would pass the budget), :meth:`SiteLedger.charge` once the round is accepted -- the loop
runs it beside training and joins it before the update exists, so it is committed before
anything about the data can leave the site (the loop then checks that training ran exactly the
charged mechanism) -- and the signed head bytes the upload carries.

A round with enterprise-level (distributed) DP is charged as two entries, both committed before
the upload: the DP-SGD release, then the distributed-DP release planned for the round's
*guaranteed* number of noise shares (the fewest that can reach an accepted sum; the survivors are
never fewer, so this over-reports rather than under-reports). The ledger is append-only and
composes every entry, so a later entry can only add to ε: the exact figure for the survivors is
reported beside the ledger (:meth:`SiteLedger.exact_epsilon`), never written into it.

A round that aborted before this site's update left it (its outbound log holds no upload) gets
its charge(s) withdrawn by signed release entries (:meth:`SiteLedger.release_round`): the ledger
then composes as if the round had not been charged, and the audit re-verifies each release
against the coordinator's transcript.
"""

from __future__ import annotations

from pathlib import Path

from secfed.config import DPSGDTerms
from secfed.crypto.keys import IdentityKey
from secfed.privacy import DistributedDPEvent, DPSGDEvent, Ledger, compose_epsilon
from secfed.privacy.events import MechanismEvent
from secfed.privacy.ledger import effective_events
from secfed.privacy.receipts import LedgerReceipt

__all__ = ["SiteLedger", "open_site_ledger"]


class SiteLedger:
    """Budget check, charge (committed before the update leaves), head, epsilon spent."""

    def __init__(self, path: Path, *, enterprise_id: str, identity: IdentityKey,
                 budget_epsilon: float, delta: float, create: bool = False):
        self._ledger = Ledger.open(path, enterprise_id=enterprise_id, identity=identity,
                                   budget_epsilon=budget_epsilon, delta=delta, create=create)

    def check_round(self, dp: DPSGDTerms, distributed: DistributedDPEvent | None = None) -> float:
        """Epsilon (budget accountant) after this round's charge(s): its DP-SGD terms and the
        planned distributed-DP release.

        Raises:
            BudgetExceeded: the charge would pass the site's budget.
        """
        return float(self._ledger.check_budget(_round_events(dp, distributed)))

    def charge_round(self, *, round_number: int, session_id: bytes, dp: DPSGDTerms,
                     distributed: DistributedDPEvent | None = None) -> bytes:
        """Commit the round's charge(s); returns the signed ledger-head bytes for the upload."""
        self._ledger.charge(round_number=round_number, session_id=session_id,
                            event=_round_events(dp, distributed))
        return self._ledger.head().to_bytes()

    def check(self, *, noise_multiplier: float, sample_rate: float, steps: int,
              distributed: DistributedDPEvent | None = None) -> float:
        """:meth:`check_round` for a mechanism given by (sigma, q, steps)."""
        return self.check_round(_terms(noise_multiplier, sample_rate, steps), distributed)

    def charge(self, *, round_number: int, session_id: bytes, noise_multiplier: float,
               sample_rate: float, steps: int,
               distributed: DistributedDPEvent | None = None) -> bytes:
        """:meth:`charge_round` for a mechanism given by (sigma, q, steps)."""
        return self.charge_round(round_number=round_number, session_id=session_id,
                                 dp=_terms(noise_multiplier, sample_rate, steps),
                                 distributed=distributed)

    def charge_event(self, *, round_number: int, session_id: bytes,
                     event: MechanismEvent) -> None:
        """Commit one more entry (a top-up when a round turned out worse than planned)."""
        self._ledger.charge(round_number=round_number, session_id=session_id, event=event)

    def exact_epsilon(self, *, planned: DistributedDPEvent, exact: DistributedDPEvent) -> float:
        """ε (budget accountant) over the ledger's events with the newest ``planned``
        distributed-DP entry replaced by ``exact`` (the shares that reached the sum)."""
        events: list[MechanismEvent] = effective_events(self._ledger.entries())
        for i in range(len(events) - 1, -1, -1):
            if events[i] == planned:
                events[i] = exact
                break
        return float(compose_epsilon(events, delta=self._ledger.delta,
                                     accountant=self._ledger.budget_accountant))

    def release_round(self, round_number: int) -> bytes | None:
        """Withdraw the round's charge(s) -- only for a round whose update never left the site
        (the caller checked its outbound log): one signed release entry per charge, so ε
        equals ε without the round. Returns the signed head after it, or None when the round
        has no charge to release (the round aborted before the charge was committed).

        Raises:
            LedgerError: the write failed (nothing written).
        """
        if not self._ledger.unreleased_charges(round_number):
            return None
        self._ledger.release(round_number=round_number)
        return self._ledger.head().to_bytes()

    def epsilon(self) -> float:
        """Epsilon spent so far (PRV accountant, the reported figure)."""
        return float(self._ledger.epsilon_spent()[0])

    def head_bytes(self) -> bytes:
        """The signed head of the newest entry (what the round's confirmation carries)."""
        return self._ledger.head().to_bytes()

    def keep_receipt(self, receipt: LedgerReceipt) -> None:
        """Store a coordinator receipt the caller has verified (append-only)."""
        self._ledger.add_receipt(receipt)


def _round_events(dp: DPSGDTerms,
                  distributed: DistributedDPEvent | None) -> list[MechanismEvent]:
    """A round's releases in charge order: the DP-SGD run, then the planned distributed DP."""
    dpsgd = DPSGDEvent.of(dp)
    return [dpsgd] if distributed is None else [dpsgd, distributed]


def _terms(noise_multiplier: float, sample_rate: float, steps: int) -> DPSGDTerms:
    return DPSGDTerms(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                      local_steps=steps)


def open_site_ledger(path: Path, *, enterprise_id: str, identity: IdentityKey,
                     budget_epsilon: float, delta: float, create: bool = False) -> SiteLedger:
    """Open the site's ledger at ``path``; a new one only with ``create`` (explicit)."""
    return SiteLedger(path, enterprise_id=enterprise_id, identity=identity,
                      budget_epsilon=budget_epsilon, delta=delta, create=create)
