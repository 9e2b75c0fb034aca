"""Read-only access to the federation's records the audit cross-checks.

The coordinator's transcript and a participant's outbound log are SQLite files written by
``secfed.coordinator`` / ``secfed.participant`` (schema in CONTRACTS.md "Federation state"). The
audit sits below those packages, so it reads the tables directly, read-only, and never trusts
them: every ledger head found here is verified against the enterprise's pinned identity.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from secfed.audit.model import OutboundLog, OutboundMessage, RoundRecord
from secfed.errors import AuditError
from secfed.privacy.receipts import round_digest
from secfed.sqlitefiles import open_readonly

__all__ = ["TranscriptUpload", "TranscriptSeal", "Transcript", "read_transcript", "read_outbound"]

# The pinned schema's columns the audit reads (CONTRACTS.md "Federation state"); a file
# without one of them is not a secfed state database of this version.
_ROUNDS_COLUMNS = ("round", "mode", "status", "threshold", "participants", "survivors",
                   "global_hash_before", "global_hash_after")
_TRANSCRIPT_COLUMNS = ("round", "stage", "sender", "ledger_head", "seq")
_OUTBOUND_COLUMNS = ("round", "stage", "destination", "bytes", "protection", "sha256", "sent_at",
                     "seq")


def _open_readonly(path: Path, what: str) -> AbstractContextManager[sqlite3.Connection]:
    return open_readonly(path, what, AuditError)


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _require(conn: sqlite3.Connection, table: str, columns: tuple[str, ...], what: str) -> None:
    """The table has every pinned column the audit reads.

    Raises:
        AuditError: naming the table and the missing columns.
    """
    have = _columns(conn, table)
    missing = [c for c in columns if c not in have]
    if missing:
        raise AuditError(
            f"{what}: table {table!r} must have the pinned columns "
            f"{', '.join(map(repr, missing))} (got {have})"
        )


def _id_list(value: object) -> tuple[str, ...]:
    """participants/survivors: a JSON list of ids (NULL: none yet)."""
    if value is None:
        return ()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return tuple(str(v) for v in json.loads(str(value)))


def _when(value: object) -> str | None:
    """A timestamp as ISO 8601 UTC (unix seconds are converted; text is kept)."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), tz=UTC).isoformat(timespec="milliseconds")
    return str(value)


def _hex(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


@dataclass(frozen=True)
class TranscriptUpload:
    """One upload the coordinator accepted, with the signed ledger head it carried."""

    round_number: int
    stage: str
    sender: str
    ledger_head: bytes


@dataclass(frozen=True)
class TranscriptSeal:
    """The coordinator's signed link closing one round, and the digest recomputed from the
    rows the file holds now (None when they cannot be read)."""

    round_number: int
    previous_link: bytes
    link: bytes
    signature: bytes
    digest: bytes | None


@dataclass(frozen=True)
class Transcript:
    """What the audit uses from the coordinator's state: rounds, uploaded ledger heads and the
    signed chain over the closed rounds (``seals`` is None when the file has no such table)."""

    source: str
    rounds: tuple[RoundRecord, ...]
    uploads: tuple[TranscriptUpload, ...]
    seals: tuple[TranscriptSeal, ...] | None = None


def read_transcript(path: str | Path) -> Transcript:
    """Read the ``rounds`` and ``transcript`` tables of a coordinator state database.

    Raises:
        AuditError: the file is missing, unreadable, or lacks a required table or column.
    """
    path = Path(path)
    what = "--transcript"
    with _open_readonly(path, what) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table in ("rounds", "transcript"):
            if table not in tables:
                raise AuditError(
                    f"{what}: database must have a {table!r} table (got {sorted(tables)})"
                )
        _require(conn, "rounds", _ROUNDS_COLUMNS, what)
        rounds = tuple(
            RoundRecord(
                round_number=int(r[0]),
                mode=str(r[1]),
                status=str(r[2]),
                threshold=int(r[3]),
                participants=_id_list(r[4]),
                survivors=_id_list(r[5]),
                global_hash_before=_hex(r[6]),
                global_hash_after=_hex(r[7]),
            )
            for r in conn.execute(f"SELECT {', '.join(_ROUNDS_COLUMNS)} FROM rounds ORDER BY round")
        )
        _require(conn, "transcript", _TRANSCRIPT_COLUMNS, what)
        uploads = tuple(
            TranscriptUpload(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]))
            for r in conn.execute(
                "SELECT round, stage, sender, ledger_head FROM transcript "
                "WHERE ledger_head IS NOT NULL AND length(ledger_head) > 0 ORDER BY seq"
            )
        )
        seals = None
        if "transcript_signatures" in tables:
            found = []
            for r in conn.execute("SELECT round, previous_link, link, signature"
                                  " FROM transcript_signatures ORDER BY round"):
                try:
                    digest: bytes | None = round_digest(conn, int(r[0]))
                except sqlite3.Error:
                    digest = None
                found.append(TranscriptSeal(int(r[0]), bytes(r[1]), bytes(r[2]), bytes(r[3]),
                                            digest))
            seals = tuple(found)
    return Transcript(source=str(path), rounds=rounds, uploads=uploads, seals=seals)


def read_outbound(path: str | Path) -> OutboundLog:
    """Read a participant's ``outbound`` table: every message that left the site.

    Raises:
        AuditError: the file is missing, unreadable, or lacks a required column.
    """
    path = Path(path)
    what = "--outbound"
    with _open_readonly(path, what) as conn:
        if not _columns(conn, "outbound"):
            raise AuditError(f"{what}: database {str(path)!r} must have an 'outbound' table")
        _require(conn, "outbound", _OUTBOUND_COLUMNS, what)
        messages = tuple(
            OutboundMessage(
                round_number=int(r[0]),
                stage=str(r[1]),
                destination=str(r[2]),
                size_bytes=int(r[3]),
                protection=str(r[4]),
                sha256=_hex(r[5]) or "",
                sent_at=_when(r[6]),
            )
            for r in conn.execute(f"SELECT {', '.join(_OUTBOUND_COLUMNS[:-1])} FROM outbound "
                                  "ORDER BY seq")
        )
    counts = Counter(m.protection for m in messages)
    return OutboundLog(
        source=str(path), messages=messages, by_protection=dict(sorted(counts.items()))
    )
