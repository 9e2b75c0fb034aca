"""Ways an attacker with write access to a ledger file can change it (test-side only)."""

from __future__ import annotations

import dataclasses
import sqlite3
import struct
from pathlib import Path

from secfed.crypto.keys import IdentityKey
from secfed.privacy import LedgerEntry, read_ledger
from secfed.privacy.ledger import GENESIS_HASH, entry_hash, head_message

COLUMNS = (
    "idx",
    "round_number",
    "session_id",
    "event",
    "eps_prv",
    "eps_rdp",
    "delta",
    "budget",
    "timestamp",
    "prev_hash",
    "entry_hash",
    "signature",
)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")  # test copies: no fsync needed
    for trigger in ("entries_no_update", "entries_no_delete", "meta_no_update", "meta_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    return conn


def row_bytes(path: Path, index: int) -> dict[str, bytes]:
    """Each column of entry ``index`` as the bytes an attacker would flip."""
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(
            f"SELECT {', '.join(COLUMNS)} FROM entries WHERE idx = ?", (index,)
        ).fetchone()
    finally:
        conn.close()
    out: dict[str, bytes] = {}
    for name, value in zip(COLUMNS, row):
        if isinstance(value, int):
            out[name] = struct.pack(">q", value)
        elif isinstance(value, float):
            out[name] = struct.pack(">d", value)
        elif isinstance(value, str):
            out[name] = value.encode("utf-8")
        else:
            out[name] = bytes(value)
    return out


def flip_byte(path: Path, index: int, column: str, position: int) -> bool:
    """Flip the low bit of one byte of one column of entry ``index``; False if SQLite refuses
    the result (a duplicate index, NaN in a NOT NULL column, invalid UTF-8)."""
    original = row_bytes(path, index)[column]
    raw = bytearray(original)
    raw[position] ^= 0x01
    kind = {
        "idx": "int",
        "round_number": "int",
        "event": "text",
        "eps_prv": "real",
        "eps_rdp": "real",
        "delta": "real",
        "budget": "real",
        "timestamp": "real",
    }.get(column, "blob")
    value: object
    if kind == "int":
        value = struct.unpack(">q", bytes(raw))[0]
    elif kind == "real":
        value = struct.unpack(">d", bytes(raw))[0]
        if value != value:  # NaN is stored as NULL
            return False
    elif kind == "text":
        try:
            value = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return False
    else:
        value = bytes(raw)
    assert bytes(raw) != original
    conn = _connect(path)
    try:
        conn.execute(f"UPDATE entries SET {column} = ? WHERE idx = ?", (value, index))
        conn.commit()
    except sqlite3.IntegrityError:
        return False
    finally:
        conn.close()
    return True


def strip_receipts(path: Path, *, from_round: int = 0) -> None:
    """Drop the coordinator receipts the ledger keeps (from round ``from_round`` on)."""
    conn = _connect(path)
    try:
        conn.execute("DROP TRIGGER IF EXISTS receipts_no_delete")
        conn.execute("DELETE FROM receipts WHERE round_number >= ?", (from_round,))
        conn.commit()
    finally:
        conn.close()


def delete_entry(path: Path, index: int) -> None:
    conn = _connect(path)
    try:
        conn.execute("DELETE FROM entries WHERE idx = ?", (index,))
        conn.commit()
    finally:
        conn.close()


def set_column(path: Path, index: int, column: str, value: object) -> None:
    conn = _connect(path)
    try:
        conn.execute(f"UPDATE entries SET {column} = ? WHERE idx = ?", (value, index))
        conn.commit()
    finally:
        conn.close()


def rewrite(
    path: Path, signer: IdentityKey, changes: dict[int, dict[str, object]], *, set_key: bool = False
) -> list[LedgerEntry]:
    """Rewrite entries consistently: apply ``changes`` (entry index -> field values of
    :class:`LedgerEntry`), then recompute every hash from the first change on, re-chain and
    re-sign with ``signer`` -- what the key holder (or a thief with ``set_key``) could do."""
    entries = read_ledger(path)
    first = min(changes) if changes else 1
    prev = GENESIS_HASH if first == 1 else entries[first - 2].entry_hash
    out: list[LedgerEntry] = []
    conn = _connect(path)
    try:
        if set_key:
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'public_key'", (signer.public_bytes().hex(),)
            )
        for e in entries:
            if e.index < first:
                out.append(e)
                continue
            e = dataclasses.replace(e, **changes.get(e.index, {}), prev_hash=prev)
            if "event" in changes.get(e.index, {}):
                e = dataclasses.replace(e, event_json=e.event.to_json())
            digest = entry_hash(e.canonical())
            sig = signer.sign(head_message(e.enterprise_id, e.index, digest))
            e = dataclasses.replace(e, entry_hash=digest, signature=sig)
            conn.execute(
                "UPDATE entries SET round_number = ?, event = ?, eps_prv = ?, eps_rdp = ?,"
                " prev_hash = ?, entry_hash = ?, signature = ? WHERE idx = ?",
                (
                    e.round_number,
                    e.event_json,
                    e.eps_prv,
                    e.eps_rdp,
                    e.prev_hash,
                    e.entry_hash,
                    e.signature,
                    e.index,
                ),
            )
            prev = digest
            out.append(e)
        conn.commit()
    finally:
        conn.close()
    return out
