"""An enterprise's own SQLite state: every outbound message, and the rounds it took part in.

Schema (docs/CONTRACTS.md, "Federation state")::

    outbound(seq, round, stage, destination, bytes, protection, sha256, sent_at)
        protection in {masked, encrypted, signed, control}
    rounds(round, status, mode, survivors, global_hash_after, epsilon_prv, epsilon_rdp,
           accuracy, detail, updated_at)
        status in {keys, charged, done, aborted, lost, refused, caught-up, rolled-back}
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from secfed import names

PROTECTIONS = names.PROTECTIONS

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbound (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    round       INTEGER NOT NULL,
    stage       TEXT NOT NULL,
    destination TEXT NOT NULL,
    bytes       INTEGER NOT NULL,
    protection  TEXT NOT NULL CHECK (protection IN ('masked', 'encrypted', 'signed', 'control')),
    sha256      TEXT NOT NULL,
    sent_at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round             INTEGER PRIMARY KEY,
    status            TEXT NOT NULL,
    mode              TEXT,
    survivors         TEXT,
    global_hash_after TEXT,
    epsilon_prv       REAL,
    epsilon_rdp       REAL,
    accuracy          REAL,
    detail            TEXT,
    updated_at        REAL NOT NULL
);
"""


class ParticipantState:
    """The participant's state file.

    WAL with ``synchronous=NORMAL``: a committed row survives the process being killed (the
    failure the join loop is built for); only an OS crash or power loss can drop the newest
    rows. The privacy ledger (secfed.privacy) keeps its own fsync-per-charge durability.
    """

    def __init__(self, path: Path):
        # The key set-up thread records its sends while the main thread trains: one lock
        # serialises every use of the connection.
        self._lock = threading.RLock()
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        # Under the lock: the key set-up thread may still be recording a send when the join
        # loop closes (closing a connection another thread is using crashed the process).
        with self._lock:
            self.db.close()

    def sent(self, *, round_number: int, stage: str, destination: str, payload: bytes,
             protection: str) -> None:
        if protection not in PROTECTIONS:
            raise ValueError(f"protection must be one of {PROTECTIONS} (got {protection!r})")
        row = (round_number, stage, destination, len(payload), protection,
               hashlib.sha256(payload).hexdigest(), time.time())
        with self._lock:
            self.db.execute(
                "INSERT INTO outbound(round, stage, destination, bytes, protection, sha256,"
                " sent_at) VALUES (?, ?, ?, ?, ?, ?, ?)", row,
            )

    def set_round(self, round_number: int, status: str, **fields: object) -> None:
        cols = {"mode", "survivors", "global_hash_after", "epsilon_prv", "epsilon_rdp",
                "accuracy", "detail"}
        bad = set(fields) - cols
        if bad:
            raise ValueError(f"round fields must be among {sorted(cols)} (got {sorted(bad)})")
        if "survivors" in fields and fields["survivors"] is not None:
            fields["survivors"] = json.dumps(list(fields["survivors"]))  # type: ignore[call-overload]
        with self._lock:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO rounds(round, status, updated_at) VALUES (?, ?, ?) ON CONFLICT(round)"
                " DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at",
                (round_number, status, time.time()),
            )
            for key, value in fields.items():  # keys checked against the column list above
                self.db.execute(f"UPDATE rounds SET {key} = ? WHERE round = ?",
                                (value, round_number))
            self.db.execute("COMMIT")

    def last_round(self, *statuses: str) -> int:
        """The highest round recorded (with one of ``statuses``, when given); 0 if none."""
        query, args = "SELECT MAX(round) FROM rounds", ()
        if statuses:
            query += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            args = statuses
        with self._lock:
            row = self.db.execute(query, args).fetchone()
        return int(row[0] or 0)

    def took_part(self) -> str:
        """What shows this site took part before ("" when nothing): rounds or sent messages."""
        with self._lock:
            rounds = self.db.execute("SELECT COUNT(*), MAX(round) FROM rounds").fetchone()
            sent = self.db.execute("SELECT COUNT(*) FROM outbound").fetchone()[0]
        if rounds[0]:
            return f"{rounds[0]} round(s), up to round {rounds[1]}"
        if sent:
            return f"{sent} outbound message(s)"
        return ""

    def round_status(self, round_number: int) -> str | None:
        with self._lock:
            row = self.db.execute("SELECT status FROM rounds WHERE round = ?",
                                  (round_number,)).fetchone()
        return row[0] if row else None

    def has_sent(self, round_number: int, stage: str) -> bool:
        """Whether a ``stage`` message of the round was recorded (rows are written before the
        message is sent, so False means it never left)."""
        with self._lock:
            return self.db.execute("SELECT 1 FROM outbound WHERE round = ? AND stage = ? LIMIT 1",
                                   (round_number, stage)).fetchone() is not None

    def outbound(self) -> list[tuple]:
        with self._lock:
            return self.db.execute(
                "SELECT round, stage, destination, bytes, protection, sha256 FROM outbound"
                " ORDER BY seq"
            ).fetchall()
