"""Every way of tampering with a ledger the issue names fails the audit, naming the entry."""

from __future__ import annotations

import pytest

from secfed.audit import CheckStatus, build_report
from secfed.crypto.keys import IdentityKey
from secfed.privacy import DPSGDEvent, read_ledger
from secfed.privacy.ledger import head_message

from .tamper import (
    COLUMNS,
    delete_entry,
    flip_byte,
    rewrite,
    row_bytes,
    set_column,
    strip_receipts,
)

VICTIM = "security-operator"  # took part in rounds 1, 2 and 3
MIDDLE = 2


def audit_one(run, eid=VICTIM, *, transcript=True):
    # With the transcript the audit needs every roster enterprise's ledger (a missing one
    # fails: issue 20, item 5); the others are untouched, so every failure is the victim's,
    # and the victim's comes first so its checks are the first of each name.
    others = [p for e, p in run.ledgers.items() if e != eid] if transcript else []
    ledgers = [run.ledgers[eid], *others]
    return build_report(
        ledgers=ledgers,
        transcript=run.transcript if transcript else None,
        federation=run.federation_toml,
        outbound=[(eid, run.outbound[eid])],
    )


def failures(report):
    return [c for c in report.checks if c.status is CheckStatus.FAIL]


def named(report):
    return {c.entry for c in failures(report)}


def test_untouched_copy_passes(federation):
    assert audit_one(federation).verdict == "pass"
    assert audit_one(federation, transcript=False).verdict == "pass"


def test_every_single_byte_flip_of_a_row_fails_naming_the_entry(federation):
    """Flip each byte of each column of the middle entry, one at a time, on a fresh copy."""
    path = federation.ledgers[VICTIM]
    pristine = path.read_bytes()
    original = row_bytes(path, MIDDLE)
    tried = 0
    refused = []
    for column in COLUMNS:
        for position in range(len(original[column])):
            path.write_bytes(pristine)
            if not flip_byte(path, MIDDLE, column, position):
                refused.append((column, position))
                continue
            tried += 1
            report = audit_one(federation)
            where = f"{column}[{position}]"
            assert report.verdict == "fail", where
            integrity = next(c for c in report.checks if c.name == "ledger_integrity")
            assert integrity.status is CheckStatus.FAIL, where
            # the entry is named: the tampered one, except that a changed index moves the row,
            # so the ledger's own check names where the sequence breaks; the transcript's signed
            # head for round 2 still names entry 2 then
            assert MIDDLE in named(report), (where, failures(report))
            if column != "idx":
                assert integrity.entry == MIDDLE, (where, integrity)
    # everything but index values that collide with another row's primary key was tried
    assert tried + len(refused) == sum(len(v) for v in original.values())
    assert tried > 250
    assert all(column == "idx" for column, _ in refused), refused


def test_deleting_a_middle_row_is_named(federation):
    delete_entry(federation.ledgers[VICTIM], MIDDLE)
    alone = audit_one(federation, transcript=False)
    integrity = next(c for c in alone.checks if c.name == "ledger_integrity")
    assert integrity.status is CheckStatus.FAIL
    assert integrity.entry == MIDDLE + 1 and f"must be {MIDDLE}" in integrity.detail
    report = audit_one(federation)
    assert MIDDLE in named(report)
    rounds = [c for c in failures(report) if c.name == "transcript_rounds"]
    assert [c.round_number for c in rounds] == [2]


def test_deleting_the_newest_row_is_caught_by_the_transcript(federation):
    newest = len(read_ledger(federation.ledgers[VICTIM]))
    delete_entry(federation.ledgers[VICTIM], newest)
    report = audit_one(federation)
    heads = [c for c in failures(report) if c.name == "transcript_heads"]
    assert [c.entry for c in heads] == [newest]
    assert "truncated" in heads[0].detail
    # the outbound log shows an update left in that round with no charge in the ledger
    assert any(
        c.name == "charged_before_send" and c.round_number == newest for c in failures(report)
    )


def test_an_entry_re_signed_with_a_foreign_key_is_named(federation):
    path = federation.ledgers[VICTIM]
    entry = read_ledger(path)[MIDDLE - 1]
    foreign = IdentityKey.generate()
    set_column(
        path,
        MIDDLE,
        "signature",
        foreign.sign(head_message(entry.enterprise_id, entry.index, entry.entry_hash)),
    )
    report = audit_one(federation)
    integrity = next(c for c in report.checks if c.name == "ledger_integrity")
    assert integrity.status is CheckStatus.FAIL and integrity.entry == MIDDLE
    assert "signature" in integrity.detail


def test_a_ledger_rewritten_under_a_foreign_key_fails_against_the_pinned_identity(federation):
    path = federation.ledgers[VICTIM]
    thief = IdentityKey.generate()
    rewrite(
        path,
        thief,
        {MIDDLE: {"event": DPSGDEvent(noise_multiplier=5.0, sample_rate=0.05, steps=30)}},
        set_key=True,
    )
    report = audit_one(federation)
    integrity = next(c for c in report.checks if c.name == "ledger_integrity")
    assert integrity.status is CheckStatus.FAIL and "pinned key" in integrity.detail
    assert MIDDLE in named(report)  # the transcript's genuine heads name the rewritten entry


def test_a_raw_edit_of_a_recorded_epsilon_is_named(federation):
    path = federation.ledgers[VICTIM]
    entry = read_ledger(path)[MIDDLE - 1]
    set_column(path, MIDDLE, "eps_prv", entry.eps_prv / 2)
    report = audit_one(federation, transcript=False)
    by_name = {c.name: c for c in failures(report)}
    assert by_name["ledger_integrity"].entry == MIDDLE
    assert by_name["epsilon_recomputed"].entry == MIDDLE
    assert "PRV" in by_name["epsilon_recomputed"].detail


def test_a_re_signed_understated_epsilon_is_named(federation):
    """The key holder lowers a recorded ε and re-hashes, re-chains and re-signs its ledger:
    signatures verify, but the ε no longer follows from the recorded events."""
    path = federation.ledgers[VICTIM]
    entry = read_ledger(path)[MIDDLE - 1]
    key = federation.identities[VICTIM]
    rewrite(path, key, {MIDDLE: {"eps_rdp": entry.eps_rdp * 0.5, "eps_prv": entry.eps_prv * 0.5}})
    report = audit_one(federation, transcript=False)
    fails = failures(report)
    eps = [c for c in fails if c.name == "epsilon_recomputed"]
    assert {c.entry for c in eps} == {MIDDLE}
    integrity = next(c for c in fails if c.name == "ledger_integrity")
    assert integrity.entry == MIDDLE and "recomputed" in integrity.detail


def test_a_consistent_rewrite_is_caught_only_by_the_transcript(federation):
    """A self-consistent rewrite (a cheaper mechanism, ε recomputed to match, re-signed by the
    key holder) verifies on its own; the heads the coordinator stored expose it."""
    path = federation.ledgers[VICTIM]
    key = federation.identities[VICTIM]
    from secfed.privacy import compose_epsilon

    entries = read_ledger(path)
    cheaper = DPSGDEvent(
        noise_multiplier=entries[0].event.noise_multiplier,
        sample_rate=entries[0].event.sample_rate,
        steps=1,
    )
    events = [entries[0].event, cheaper, entries[2].event]
    changes = {MIDDLE: {"event": cheaper}}
    for i in (2, 3):
        changes.setdefault(i, {}).update(
            eps_prv=compose_epsilon(events[:i], delta=entries[0].delta, accountant="prv"),
            eps_rdp=compose_epsilon(events[:i], delta=entries[0].delta, accountant="rdp"),
        )
    rewrite(path, key, changes)
    # the coordinator receipts the ledger keeps expose it (issue 20, item 5) ...
    kept = audit_one(federation, transcript=False)
    assert [c.entry for c in failures(kept) if c.name == "ledger_receipts"] == [MIDDLE]
    strip_receipts(path)  # ... unless the rewriter drops them too
    alone = audit_one(federation, transcript=False)
    assert alone.verdict == "pass"  # nothing in the file alone shows it
    report = audit_one(federation)
    heads = [c for c in failures(report) if c.name == "transcript_heads"]
    assert [c.entry for c in heads] == [2, 3]
    assert all("rewritten" in c.detail for c in heads)


def test_a_round_missing_from_the_ledger_is_flagged(federation):
    """The enterprise relabels its round-2 charge as round 4 (re-signed): the transcript's round
    2 has an upload the ledger no longer charges."""
    path = federation.ledgers[VICTIM]
    rewrite(path, federation.identities[VICTIM], {MIDDLE: {"round_number": 4}})
    report = audit_one(federation)
    fails = failures(report)
    assert any(c.name == "transcript_rounds" and c.round_number == 2 for c in fails)
    assert any(c.name == "transcript_heads" and c.entry == MIDDLE for c in fails)


@pytest.mark.parametrize("protection", ["control", "signed"])
def test_an_update_that_left_unprotected_is_flagged(federation, protection):
    from secfed.participant.state import ParticipantState

    state = ParticipantState(federation.outbound[VICTIM])
    state.sent(
        round_number=3,
        stage="upload",
        destination="coordinator",
        payload=b"\x00" * 256,
        protection=protection,
    )
    state.close()
    report = audit_one(federation)
    bad = [c for c in failures(report) if c.name == "outbound_protection"]
    assert [c.round_number for c in bad] == [3] and protection in bad[0].detail


def test_an_unreadable_entry_still_gives_a_report_naming_it(federation, tmp_path):
    import json

    import jsonschema

    from secfed.audit import load_schema, write_report

    set_column(federation.ledgers[VICTIM], MIDDLE, "event", '{"kind": "dpsgd", "v": 1')
    report = audit_one(federation)
    assert report.verdict == "fail"
    readable = next(c for c in report.checks if c.name == "ledger_readable")
    assert readable.status is CheckStatus.FAIL and readable.entry == MIDDLE
    ent = report.enterprises[0]
    # nothing is claimed about ε when the events cannot be read
    assert ent.epsilon_prv is None and ent.epsilon_rdp is None
    assert ent.outlook.remaining_epsilon is None and ent.outlook.rounds_remaining is None
    written = write_report(report, tmp_path / "out")
    jsonschema.validate(json.loads(written["json"].read_text()), load_schema())
    assert "(entry 2)" in written["html"].read_text()


def test_an_empty_ledger_spends_nothing(tmp_path):
    from secfed.privacy import Ledger

    key = IdentityKey.generate()
    path = tmp_path / "ledger.sqlite"
    Ledger.open(
        path, enterprise_id="newcomer", identity=key, budget_epsilon=3.0, delta=1e-6, create=True
    ).close()
    report = build_report(ledgers=[path])
    ent = report.enterprises[0]
    assert report.verdict == "pass"
    assert (ent.epsilon_prv, ent.epsilon_rdp, ent.rounds) == (0.0, 0.0, ())
    assert ent.outlook.remaining_epsilon == 3.0 and ent.outlook.rounds_remaining is None
    from secfed.audit import write_report

    written = write_report(report, tmp_path / "out")
    assert written["epsilon"].stat().st_size > 0 and "newcomer" in written["html"].read_text()


def test_infinite_values_in_a_tampered_ledger_still_give_a_valid_report(federation, tmp_path):
    import json
    import sqlite3

    import jsonschema

    from secfed.audit import load_schema, write_report

    path = federation.ledgers[VICTIM]
    set_column(path, MIDDLE, "eps_prv", float("inf"))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = 'inf' WHERE key = 'budget_epsilon'")
    conn.commit()
    conn.close()
    report = audit_one(federation)
    integrity = next(c for c in report.checks if c.name == "ledger_integrity")
    assert integrity.status is CheckStatus.FAIL and integrity.entry == 1  # budget differs
    eps = [c for c in failures(report) if c.name == "epsilon_recomputed"]
    assert [c.entry for c in eps] == [MIDDLE]
    written = write_report(report, tmp_path / "out")
    doc = json.loads(written["json"].read_text())
    jsonschema.validate(doc, load_schema())
    assert doc["enterprises"][0]["budget_epsilon"] is None
