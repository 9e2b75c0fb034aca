"""A ledger is never started implicitly, and the coordinator receipts it keeps pin it
(issue 20, item 5)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from secfed.crypto.keys import IdentityKey
from secfed.errors import LedgerError, LedgerVerificationError
from secfed.privacy import DPSGDEvent, Ledger, LedgerHead, read_ledger
from secfed.privacy.ledger import read_receipts, verify_receipts
from secfed.privacy.receipts import GENESIS_LINK, LedgerReceipt, sign_receipt

EVENT = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.01, steps=50)


def _ledger(path: Path, identity: IdentityKey, *, create: bool = False) -> Ledger:
    return Ledger.open(path, enterprise_id="acme", identity=identity, delta=1e-5, create=create)


def test_a_missing_or_emptied_ledger_is_not_silently_recreated(tmp_path: Path) -> None:
    identity = IdentityKey.generate()
    path = tmp_path / "ledger.sqlite"
    with pytest.raises(LedgerError, match="refusing to start a fresh ledger implicitly"):
        _ledger(path, identity)
    assert not path.exists()  # nothing was created
    with _ledger(path, identity, create=True) as ledger:  # the explicit request
        for r in range(3):
            ledger.charge(round_number=r, session_id=os.urandom(32), event=EVENT)
    with _ledger(path, identity) as again:  # an existing ledger opens without the flag
        assert again.head().index == 3
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            p.unlink()
    with pytest.raises(LedgerError, match="does not exist"):
        _ledger(path, identity)
    path.write_bytes(b"")  # an emptied file is a missing ledger, not a new one
    with pytest.raises(LedgerError, match="holds no ledger"):
        _ledger(path, identity)


def test_receipts_are_kept_append_only_and_pin_the_ledger(tmp_path: Path) -> None:
    identity, coordinator = IdentityKey.generate(), IdentityKey.generate()
    path = tmp_path / "ledger.sqlite"
    ledger = _ledger(path, identity, create=True)
    receipts = []
    for r in (1, 2):
        ledger.charge(round_number=r, session_id=os.urandom(32), event=EVENT)
        receipts.append(sign_receipt(
            coordinator, federation="f", round_number=r, stage="upload",
            head=ledger.head().to_bytes(), message_sha256=bytes(32), previous_link=GENESIS_LINK))
        ledger.add_receipt(receipts[-1])
    ledger.add_receipt(receipts[-1])  # kept once
    assert read_receipts(path) == receipts
    assert LedgerReceipt.from_bytes(receipts[0].to_bytes()) == receipts[0]
    entries = read_ledger(path)
    verify_receipts(entries, receipts, enterprise_id="acme",
                    coordinator_key=coordinator.public_bytes(), federation="f")
    # the site cannot store a receipt for a head its ledger does not have
    other = Ledger.open(tmp_path / "other.sqlite", enterprise_id="acme", identity=identity,
                        delta=1e-5, create=True)
    for _ in range(3):
        other.charge(round_number=9, session_id=os.urandom(32), event=EVENT)
    alien = sign_receipt(coordinator, federation="f", round_number=9, stage="upload",
                         head=other.head().to_bytes(), message_sha256=bytes(32),
                         previous_link=GENESIS_LINK)
    with pytest.raises(LedgerError, match="must name an entry of this ledger"):
        ledger.add_receipt(alien)
    # a forged receipt, one of another federation, and a ledger rolled back below a receipt
    forged = sign_receipt(IdentityKey.generate(), federation="f", round_number=2, stage="upload",
                          head=receipts[1].head, message_sha256=bytes(32),
                          previous_link=GENESIS_LINK)
    with pytest.raises(LedgerVerificationError, match="not signed by the coordinator"):
        verify_receipts(entries, [forged], enterprise_id="acme",
                        coordinator_key=coordinator.public_bytes())
    with pytest.raises(LedgerVerificationError, match="issued for federation"):
        verify_receipts(entries, receipts, enterprise_id="acme",
                        coordinator_key=coordinator.public_bytes(), federation="g")
    with pytest.raises(LedgerVerificationError, match="rolled back or truncated") as info:
        verify_receipts(entries[:1], receipts, enterprise_id="acme",
                        coordinator_key=coordinator.public_bytes())
    assert info.value.entry == 2
    with pytest.raises(LedgerVerificationError, match="ledger rewritten"):
        verify_receipts(read_ledger(tmp_path / "other.sqlite")[:2], receipts, enterprise_id="acme",
                        coordinator_key=coordinator.public_bytes())
    moved = sign_receipt(coordinator, federation="f", round_number=5, stage="upload",
                         head=receipts[0].head, message_sha256=bytes(32),
                         previous_link=GENESIS_LINK)
    with pytest.raises(LedgerVerificationError, match="charged for round 1"):
        verify_receipts(entries, [moved], enterprise_id="acme",
                        coordinator_key=coordinator.public_bytes())
    ledger.close()
    import sqlite3

    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM receipts")
    conn.close()
    assert LedgerHead.from_bytes(receipts[1].head).index == 2
