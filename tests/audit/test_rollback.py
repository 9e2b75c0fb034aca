"""Rolling a ledger back offline (issue 20, item 5): a roster ledger left out fails, a transcript
edited without the coordinator's key breaks its signed chain, and a ledger rolled back together
with the transcript -- even one the coordinator re-signs -- is caught by the receipts the other
enterprises' ledgers keep."""

from __future__ import annotations

import sqlite3

from secfed.audit import CheckStatus, build_report
from secfed.coordinator.state import CoordinatorState
from secfed.privacy import DPSGDEvent, LedgerHead, compose_epsilon, read_ledger

from .tamper import _connect, rewrite, strip_receipts

VICTIM = "security-operator"  # took part in rounds 1, 2 and 3
OTHERS = ("energy-utility", "city-operations")
COORDINATOR_TABLES = ("transcript_signatures", "receipts", "confirmations", "aggregates",
                      "transcript", "stages", "rounds")


def full(run, ledgers=None):
    return build_report(
        ledgers=[run.ledgers[e] for e in (ledgers or run.ledgers)],
        transcript=run.transcript,
        federation=run.federation_toml,
    )


def failures(report, name=None):
    return [c for c in report.checks
            if c.status is CheckStatus.FAIL and (name is None or c.name == name)]


def _drop_round(transcript, r: int) -> None:
    """The coordinator's state as it was before round ``r`` (a restored older copy)."""
    conn = sqlite3.connect(transcript)
    for table in COORDINATOR_TABLES:
        conn.execute(f"DELETE FROM {table} WHERE round >= ?", (r,))
    conn.commit()
    conn.close()


def _roll_back_ledger(path, r: int) -> None:
    """The ledger as it was before round ``r`` (a restored older copy)."""
    strip_receipts(path, from_round=r)
    conn = _connect(path)
    conn.execute("DELETE FROM entries WHERE round_number >= ?", (r,))
    conn.commit()
    conn.close()


def _cheaper_rewrite(run, round_number: int) -> bytes:
    """The victim rewrites its charge for ``round_number`` to a cheaper one, re-signed and
    consistent, drops the receipts it kept, and writes its new head into the transcript in
    place of the one it uploaded (the coordinator's file edited without its key)."""
    path = run.ledgers[VICTIM]
    entries = read_ledger(path)
    index = next(e.index for e in entries if e.round_number == round_number)
    old = entries[index - 1].event
    cheaper = DPSGDEvent(noise_multiplier=old.noise_multiplier, sample_rate=old.sample_rate,
                         steps=1)
    events = [e.event for e in entries]
    events[index - 1] = cheaper
    changes = {index: {"event": cheaper}}
    for i in range(index, len(entries) + 1):
        changes.setdefault(i, {}).update(
            eps_prv=compose_epsilon(events[:i], delta=entries[0].delta, accountant="prv"),
            eps_rdp=compose_epsilon(events[:i], delta=entries[0].delta, accountant="rdp"),
        )
    new = rewrite(path, run.identities[VICTIM], changes)
    strip_receipts(path)
    conn = sqlite3.connect(run.transcript)
    for e in new:
        if e.index >= index:
            head = LedgerHead(VICTIM, e.index, e.entry_hash, e.signature).to_bytes()
            conn.execute("UPDATE transcript SET ledger_head = ? WHERE round = ? AND sender = ?"
                         " AND stage = 'upload'", (head, e.round_number, VICTIM))
    conn.commit()
    conn.close()
    return new[index - 1].entry_hash


def test_untouched_federation_passes_with_receipts_and_a_signed_transcript(federation):
    report = full(federation)
    assert report.verdict == "pass", failures(report)
    status = {(c.name, c.subject): c.status for c in report.checks}
    assert status[("transcript_signed", "coordinator")] is CheckStatus.PASS
    assert status[("ledger_supplied", "federation")] is CheckStatus.PASS
    for e in federation.ledgers:
        assert status[("ledger_receipts", e)] is CheckStatus.PASS


def test_a_roster_enterprises_missing_ledger_fails_the_audit(federation):
    report = full(federation, ledgers=OTHERS)
    missing = failures(report, "ledger_supplied")
    assert [c.subject for c in missing] == [VICTIM] and report.verdict == "fail"
    # without the federation file the transcript still names it
    alone = build_report(ledgers=[federation.ledgers[e] for e in OTHERS],
                         transcript=federation.transcript)
    assert [c.subject for c in failures(alone, "ledger_supplied")] == [VICTIM]


def test_a_ledger_and_transcript_rolled_back_together_are_caught_by_the_receipts(federation):
    """The victim restores its ledger and the coordinator's state to their copies from before
    round 3: each is consistent with the other and the coordinator's signatures over rounds 1-2
    still verify -- but the other enterprises kept signed receipts for round 3."""
    _roll_back_ledger(federation.ledgers[VICTIM], 3)
    _drop_round(federation.transcript, 3)
    victim_only = [c for c in full(federation).checks if c.subject in (VICTIM, "coordinator")]
    assert not [c for c in victim_only if c.status is CheckStatus.FAIL]
    report = full(federation)
    assert report.verdict == "fail"
    caught = failures(report)
    assert {(c.name, c.subject, c.round_number) for c in caught} == {
        ("ledger_receipts", e, 3) for e in OTHERS}
    assert all("transcript has no such round" in c.detail for c in caught)


def test_a_transcript_edited_without_the_coordinators_key_breaks_its_signature(federation):
    _cheaper_rewrite(federation, 3)
    report = full(federation)
    assert report.verdict == "fail"
    assert {(c.name, c.round_number) for c in failures(report)} == {("transcript_signed", 3)}
    assert "rewritten" in failures(report)[0].detail


def test_a_rollback_the_coordinator_re_signs_is_caught_by_later_receipts(federation):
    """A coordinator that colludes re-signs the edited round 2 (and re-chains round 3); the
    receipts the other enterprises got in round 3 pin the round-2 link it signed before."""
    _cheaper_rewrite(federation, 2)
    conn = sqlite3.connect(federation.transcript)
    conn.execute("DELETE FROM transcript_signatures WHERE round >= 2")
    conn.commit()
    conn.close()
    state = CoordinatorState(federation.transcript)
    state.seal(federation.coordinator_identity, federation="city-safety", before=4)
    state.close()
    report = full(federation)
    assert report.verdict == "fail"
    caught = failures(report)
    # city-operations dropped out of round 2 but uploaded in round 3: its receipt still pins it
    assert {(c.name, c.subject, c.round_number) for c in caught} == {
        ("ledger_receipts", e, 3) for e in OTHERS}
    assert all("re-signed" in c.detail for c in caught)
