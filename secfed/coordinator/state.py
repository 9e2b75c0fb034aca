"""The coordinator's crash-safe state: SQLite in WAL mode.

A message is acknowledged only after its transcript row is committed, so nothing accepted is
lost when the process is killed. By default commits use ``synchronous=NORMAL``: a committed row
is in the WAL file (the OS holds it) before the ack, which survives the coordinator process
being killed at any point, without an fsync per message (an fsync costs 4-8 ms here, and a
round commits ~20 rows on its critical path). ``durable=True`` (``secfed aggregate --fsync``)
selects ``synchronous=FULL`` so a commit also survives an OS crash or power loss. Either way,
the privacy-relevant state -- each enterprise's ledger -- is fsync'd at the site; a coordinator
that loses its last rows to a power cut aborts that round cleanly after restart. The schema (documented in docs/CONTRACTS.md, "Federation
state") is read by the audit report.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from secfed.crypto.keys import IdentityKey
from secfed.privacy.receipts import (
    GENESIS_LINK,
    round_digest,
    transcript_link,
    transcript_link_message,
)

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round              INTEGER PRIMARY KEY,
    mode               TEXT NOT NULL,
    participants       TEXT NOT NULL,          -- JSON list, spec order
    threshold          INTEGER NOT NULL,
    status             TEXT NOT NULL CHECK (status IN ('open', 'done', 'aborted')),
    survivors          TEXT,                   -- JSON list, set when the protocol is done
    global_hash_before TEXT NOT NULL,
    global_hash_after  TEXT,                   -- agreed hash from signed confirmations
    spec               BLOB NOT NULL,          -- RoundSpec.to_bytes()
    opened_at          REAL NOT NULL,
    closed_at          REAL,
    abort_reason       TEXT
);
CREATE TABLE IF NOT EXISTS stages (
    round     INTEGER NOT NULL REFERENCES rounds(round),
    stage     TEXT NOT NULL,
    opened_at REAL NOT NULL,
    deadline  REAL NOT NULL,                   -- unix seconds
    closed_at REAL,
    received  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (round, stage)
);
CREATE TABLE IF NOT EXISTS transcript (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    round       INTEGER NOT NULL REFERENCES rounds(round),
    stage       TEXT NOT NULL,
    sender      TEXT NOT NULL,
    received_at REAL NOT NULL,
    bytes       INTEGER NOT NULL,              -- length of payload
    sha256      TEXT NOT NULL,                 -- hex SHA-256 of payload
    ledger_head BLOB,                          -- LedgerHead bytes (uploads)
    payload     BLOB NOT NULL,                 -- the protocol message, replayed after a crash
    UNIQUE (round, stage, sender)
);
CREATE TABLE IF NOT EXISTS probe_outcomes (  -- probed rounds (issue 17): norm checks, shares
    round   INTEGER PRIMARY KEY REFERENCES rounds(round),
    outcome TEXT NOT NULL                      -- ProbeOutcome.to_json()
);
CREATE TABLE IF NOT EXISTS aggregates (
    round   INTEGER PRIMARY KEY REFERENCES rounds(round),
    payload BLOB NOT NULL                      -- the protocol's final message (masked sum or CKKS sum)
);
CREATE TABLE IF NOT EXISTS receipts (          -- signed receipts of the ledger heads accepted
    round       INTEGER NOT NULL REFERENCES rounds(round),
    sender      TEXT NOT NULL,
    stage       TEXT NOT NULL CHECK (stage IN ('upload', 'applied')),
    head_index  INTEGER NOT NULL,
    receipt     BLOB NOT NULL,                 -- LedgerReceipt.to_bytes(), coordinator-signed
    PRIMARY KEY (round, sender, stage)
);
CREATE TABLE IF NOT EXISTS transcript_signatures (  -- one chained, signed link per closed round
    round         INTEGER PRIMARY KEY REFERENCES rounds(round),
    previous_link BLOB NOT NULL,
    link          BLOB NOT NULL,                -- SHA-256 of the signed message
    signature     BLOB NOT NULL                 -- coordinator Ed25519 over the link message
);
CREATE TABLE IF NOT EXISTS confirmations (
    round       INTEGER NOT NULL REFERENCES rounds(round),
    sender      TEXT NOT NULL,
    global_hash TEXT NOT NULL,
    signature   BLOB NOT NULL,                 -- Ed25519 over applied_signed_bytes(...)
    received_at REAL NOT NULL,
    PRIMARY KEY (round, sender)
);
CREATE TABLE IF NOT EXISTS refusals (          -- sites that declined a round by their policy
    round       INTEGER NOT NULL REFERENCES rounds(round),
    sender      TEXT NOT NULL,
    reason      TEXT NOT NULL,                 -- secfed.transport.api.REFUSAL_REASONS
    detail      TEXT NOT NULL,                 -- the site's own error line
    spec_sha256 TEXT NOT NULL,                 -- hex SHA-256 of the refused RoundSpec bytes
    signature   BLOB NOT NULL,                 -- Ed25519 over refusal_signed_bytes(...)
    received_at REAL NOT NULL,
    PRIMARY KEY (round, sender)
);
"""


@dataclass(frozen=True)
class RoundRow:
    round: int
    mode: str
    participants: tuple[str, ...]
    threshold: int
    status: str
    survivors: tuple[str, ...] | None
    global_hash_before: str
    global_hash_after: str | None
    spec: bytes
    abort_reason: str | None
    opened_at: float = 0.0
    closed_at: float | None = None


@dataclass(frozen=True)
class StageRow:
    stage: str
    opened_at: float
    deadline: float
    closed_at: float | None


@dataclass(frozen=True)
class TranscriptRow:
    seq: int
    stage: str
    sender: str
    sha256: str
    ledger_head: bytes | None
    payload: bytes


class CoordinatorState:
    """Thin, explicit SQL over the coordinator's state file (one writer: the coordinator)."""

    def __init__(self, path: Path, *, durable: bool = False):
        self.path = path
        self.durable = durable
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        # 64 KiB pages (takes effect when the file is created): a masked upload of d words is one
        # row of 4-8 d bytes, which 4 KiB pages turn into thousands of overflow pages (~5x slower).
        self.db.execute("PRAGMA page_size=65536")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several writes into one commit (one fsync instead of one per statement)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # rounds
    def open_round(self, *, round_number: int, mode: str, participants: tuple[str, ...],
                   threshold: int, global_hash_before: str, spec: bytes) -> None:
        self.db.execute(
            "INSERT INTO rounds(round, mode, participants, threshold, status, global_hash_before,"
            " spec, opened_at) VALUES (?, ?, ?, ?, 'open', ?, ?, ?)",
            (round_number, mode, json.dumps(list(participants)), threshold, global_hash_before,
             spec, time.time()),
        )

    def set_survivors(self, round_number: int, survivors: tuple[str, ...]) -> None:
        self.db.execute("UPDATE rounds SET survivors = ? WHERE round = ?",
                        (json.dumps(list(survivors)), round_number))

    def finish_round(self, round_number: int, *, global_hash_after: str | None) -> None:
        self.db.execute(
            "UPDATE rounds SET status = 'done', global_hash_after = ?, closed_at = ? WHERE round = ?",
            (global_hash_after, time.time(), round_number),
        )

    def abort_round(self, round_number: int, reason: str) -> None:
        self.db.execute(
            "UPDATE rounds SET status = 'aborted', abort_reason = ?, closed_at = ? WHERE round = ?",
            (reason, time.time(), round_number),
        )

    _ROUND_COLUMNS = (
        "SELECT round, mode, participants, threshold, status, survivors, global_hash_before,"
        " global_hash_after, spec, abort_reason, opened_at, closed_at FROM rounds"
    )

    @staticmethod
    def _round_row(r: tuple) -> RoundRow:
        return RoundRow(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4],
                        tuple(json.loads(r[5])) if r[5] else None, r[6], r[7], bytes(r[8]), r[9],
                        r[10], r[11])

    def rounds(self) -> list[RoundRow]:
        rows = self.db.execute(self._ROUND_COLUMNS + " ORDER BY round").fetchall()
        return [self._round_row(r) for r in rows]

    def bytes_received(self) -> dict[int, int]:
        """Payload bytes accepted per round (the status page's history after a restart)."""
        return {int(r): int(n) for r, n in self.db.execute(
            "SELECT round, SUM(bytes) FROM transcript GROUP BY round")}

    def round(self, round_number: int) -> RoundRow | None:
        # one row by its key: every site asks for each round's outcome (receipts, peer check),
        # and reading every round for it made each answer grow with the federation's history
        row = self.db.execute(self._ROUND_COLUMNS + " WHERE round = ?",
                              (round_number,)).fetchone()
        return self._round_row(row) if row is not None else None

    # stages
    def open_stage(self, round_number: int, stage: str, deadline: float) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO stages(round, stage, opened_at, deadline) VALUES (?, ?, ?, ?)",
            (round_number, stage, time.time(), deadline),
        )

    def extend_stage(self, round_number: int, stage: str, deadline: float) -> None:
        self.db.execute("UPDATE stages SET deadline = ? WHERE round = ? AND stage = ?",
                        (deadline, round_number, stage))

    def close_stage(self, round_number: int, stage: str, received: int) -> None:
        self.db.execute(
            "UPDATE stages SET closed_at = ?, received = ? WHERE round = ? AND stage = ?",
            (time.time(), received, round_number, stage),
        )

    def stages(self, round_number: int) -> list[StageRow]:
        rows = self.db.execute(
            "SELECT stage, opened_at, deadline, closed_at FROM stages WHERE round = ?"
            " ORDER BY opened_at, rowid", (round_number,)
        ).fetchall()
        return [StageRow(*r) for r in rows]

    # transcript
    def record(self, *, round_number: int, stage: str, sender: str, payload: bytes,
               sha256: str, ledger_head: bytes | None) -> None:
        self.db.execute(
            "INSERT INTO transcript(round, stage, sender, received_at, bytes, sha256, ledger_head,"
            " payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (round_number, stage, sender, time.time(), len(payload), sha256, ledger_head, payload),
        )

    def transcript(self, round_number: int) -> list[TranscriptRow]:
        rows = self.db.execute(
            "SELECT seq, stage, sender, sha256, ledger_head, payload FROM transcript"
            " WHERE round = ? ORDER BY seq", (round_number,)
        ).fetchall()
        return [TranscriptRow(r[0], r[1], r[2], r[3], bytes(r[4]) if r[4] else None, bytes(r[5]))
                for r in rows]

    def accepted_sha(self, round_number: int, stage: str, sender: str) -> str | None:
        row = self.db.execute(
            "SELECT sha256 FROM transcript WHERE round = ? AND stage = ? AND sender = ?",
            (round_number, stage, sender),
        ).fetchone()
        return row[0] if row else None

    # aggregates
    def store_aggregate(self, round_number: int, payload: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO aggregates(round, payload) VALUES (?, ?)",
                        (round_number, payload))

    def store_probe_outcome(self, round_number: int, outcome_json: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO probe_outcomes(round, outcome) VALUES (?, ?)",
                        (round_number, outcome_json))

    def aggregate(self, round_number: int) -> bytes | None:
        row = self.db.execute("SELECT payload FROM aggregates WHERE round = ?",
                              (round_number,)).fetchone()
        return bytes(row[0]) if row else None

    # ledger-head receipts
    def add_receipt(self, round_number: int, sender: str, stage: str, head_index: int,
                    receipt: bytes) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO receipts(round, sender, stage, head_index, receipt)"
            " VALUES (?, ?, ?, ?, ?)", (round_number, sender, stage, head_index, receipt),
        )

    def receipt(self, round_number: int, sender: str, stage: str) -> tuple[int, bytes] | None:
        row = self.db.execute(
            "SELECT head_index, receipt FROM receipts WHERE round = ? AND sender = ? AND stage = ?",
            (round_number, sender, stage),
        ).fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    def receipts(self, round_number: int) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        for sender, blob in self.db.execute(
            "SELECT sender, receipt FROM receipts WHERE round = ?"
            " ORDER BY sender, stage = 'applied'",  # the upload's receipt first
            (round_number,),
        ):
            out.setdefault(sender, []).append(bytes(blob))
        return out

    def heads(self) -> list[tuple[int, str, str, int]]:
        """Every accepted ledger head as (round, sender, stage, head index), oldest first."""
        return [(int(r), s, st, int(i)) for r, s, st, i in self.db.execute(
            "SELECT round, sender, stage, head_index FROM receipts ORDER BY round, stage")]

    def head_floor(self, sender: str, *, before_round: int) -> tuple[int, int] | None:
        """(highest ledger-head index accepted from ``sender`` before ``before_round``, its round)."""
        row = self.db.execute(
            "SELECT head_index, round FROM receipts WHERE sender = ? AND round < ?"
            " ORDER BY head_index DESC LIMIT 1", (sender, before_round),
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else None

    # signed transcript
    def add_transcript_signature(self, round_number: int, previous_link: bytes, link: bytes,
                                 signature: bytes) -> None:
        self.db.execute(
            "INSERT INTO transcript_signatures(round, previous_link, link, signature)"
            " VALUES (?, ?, ?, ?)", (round_number, previous_link, link, signature),
        )

    def latest_link(self) -> bytes:
        """The newest sealed round's link (the chain value receipts carry); genesis if none."""
        row = self.db.execute(
            "SELECT link FROM transcript_signatures ORDER BY round DESC LIMIT 1").fetchone()
        return bytes(row[0]) if row else GENESIS_LINK

    def seal(self, identity: IdentityKey, *, federation: str, before: int) -> bytes:
        """Sign every round below ``before`` that is not signed yet, in order, each link chained
        to the previous one (:mod:`secfed.privacy.receipts`); returns the newest link. Call it
        only once those rounds can no longer change, inside the caller's transaction."""
        signed = {r for r, *_ in self.transcript_signatures()}
        link = self.latest_link()
        for (number,) in self.db.execute("SELECT round FROM rounds WHERE round < ? ORDER BY round",
                                         (before,)).fetchall():
            if number in signed:
                continue
            digest = round_digest(self.db, number)
            message = transcript_link_message(federation=federation, round_number=number,
                                              previous_link=link, digest=digest)
            new = transcript_link(federation=federation, round_number=number,
                                  previous_link=link, digest=digest)
            self.add_transcript_signature(number, link, new, identity.sign(message))
            link = new
        return link

    def transcript_signatures(self) -> list[tuple[int, bytes, bytes, bytes]]:
        return [(int(r[0]), bytes(r[1]), bytes(r[2]), bytes(r[3])) for r in self.db.execute(
            "SELECT round, previous_link, link, signature FROM transcript_signatures ORDER BY round"
        )]

    # confirmations
    def confirm(self, round_number: int, sender: str, global_hash: str, signature: bytes) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO confirmations(round, sender, global_hash, signature, received_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (round_number, sender, global_hash, signature, time.time()),
        )

    # refusals
    def refuse(self, round_number: int, sender: str, *, reason: str, detail: str,
               spec_sha256: str, signature: bytes) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO refusals(round, sender, reason, detail, spec_sha256, signature,"
            " received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (round_number, sender, reason, detail, spec_sha256, signature, time.time()),
        )

    def refusals(self, round_number: int) -> dict[str, tuple[str, str]]:
        """sender -> (reason, detail) of the signed refusals accepted for a round."""
        rows = self.db.execute(
            "SELECT sender, reason, detail FROM refusals WHERE round = ?", (round_number,)
        ).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def confirmations(self, round_number: int) -> dict[str, tuple[str, bytes]]:
        rows = self.db.execute(
            "SELECT sender, global_hash, signature FROM confirmations WHERE round = ?",
            (round_number,),
        ).fetchall()
        return {r[0]: (r[1], bytes(r[2])) for r in rows}
