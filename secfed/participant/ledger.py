"""The join loop's view of the site's privacy ledger.

Uses :mod:`secfed.privacy` (``Ledger``, ``DPSGDEvent``, ``compute_epsilon``) per CONTRACTS.md.
Until that package exposes them, :class:`_StandInLedger` -- clearly a stand-in -- keeps a
hash-chained, Ed25519-signed list of DP-SGD events in ``ledger.sqlite`` and reports epsilon with
Opacus' RDP analysis (RDP of independent mechanisms adds up, Mironov 2017).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import struct
import time
from pathlib import Path

from secfed.crypto.errors import BudgetExceeded
from secfed.crypto.keys import IdentityKey

__all__ = ["SiteLedger", "open_site_ledger"]

RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256]
_HEAD_LABEL = b"secfed/v1/standin-ledger-head"


class SiteLedger:
    """Budget check, charge (committed before the update leaves), head, epsilon spent."""

    def check(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after this charge. Raises BudgetExceeded if it would pass the budget."""
        raise NotImplementedError

    def charge(self, *, round_number: int, session_id: bytes, noise_multiplier: float,
               sample_rate: float, steps: int) -> bytes:
        """Commit the charge; returns the signed ledger-head bytes."""
        raise NotImplementedError

    def epsilon(self) -> float:
        raise NotImplementedError


class _PrivacyLedger(SiteLedger):
    def __init__(self, path: Path, *, enterprise_id: str, identity: IdentityKey,
                 budget_epsilon: float, delta: float):
        from secfed.privacy import DPSGDEvent, Ledger

        self._event = DPSGDEvent
        self._ledger = Ledger.open(path, enterprise_id=enterprise_id, identity=identity,
                                   budget_epsilon=budget_epsilon, delta=delta)

    def check(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        event = self._event(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return float(self._ledger.check_budget(event))

    def charge(self, *, round_number: int, session_id: bytes, noise_multiplier: float,
               sample_rate: float, steps: int) -> bytes:
        event = self._event(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        self._ledger.charge(round_number=round_number, session_id=session_id, event=event)
        return self._ledger.head().to_bytes()

    def epsilon(self) -> float:
        spent = self._ledger.epsilon_spent()
        return float(spent[0] if isinstance(spent, tuple) else spent)


class _StandInLedger(SiteLedger):
    """Stand-in until secfed.privacy lands: hash-chained, signed, RDP-accounted."""

    def __init__(self, path: Path, *, enterprise_id: str, identity: IdentityKey,
                 budget_epsilon: float, delta: float):
        self._id = enterprise_id
        self._identity = identity
        self._budget = budget_epsilon
        self._delta = delta
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS standin_entries (idx INTEGER PRIMARY KEY, round INTEGER,"
            " session_id BLOB, event TEXT, prev_hash BLOB, entry_hash BLOB, signature BLOB,"
            " created_at REAL)"
        )
        os.chmod(path, 0o600)

    def _events(self) -> list[dict]:
        return [json.loads(r[0]) for r in self._db.execute(
            "SELECT event FROM standin_entries ORDER BY idx")]

    def _eps(self, events: list[dict]) -> float:
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        if not events:
            return 0.0
        total = None
        for e in events:
            rdp = compute_rdp(q=e["sample_rate"], noise_multiplier=e["noise_multiplier"],
                              steps=e["steps"], orders=RDP_ORDERS)
            total = rdp if total is None else total + rdp
        eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=self._delta)
        return float(eps)

    def check(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        spent = self._eps(self._events())
        after = self._eps(self._events() + [dict(noise_multiplier=noise_multiplier,
                                                  sample_rate=sample_rate, steps=steps)])
        if after > self._budget:
            raise BudgetExceeded(
                f"epsilon after this round must be <= budget {self._budget} "
                f"(spent {spent:.4f}, would reach {after:.4f})"
            )
        return after

    def charge(self, *, round_number: int, session_id: bytes, noise_multiplier: float,
               sample_rate: float, steps: int) -> bytes:
        self.check(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        event = json.dumps({"kind": "dpsgd", "version": 1, "noise_multiplier": noise_multiplier,
                            "sample_rate": sample_rate, "steps": steps}, sort_keys=True)
        row = self._db.execute(
            "SELECT idx, entry_hash FROM standin_entries ORDER BY idx DESC LIMIT 1").fetchone()
        idx, prev = (row[0] + 1, bytes(row[1])) if row else (0, bytes(32))
        entry_hash = hashlib.sha256(
            prev + struct.pack(">QQ", idx, round_number) + session_id + event.encode()
        ).digest()
        head = _HEAD_LABEL + self._id.encode() + struct.pack(">Q", idx) + entry_hash
        signature = self._identity.sign(head)
        self._db.execute(
            "INSERT INTO standin_entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (idx, round_number, session_id, event, prev, entry_hash, signature, time.time()),
        )
        return struct.pack(">Q", idx) + entry_hash + signature

    def epsilon(self) -> float:
        return self._eps(self._events())


def open_site_ledger(path: Path, *, enterprise_id: str, identity: IdentityKey,
                     budget_epsilon: float, delta: float) -> SiteLedger:
    """The real ledger when :mod:`secfed.privacy` provides it, else the stand-in."""
    try:
        from secfed.privacy import DPSGDEvent, Ledger  # noqa: F401
    except ImportError:
        cls: type[SiteLedger] = _StandInLedger
    else:
        cls = _PrivacyLedger
    return cls(path, enterprise_id=enterprise_id, identity=identity,  # type: ignore[call-arg]
               budget_epsilon=budget_epsilon, delta=delta)
