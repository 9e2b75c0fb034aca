"""The audit reads the coordinator's transcript and a participant's outbound log as written by the
federation package's own state classes."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from secfed.audit.sources import read_outbound, read_transcript
from secfed.coordinator.state import CoordinatorState
from secfed.errors import AuditError
from secfed.participant.state import ParticipantState


def test_outbound_log_round_trips_every_message(tmp_path):
    db = tmp_path / "state.sqlite"
    state = ParticipantState(db)
    sent = [
        (1, "advertise", b"keys" * 10, "signed"),
        (1, "share", b"sealed" * 30, "encrypted"),
        (1, "upload", b"\x01" * 512, "masked"),
        (1, "unmask", b"shares" * 5, "control"),
        (2, "upload", b"\x02" * 4096, "encrypted"),
    ]
    for r, stage, payload, protection in sent:
        state.sent(
            round_number=r,
            stage=stage,
            destination="coordinator",
            payload=payload,
            protection=protection,
        )
    state.close()

    log = read_outbound(db)
    assert [(m.round_number, m.stage, m.size_bytes, m.protection) for m in log.messages] == [
        (r, stage, len(payload), protection) for r, stage, payload, protection in sent
    ]
    assert [m.sha256 for m in log.messages] == [hashlib.sha256(p).hexdigest() for *_, p, _ in sent]
    assert log.by_protection == {"control": 1, "encrypted": 2, "masked": 1, "signed": 1}
    assert all(m.destination == "coordinator" and m.sent_at for m in log.messages)


def test_transcript_rounds_and_ledger_heads(tmp_path):
    db = tmp_path / "state.sqlite"
    state = CoordinatorState(db)
    ids = ("a-corp", "b-corp", "c-corp")
    state.open_round(
        round_number=1,
        mode="secagg",
        participants=ids,
        threshold=2,
        global_hash_before="00" * 32,
        spec=b"spec",
    )
    heads = {e: bytes([i]) * 97 for i, e in enumerate(ids)}
    for e in ids:
        state.record(
            round_number=1,
            stage="advertise",
            sender=e,
            payload=b"adv-" + e.encode(),
            sha256="11" * 32,
            ledger_head=None,
        )
    for e in ids[:2]:
        state.record(
            round_number=1,
            stage="upload",
            sender=e,
            payload=b"up-" + e.encode(),
            sha256="22" * 32,
            ledger_head=heads[e],
        )
    state.set_survivors(1, ids[:2])
    state.finish_round(1, global_hash_after="ab" * 32)
    state.open_round(
        round_number=2,
        mode="ckks",
        participants=ids,
        threshold=2,
        global_hash_before="ab" * 32,
        spec=b"spec2",
    )
    state.abort_round(2, "too few")
    state.close()

    t = read_transcript(db)
    assert [(r.round_number, r.mode, r.status, r.threshold) for r in t.rounds] == [
        (1, "secagg", "done", 2),
        (2, "ckks", "aborted", 2),
    ]
    assert t.rounds[0].participants == ids and t.rounds[0].survivors == ids[:2]
    assert t.rounds[1].survivors == ()
    assert t.rounds[0].global_hash_after == "ab" * 32
    assert [(u.round_number, u.stage, u.sender, u.ledger_head) for u in t.uploads] == [
        (1, "upload", e, heads[e]) for e in ids[:2]
    ]


def test_missing_table_or_column_is_named(tmp_path):
    db = tmp_path / "other.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE rounds (round INTEGER, participants TEXT)")
    conn.execute("CREATE TABLE transcript (round INTEGER)")
    conn.execute("INSERT INTO rounds VALUES (1, ?)", (json.dumps(["x"]),))
    conn.commit()
    conn.close()
    with pytest.raises(AuditError, match="'mode'"):
        read_transcript(db)
    with pytest.raises(AuditError, match="outbound"):
        read_outbound(db)


def test_not_a_database_is_refused(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AuditError, match="not a readable SQLite"):
        read_outbound(junk)
    with pytest.raises(AuditError, match="existing SQLite file"):
        read_transcript(tmp_path / "missing.sqlite")
