"""A charge withdrawn for a round whose update never left the site (issue 22, item 5b): a signed
release entry referencing the charge entry; the ledger then composes exactly as if the round had
never been charged (never less), every release is re-verified by ``verify_ledger`` and by the
audit against the coordinator's transcript, and a wrong or tampered release fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from secfed.audit import build_report
from secfed.coordinator.state import CoordinatorState
from secfed.crypto.keys import IdentityKey
from secfed.errors import LedgerError, LedgerVerificationError
from secfed.participant.state import ParticipantState
from secfed.privacy import DistributedDPEvent, DPSGDEvent, Ledger, compose_epsilon, verify_ledger
from secfed.privacy.events import ChargeRelease
from secfed.privacy.ledger import effective_events

EVENT = DPSGDEvent(noise_multiplier=1.1, sample_rate=0.02, steps=40)
OTHER = DPSGDEvent(noise_multiplier=0.9, sample_rate=0.02, steps=40)
SKELLAM = DistributedDPEvent(l2_sensitivity=4096.0, l1_sensitivity=60000.0, variance=3.0e7,
                             shares=3)
SESSION = {r: bytes([r]) * 32 for r in range(1, 6)}


def _open(path: Path, identity: IdentityKey, *, accountant: str = "rdp") -> Ledger:
    return Ledger.open(path, enterprise_id="acme", identity=identity, delta=1e-5,
                       budget_accountant=accountant, create=True)  # type: ignore[arg-type]


def _charge(ledger: Ledger, r: int, *events) -> None:
    ledger.charge(round_number=r, session_id=SESSION[r], event=list(events) or [EVENT])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_release_leaves_exactly_the_epsilon_without_the_round(tmp_path: Path,
                                                              accountant: str) -> None:
    identity = IdentityKey.generate()
    released = _open(tmp_path / "released.sqlite", identity, accountant=accountant)
    never = _open(tmp_path / "never.sqlite", identity, accountant=accountant)
    _charge(released, 1)
    _charge(released, 2, OTHER, SKELLAM)  # a round of two entries: both withdrawn
    before = released.epsilon_spent()
    released.release(round_number=2)
    _charge(released, 3)
    _charge(never, 1)
    _charge(never, 3)
    # the budget gate and the reported ε: the same floats as a ledger that never held round 2
    assert released.epsilon_spent() == never.epsilon_spent()
    assert released.check_budget(OTHER) == never.check_budget(OTHER)
    assert before[1] > never.epsilon_spent()[1] > 0  # the release did lower ε
    entries = released.entries()
    assert [(e.round_number, type(e.event).__name__) for e in entries] == [
        (1, "DPSGDEvent"), (2, "DPSGDEvent"), (2, "DistributedDPEvent"),
        (2, "ChargeRelease"), (2, "ChargeRelease"), (3, "DPSGDEvent")]
    assert [e.event.entry for e in entries[3:5]] == [2, 3]  # each names its charge and hash
    assert entries[3].event.entry_hash == entries[1].entry_hash.hex()
    assert effective_events(entries) == [EVENT, EVENT]
    report = verify_ledger(tmp_path / "released.sqlite", public_key=identity.public_bytes())
    assert report.eps_rdp == never.epsilon_spent()[1]
    assert report.rounds == (1, 3)  # a released round is not spent
    # nothing left to release: refused, nothing written
    with pytest.raises(LedgerError, match="not yet released"):
        released.release(round_number=2)
    with pytest.raises(LedgerError, match="not yet released"):
        released.release(round_number=4)
    assert len(released.entries()) == 6


def test_releasing_the_only_charge_reads_as_an_empty_ledger(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "l.sqlite", IdentityKey.generate())
    _charge(ledger, 1)
    ledger.release(round_number=1)
    assert ledger.epsilon_spent() == (0.0, 0.0)
    fresh = _open(tmp_path / "fresh.sqlite", IdentityKey.generate())
    assert ledger.check_budget(EVENT) == fresh.check_budget(EVENT)


def _forge(ledger: Ledger, r: int, event: ChargeRelease) -> None:
    """Append a release entry signed with the ledger's own identity but breaking a rule (the
    entry is well formed: only the release check can catch it)."""
    conn = ledger._conn
    conn.execute("BEGIN IMMEDIATE")
    events = effective_events(ledger.entries())
    from secfed.privacy.ledger import _rdp_of

    ledger._insert(conn, ledger._last, r, SESSION[r], event, events, _rdp_of(events))
    conn.execute("COMMIT")


@pytest.mark.parametrize(("bad", "why"), [
    (lambda e: ChargeRelease(entry=2, entry_hash=e[0].entry_hash.hex()), "hash that is not"),
    (lambda e: ChargeRelease(entry=1, entry_hash=e[0].entry_hash.hex()), "round 1"),
    (lambda e: ChargeRelease(entry=9, entry_hash="00" * 32), "not an earlier entry"),
    (lambda e: ChargeRelease(entry=3, entry_hash=e[2].entry_hash.hex()), "itself a release"),
])
def test_a_tampered_release_fails_verification_naming_the_entry(tmp_path: Path, bad,
                                                                 why: str) -> None:
    identity = IdentityKey.generate()
    path = tmp_path / "l.sqlite"
    ledger = _open(path, identity)
    _charge(ledger, 1)
    _charge(ledger, 2)
    ledger.release(round_number=2)  # entry 3, valid
    assert len(verify_ledger(path, public_key=identity.public_bytes()).entries) == 3
    _forge(ledger, 2, bad(ledger.entries()))
    with pytest.raises(LedgerVerificationError, match=why) as err:
        verify_ledger(path, public_key=identity.public_bytes())
    assert err.value.entry == 4


def test_releasing_a_charge_twice_fails_verification(tmp_path: Path) -> None:
    identity = IdentityKey.generate()
    path = tmp_path / "l.sqlite"
    ledger = _open(path, identity)
    _charge(ledger, 1)
    _charge(ledger, 2)
    ledger.release(round_number=2)
    _forge(ledger, 2, ChargeRelease(entry=2, entry_hash=ledger.entries()[1].entry_hash.hex()))
    with pytest.raises(LedgerVerificationError, match="second time"):
        verify_ledger(path, public_key=identity.public_bytes())


# ---------------------------------------------------------------- the audit, against the transcript


def _transcript(path: Path, *, uploads: dict[int, tuple[str, ...]]) -> Path:
    """A coordinator state with rounds 1..3; ``uploads[r]`` lists who uploaded in round r
    (round 2 aborted at its advertise stage unless someone uploaded)."""
    state = CoordinatorState(path)
    for r in (1, 2, 3):
        state.open_round(round_number=r, mode="secagg", participants=("acme", "beta"),
                         threshold=2, global_hash_before="00" * 32, spec=b"spec")
        for e in uploads.get(r, ()):
            state.record(round_number=r, stage="upload", sender=e, payload=b"u" + e.encode(),
                         sha256="22" * 32, ledger_head=b"h" * 97)
        if r == 2 and not uploads.get(r):
            state.abort_round(r, "stage advertise: 1 of 2 participants advertised keys")
        else:
            state.finish_round(r, global_hash_after="ab" * 32)
    state.close()
    return path


def _checks(report, name: str) -> list:
    return [c for c in report.checks if c.name == name and c.subject == "acme"]


def test_audit_verifies_a_release_against_the_transcript(tmp_path: Path) -> None:
    identity = IdentityKey.generate()
    path = tmp_path / "ledger.sqlite"
    ledger = _open(path, identity)
    for r in (1, 2, 3):
        _charge(ledger, r)
    ledger.release(round_number=2)
    never = _open(tmp_path / "never.sqlite", IdentityKey.generate())
    _charge(never, 1)
    _charge(never, 3)
    ledger.close()
    honest = _transcript(tmp_path / "honest.sqlite", uploads={1: ("acme",), 3: ("acme",)})
    report = build_report(ledgers=[path], transcript=honest)
    (check,) = _checks(report, "ledger_releases")
    assert check.status.value == "pass" and "rounds [2]" in check.detail
    (ent,) = report.enterprises
    assert ent.epsilon_rdp == pytest.approx(never.epsilon_spent()[1], rel=1e-12)
    assert ent.epsilon_rdp == pytest.approx(
        compose_epsilon([EVENT, EVENT], delta=1e-5, accountant="rdp"), rel=1e-12)
    assert all(c.status.value != "fail" for c in _checks(report, "epsilon_recomputed"))
    # the coordinator did take acme's upload in round 2: the release was wrong -> FAIL
    wrong = _transcript(tmp_path / "wrong.sqlite",
                        uploads={1: ("acme",), 2: ("acme", "beta"), 3: ("acme",)})
    (bad,) = _checks(build_report(ledgers=[path], transcript=wrong), "ledger_releases")
    assert bad.status.value == "fail" and "under-reports" in bad.detail
    assert (bad.entry, bad.round_number) == (4, 2)
    # the site's own outbound log shows the update sent in round 2: also a wrong release
    outbound = tmp_path / "state.sqlite"
    state = ParticipantState(outbound)
    state.sent(round_number=2, stage="upload", destination="coordinator", payload=b"x",
               protection="masked")
    state.close()
    (sent,) = _checks(build_report(ledgers=[path], transcript=honest,
                                   outbound=[("acme", outbound)]), "ledger_releases")
    assert sent.status.value == "fail" and "outbound log" in sent.detail
    # without the transcript the release cannot be verified: skipped, never passed
    (skipped,) = _checks(build_report(ledgers=[path]), "ledger_releases")
    assert skipped.status.value == "skipped"


def test_audit_fails_a_tampered_release(tmp_path: Path) -> None:
    identity = IdentityKey.generate()
    path = tmp_path / "ledger.sqlite"
    ledger = _open(path, identity)
    for r in (1, 2):
        _charge(ledger, r)
    # a release of round 2's charge entry whose recorded hash is round 1's
    _forge(ledger, 2, ChargeRelease(entry=2, entry_hash=ledger.entries()[0].entry_hash.hex()))
    ledger.close()
    honest = _transcript(tmp_path / "t.sqlite", uploads={1: ("acme",)})
    report = build_report(ledgers=[path], transcript=honest)
    (integrity,) = _checks(report, "ledger_integrity")
    assert integrity.status.value == "fail" and integrity.entry == 3
    assert "hash that is not" in integrity.detail
