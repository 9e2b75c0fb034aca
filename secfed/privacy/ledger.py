"""The per-enterprise privacy ledger: append-only, hash-chained, Ed25519-signed, in SQLite.

One SQLite file (WAL, ``synchronous=FULL``) per enterprise. Each entry holds the round, the
session id, the mechanism event (canonical JSON), ε after the entry (PRV and RDP), δ, the
budget, a timestamp, the previous entry's hash, its own hash over a canonical encoding and an
Ed25519 signature by the enterprise identity over a domain-separated encoding of
``(enterprise_id, index, entry_hash)`` -- the same bytes a :class:`LedgerHead` carries.

Append-only is enforced twice: SQL triggers abort any UPDATE or DELETE, and the hash chain plus
signatures make any edit of the file detectable by :func:`verify_ledger`, which also recomputes
every ε from the recorded events. A charge is committed and fsync'd before :meth:`Ledger.charge`
returns, so a crash between charge and send over-reports, never under-reports.

A charge for a round whose update never left the site (the round aborted before its upload) can
be withdrawn by a later signed entry, a :class:`~secfed.privacy.events.ChargeRelease` naming the
charge entry and its hash (:meth:`Ledger.release`). The ledger composes every charge not
withdrawn (:func:`effective_events`), so ε after a release equals ε without that round; nothing
is deleted, and ``secfed audit`` re-verifies every release against the coordinator's transcript.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from secfed import names
from secfed.crypto.keys import LABEL_LEDGER, IdentityKey, constant_time_equal, verify_signature
from secfed.errors import (
    BudgetExceeded,
    ConfigError,
    InvalidSignature,
    LedgerError,
    LedgerVerificationError,
    MessageFormatError,
)
from secfed.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_BUDGET_EPSILON,
    MAX_DEFAULT_DELTA,
    Accountant,
    check_delta,
    compose_epsilon,
    event_rdp,
)
from secfed.privacy.analysis import RDP_ORDERS, rdp_to_epsilon
from secfed.privacy.events import (
    ChargeRelease,
    LedgerEvent,
    MechanismEvent,
    canonical_json,
    event_from_json,
)
from secfed.privacy.receipts import LedgerReceipt
from secfed.sqlitefiles import open_readonly

_T = TypeVar("_T")

__all__ = [
    "LEDGER_FORMAT",
    "GENESIS_HASH",
    "LedgerEntry",
    "LedgerHead",
    "LedgerReport",
    "Ledger",
    "read_ledger",
    "read_ledger_meta",
    "read_receipts",
    "verify_ledger",
    "verify_receipts",
    "entry_hash",
    "head_message",
    "effective_events",
    "released_entries",
]

LEDGER_FORMAT = 1  # schema + canonical-encoding version, stored in the meta table
GENESIS_HASH = bytes(32)  # prev_hash of entry 1
HEAD_MAGIC = b"SFLH"
HEAD_VERSION = 1
_ENTRY_DOMAIN = names.LABEL_LEDGER_ENTRY  # SHA-256 domain of an entry's canonical encoding
_HEAD_DOMAIN = LABEL_LEDGER + b"/head\x00"  # Ed25519 domain of (enterprise, index, entry hash)
# A recorded ε must equal the recomputed one to this relative tolerance: both come from the same
# deterministic accountant over the same events.
EPSILON_RTOL = 1e-6

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    round_number INTEGER NOT NULL,
    session_id BLOB NOT NULL,
    event TEXT NOT NULL,
    eps_prv REAL NOT NULL,
    eps_rdp REAL NOT NULL,
    delta REAL NOT NULL,
    budget REAL NOT NULL,
    timestamp REAL NOT NULL,
    prev_hash BLOB NOT NULL,
    entry_hash BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: DELETE refused'); END;
CREATE TRIGGER IF NOT EXISTS meta_no_update BEFORE UPDATE ON meta
BEGIN SELECT RAISE(ABORT, 'privacy ledger meta is write-once: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS meta_no_delete BEFORE DELETE ON meta
BEGIN SELECT RAISE(ABORT, 'privacy ledger meta is write-once: DELETE refused'); END;
CREATE TABLE IF NOT EXISTS receipts (
    seq INTEGER PRIMARY KEY,
    round_number INTEGER NOT NULL,
    stage TEXT NOT NULL,
    head_index INTEGER NOT NULL,
    receipt BLOB NOT NULL UNIQUE
);
CREATE TRIGGER IF NOT EXISTS receipts_no_update BEFORE UPDATE ON receipts
BEGIN SELECT RAISE(ABORT, 'privacy ledger receipts are append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS receipts_no_delete BEFORE DELETE ON receipts
BEGIN SELECT RAISE(ABORT, 'privacy ledger receipts are append-only: DELETE refused'); END;
"""


def _encode_id(enterprise_id: str) -> bytes:
    raw = enterprise_id.encode("utf-8")
    if not 1 <= len(raw) <= 255:
        raise ConfigError(f"enterprise_id must be 1..255 UTF-8 bytes (got {len(raw)})")
    return raw


def head_message(enterprise_id: str, index: int, entry_hash_: bytes) -> bytes:
    """The domain-separated bytes an entry's (and its head's) signature covers."""
    raw = _encode_id(enterprise_id)
    return _HEAD_DOMAIN + struct.pack(">BB", HEAD_VERSION, len(raw)) + raw + struct.pack(">Q", index) + entry_hash_


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One charge, or the release of an earlier charge (``event`` a
    :class:`~secfed.privacy.events.ChargeRelease`). ``index`` counts from 1; ε are totals after
    this entry over the charges not released."""

    enterprise_id: str
    index: int
    round_number: int
    session_id: bytes
    event: LedgerEvent
    event_json: str
    eps_prv: float
    eps_rdp: float
    delta: float
    budget: float
    timestamp: float
    prev_hash: bytes
    entry_hash: bytes
    signature: bytes

    def canonical(self) -> bytes:
        return _canonical(
            enterprise_id=self.enterprise_id, index=self.index, round_number=self.round_number,
            session_id=self.session_id, event_json=self.event_json, eps_prv=self.eps_prv,
            eps_rdp=self.eps_rdp, delta=self.delta, budget=self.budget,
            timestamp=self.timestamp, prev_hash=self.prev_hash,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (bytes as hex, the event as its JSON object)."""
        return {
            "index": self.index, "round": self.round_number, "session_id": self.session_id.hex(),
            "event": json.loads(self.event_json), "eps_prv": self.eps_prv, "eps_rdp": self.eps_rdp,
            "delta": self.delta, "budget": self.budget, "timestamp": self.timestamp,
            "prev_hash": self.prev_hash.hex(), "entry_hash": self.entry_hash.hex(),
            "signature": self.signature.hex(),
        }


def _canonical(*, enterprise_id: str, index: int, round_number: int, session_id: bytes,
               event_json: str, eps_prv: float, eps_rdp: float, delta: float, budget: float,
               timestamp: float, prev_hash: bytes) -> bytes:
    return canonical_json({
        "v": LEDGER_FORMAT, "enterprise_id": enterprise_id, "index": index,
        "round": round_number, "session_id": session_id.hex(), "event": event_json,
        "eps_prv": eps_prv, "eps_rdp": eps_rdp, "delta": delta, "budget": budget,
        "timestamp": timestamp, "prev_hash": prev_hash.hex(),
    }).encode("utf-8")


def entry_hash(canonical_entry: bytes) -> bytes:
    """SHA-256 over the domain tag and an entry's canonical encoding."""
    return hashlib.sha256(_ENTRY_DOMAIN + canonical_entry).digest()


def released_entries(entries: Sequence[LedgerEntry]) -> set[int]:
    """Indices of the charge entries a later :class:`ChargeRelease` entry withdrew."""
    return {e.event.entry for e in entries if isinstance(e.event, ChargeRelease)}


def effective_events(entries: Sequence[LedgerEntry]) -> list[MechanismEvent]:
    """The mechanism events the ledger composes: every charge, in order, except those a later
    entry released (release entries compose nothing)."""
    released = released_entries(entries)
    return [e.event for e in entries
            if not isinstance(e.event, ChargeRelease) and e.index not in released]


def _rdp_of(events: Sequence[MechanismEvent]) -> np.ndarray:
    """The composed RDP curve, summed in order (the same floats as a ledger that never held
    the released charges)."""
    rdp = np.zeros(len(RDP_ORDERS))
    for event in events:
        rdp = rdp + event_rdp(event)
    return rdp


def _check_release(entry: LedgerEntry, earlier: Sequence[LedgerEntry], released: set[int]) -> str | None:
    """Why ``entry`` (a release) is not a valid release of an earlier charge (None: it is)."""
    assert isinstance(entry.event, ChargeRelease)
    target = entry.event.entry
    if not 1 <= target < entry.index or target > len(earlier):
        return f"releases entry {target}, which is not an earlier entry"
    charge = earlier[target - 1]
    if not constant_time_equal(charge.entry_hash.hex().encode(), entry.event.entry_hash.encode()):
        return f"releases entry {target} by a hash that is not that entry's"
    if isinstance(charge.event, ChargeRelease):
        return f"releases entry {target}, which is itself a release"
    if target in released:
        return f"releases entry {target} a second time"
    if charge.round_number != entry.round_number or charge.session_id != entry.session_id:
        return (f"releases entry {target} (round {charge.round_number}) but names round "
                f"{entry.round_number} or another session")
    return None


@dataclass(frozen=True, slots=True)
class LedgerHead:
    """The signed newest entry of a ledger, sent with each upload (index 0: empty ledger).

    Wire form (big-endian): ``b"SFLH" | version u8 | id_len u8 | enterprise_id | index u64 |
    entry_hash[32] | signature[64]``.
    """

    enterprise_id: str
    index: int
    entry_hash: bytes
    signature: bytes

    def message(self) -> bytes:
        return head_message(self.enterprise_id, self.index, self.entry_hash)

    def to_bytes(self) -> bytes:
        raw = _encode_id(self.enterprise_id)
        return (HEAD_MAGIC + struct.pack(">BB", HEAD_VERSION, len(raw)) + raw
                + struct.pack(">Q", self.index) + self.entry_hash + self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> LedgerHead:
        """Parse the wire form strictly.

        Raises:
            MessageFormatError: wrong magic, version, lengths or UTF-8.
        """
        data = bytes(data)
        if len(data) < 6 or data[:4] != HEAD_MAGIC:
            raise MessageFormatError("ledger head must start with magic b'SFLH'")
        version, id_len = data[4], data[5]
        if version != HEAD_VERSION:
            raise MessageFormatError(f"ledger head version must be {HEAD_VERSION} (got {version})")
        expected = 6 + id_len + 8 + 32 + 64
        if id_len == 0 or len(data) != expected:
            raise MessageFormatError(f"ledger head must be {expected} bytes for id length {id_len} (got {len(data)})")
        try:
            enterprise_id = data[6:6 + id_len].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageFormatError("ledger head enterprise_id must be UTF-8") from exc
        pos = 6 + id_len
        (index,) = struct.unpack(">Q", data[pos:pos + 8])
        return cls(enterprise_id, index, data[pos + 8:pos + 40], data[pos + 40:pos + 104])

    def verify(self, public_key: bytes) -> None:
        """Raises :class:`InvalidSignature` unless signed by ``public_key``."""
        verify_signature(public_key, self.signature, self.message())


@dataclass(frozen=True, slots=True)
class LedgerReport:
    """What :func:`verify_ledger` established (it raises instead of returning a failure)."""

    enterprise_id: str
    public_key: bytes
    key_pinned: bool  # False: the key was read from the ledger file itself
    budget: float
    delta: float
    budget_accountant: str
    entries: tuple[LedgerEntry, ...]
    eps_prv: float
    eps_rdp: float
    head: LedgerHead | None

    @property
    def spent(self) -> float:
        """ε spent by the budget accountant."""
        return self.eps_rdp if self.budget_accountant == "rdp" else self.eps_prv

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget - self.spent)

    @property
    def rounds(self) -> tuple[int, ...]:
        """The round of every charge entry not released (a released round is not spent)."""
        released = released_entries(self.entries)
        return tuple(e.round_number for e in self.entries
                     if not isinstance(e.event, ChargeRelease) and e.index not in released)

    def to_dict(self) -> dict[str, Any]:
        return {
            "enterprise_id": self.enterprise_id, "public_key": self.public_key.hex(),
            "key_pinned": self.key_pinned, "budget": self.budget, "delta": self.delta,
            "budget_accountant": self.budget_accountant, "spent_prv": self.eps_prv,
            "spent_rdp": self.eps_rdp, "remaining": self.remaining,
            "entries": len(self.entries), "rounds": list(self.rounds),
            "head": None if self.head is None else self.head.to_bytes().hex(),
        }


def _connect(path: Path) -> sqlite3.Connection:
    # One thread at a time, not necessarily the opener: the join loop charges from a worker
    # thread beside training and joins it before it touches the ledger again.
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a COMMIT is on disk before charge() returns
    return conn


def _read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"ledger {path} is not a readable secfed ledger ({exc})") from exc
    meta = dict(rows)
    if meta.get("format") != str(LEDGER_FORMAT):
        raise LedgerError(f"ledger {path} format must be {LEDGER_FORMAT} (got {meta.get('format')!r})")
    return meta


def _row_to_entry(enterprise_id: str, row: Sequence[Any]) -> LedgerEntry:
    (idx, round_number, session_id, event_json, eps_prv, eps_rdp, delta, budget, timestamp,
     prev_hash, entry_hash_, signature) = row
    event = event_from_json(event_json)
    return LedgerEntry(enterprise_id, int(idx), int(round_number), bytes(session_id), event,
                       str(event_json), float(eps_prv), float(eps_rdp), float(delta), float(budget),
                       float(timestamp), bytes(prev_hash), bytes(entry_hash_), bytes(signature))


_SELECT = ("SELECT idx, round_number, session_id, event, eps_prv, eps_rdp, delta, budget, timestamp,"
           " prev_hash, entry_hash, signature FROM entries ORDER BY idx")


class Ledger(contextlib.AbstractContextManager["Ledger"]):
    """An enterprise's open privacy ledger. Use :meth:`open`; one writer at a time."""

    def __init__(self, path: Path, conn: sqlite3.Connection, meta: dict[str, str],
                 identity: IdentityKey | None, clock: Callable[[], float]) -> None:
        self.path = path
        self._conn = conn
        self.enterprise_id = meta["enterprise_id"]
        self.public_key = bytes.fromhex(meta["public_key"])
        self.budget_epsilon = float(meta["budget_epsilon"])
        self.delta = float(meta["delta"])
        self.budget_accountant: Accountant = meta["budget_accountant"]  # type: ignore[assignment]
        self._identity = identity
        self._clock = clock
        self._events: list[MechanismEvent] = []  # the charges not released, in order
        self._rdp = np.zeros(len(RDP_ORDERS))
        self._charges: dict[int, LedgerEntry] = {}  # index -> charge entry
        self._released: set[int] = set()
        self._last: LedgerEntry | None = None
        self._load()

    @classmethod
    def open(
        cls, path: str | Path, *, enterprise_id: str, identity: IdentityKey | None,
        budget_epsilon: float = DEFAULT_BUDGET_EPSILON, delta: float = MAX_DEFAULT_DELTA,
        budget_accountant: Accountant = "rdp", clock: Callable[[], float] = time.time,
        create: bool = False,
    ) -> Ledger:
        """Open the ledger at ``path``; with ``create=True`` start a new one if there is none.

        A ledger is never started implicitly: a missing (or emptied) file with ``create`` False
        is refused, because a fresh ledger resets the budget it records. Callers pass
        ``create=True`` only on an explicit request (``secfed join --new-ledger`` for a
        brand-new site). On an existing ledger, ``enterprise_id``, the identity's public key, ``budget_epsilon``,
        ``delta`` and ``budget_accountant`` must equal what it was created with: a budget is
        fixed for the ledger's life. ``identity`` None opens it read-only (no charges).

        Raises:
            ConfigError: bad parameters.
            LedgerError: the file is missing (without ``create``), or not a ledger of this
                enterprise/key/budget.
        """
        path = Path(path)
        _encode_id(enterprise_id)
        if not isinstance(budget_epsilon, int | float) or not math.isfinite(budget_epsilon) or budget_epsilon <= 0:
            raise ConfigError(f"budget_epsilon must be a finite number > 0 (got {budget_epsilon!r})")
        check_delta(delta)
        if budget_accountant not in ACCOUNTANTS:
            raise ConfigError(f"budget_accountant must be one of {ACCOUNTANTS} (got {budget_accountant!r})")
        if identity is None and not path.is_file():
            raise LedgerError(f"ledger {path} does not exist and no identity was given to create it")
        if not create and not path.is_file():
            raise LedgerError(
                f"ledger {path} does not exist: refusing to start a fresh ledger implicitly (it "
                "would reset the privacy budget); start one explicitly (create=True, "
                "`secfed join --new-ledger`) only for a site that never took part"
            )
        conn = _connect(path)
        try:
            if identity is not None:
                # Idempotent: a creation interrupted by a crash is simply redone.
                conn.executescript("BEGIN IMMEDIATE;\n" + _SCHEMA)
                if conn.execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 0:
                    if not create:  # an emptied file is a missing ledger, not a new one
                        raise LedgerError(
                            f"ledger {path} holds no ledger: refusing to start a fresh ledger "
                            "implicitly (it would reset the privacy budget)"
                        )
                    meta_rows = {
                        "format": str(LEDGER_FORMAT), "enterprise_id": enterprise_id,
                        "public_key": identity.public_bytes().hex(),
                        "budget_epsilon": repr(float(budget_epsilon)), "delta": repr(float(delta)),
                        "budget_accountant": budget_accountant, "created_at": repr(float(clock())),
                    }
                    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", sorted(meta_rows.items()))
                conn.execute("COMMIT")
            meta = _read_meta(conn, path)
            expected = {"enterprise_id": enterprise_id, "budget_epsilon": repr(float(budget_epsilon)),
                        "delta": repr(float(delta)), "budget_accountant": budget_accountant}
            for key, value in expected.items():
                if meta.get(key) != value:
                    raise LedgerError(f"ledger {path} was created with {key} = {meta.get(key)!r} (got {value!r})")
            if identity is not None and meta["public_key"] != identity.public_bytes().hex():
                raise LedgerError(f"ledger {path} belongs to another identity key (got {identity.public_bytes().hex()[:16]}...)")
            return cls(path, conn, meta, identity, clock)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise

    def _load(self) -> None:
        entries = [_row_to_entry(self.enterprise_id, row) for row in self._conn.execute(_SELECT)]
        self._events = effective_events(entries)
        self._rdp = _rdp_of(self._events)
        self._charges = {e.index: e for e in entries if not isinstance(e.event, ChargeRelease)}
        self._released = released_entries(entries)
        self._last = entries[-1] if entries else None

    def close(self) -> None:
        self._conn.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------
    def entries(self) -> list[LedgerEntry]:
        """All entries, oldest first."""
        return [_row_to_entry(self.enterprise_id, row) for row in self._conn.execute(_SELECT)]

    def epsilon_spent(self) -> tuple[float, float]:
        """``(eps_prv, eps_rdp)`` after the newest entry (0, 0 when empty)."""
        if self._last is None:
            return 0.0, 0.0
        return self._last.eps_prv, self._last.eps_rdp

    def _budget_epsilon_after(self, events: Sequence[MechanismEvent]) -> float:
        if self.budget_accountant == "rdp":
            return rdp_to_epsilon(self._rdp + sum(event_rdp(e) for e in events), delta=self.delta)
        return compose_epsilon([*self._events, *events], delta=self.delta, accountant="prv")

    def check_budget(self, events: MechanismEvent | Sequence[MechanismEvent]) -> float:
        """Raise unless charging ``events`` (one event, or a round's several, in order) keeps ε
        (budget accountant) within the budget; every prefix is checked, so the error names the
        first release that does not fit.

        Returns the ε the charge would reach. Call it before training.

        Raises:
            BudgetExceeded: names spent, needed and budget (attributes ``spent``, ``needed``,
                ``budget``, ``after``).
        """
        batch = _as_events(events)
        spent = self.epsilon_spent()[1 if self.budget_accountant == "rdp" else 0]
        after = spent
        for n in range(1, len(batch) + 1):
            after = self._budget_epsilon_after(batch[:n])
            if not after <= self.budget_epsilon:
                what = "this charge" if n == 1 else f"this round ({_kinds(batch[:n])})"
                exc = BudgetExceeded(
                    f"privacy budget exceeded for {self.enterprise_id}: spent epsilon {spent:.4f}, "
                    f"{what} needs {after - spent:.4f} more (total {after:.4f}), budget "
                    f"{self.budget_epsilon:.4f} ({self.budget_accountant}, delta = {self.delta:.3g})"
                )
                exc.spent, exc.needed, exc.budget, exc.after = spent, after - spent, self.budget_epsilon, after  # type: ignore[attr-defined]
                raise exc
        return float(after)

    # -- writing -------------------------------------------------------------------------------
    def charge(self, *, round_number: int, session_id: bytes,
               event: MechanismEvent | Sequence[MechanismEvent]) -> LedgerEntry:
        """Append and durably commit the charge for one release (or a round's releases, one
        entry each, in one transaction); call it before the update leaves. Returns the newest
        entry.

        Raises:
            BudgetExceeded: the charge would exceed the budget (nothing is written).
            LedgerError: read-only ledger, bad arguments, or the write failed (nothing written).
        """
        if self._identity is None:
            raise LedgerError(f"ledger {self.path} was opened without an identity: it cannot be charged")
        if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
            raise LedgerError(f"round_number must be an integer >= 0 (got {round_number!r})")
        if not isinstance(session_id, bytes | bytearray) or not session_id:
            raise LedgerError("session_id must be non-empty bytes")
        batch = _as_events(event)
        self.check_budget(batch)
        conn = self._conn
        written: list[tuple[LedgerEntry, float]] = []
        with self._writing(f"charge for round {round_number}") as last:
            events, rdp = list(self._events), self._rdp
            for one in batch:
                events.append(one)
                rdp = rdp + event_rdp(one)
                last = self._insert(conn, last, round_number, bytes(session_id), one, events, rdp)
                written.append((last, rdp))
        for entry, rdp in written:
            assert not isinstance(entry.event, ChargeRelease)
            self._events.append(entry.event)
            self._charges[entry.index] = entry
            self._rdp = rdp
            self._last = entry
        return written[-1][0]

    def unreleased_charges(self, round_number: int) -> list[LedgerEntry]:
        """The charge entries of ``round_number`` no release has withdrawn, oldest first."""
        return [e for i, e in sorted(self._charges.items())
                if e.round_number == round_number and i not in self._released]

    def release(self, *, round_number: int) -> LedgerEntry:
        """Withdraw every charge of ``round_number`` not released yet: one signed
        :class:`ChargeRelease` entry per charge, in one durable transaction. Call it only for a
        round whose update never left the site (the round aborted before its upload): ε then
        equals ε without that round, and ``secfed audit`` fails the ledger if the coordinator's
        transcript holds an upload of this site in that round. Returns the newest entry.

        Raises:
            LedgerError: read-only ledger, no charge of that round to release, or the write
                failed (nothing written).
        """
        if self._identity is None:
            raise LedgerError(f"ledger {self.path} was opened without an identity: it cannot release")
        charges = self.unreleased_charges(round_number)
        if not charges:
            raise LedgerError(f"round_number must name a round with a charge not yet released "
                              f"(got {round_number})")
        conn = self._conn
        released = set(self._released)
        with self._writing(f"release of round {round_number}") as last:
            for charge in charges:
                released.add(charge.index)
                events = [e.event for i, e in sorted(self._charges.items()) if i not in released]
                event = ChargeRelease(entry=charge.index, entry_hash=charge.entry_hash.hex())
                last = self._insert(conn, last, round_number, charge.session_id, event,
                                    events, _rdp_of(events))  # type: ignore[arg-type]
        self._load()
        assert last is not None
        return last

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[LedgerEntry | None]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) that starts from the tail
        this writer knows, which it yields; rolled back whole on any error.

        Raises:
            LedgerError: another process appended meanwhile, or SQLite failed (``what`` not
                written).
        """
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Re-read the tail inside the write lock: another process may have appended.
            row = conn.execute(_SELECT.replace("ORDER BY idx", "ORDER BY idx DESC LIMIT 1")).fetchone()
            last = None if row is None else _row_to_entry(self.enterprise_id, row)
            if (last is None) != (self._last is None) or (
                last is not None and self._last is not None and last.index != self._last.index
            ):
                raise LedgerError(f"ledger {self.path} changed under this writer; reopen it")
            yield last
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise LedgerError(f"ledger {self.path}: {what} not written ({exc})") from exc
            raise

    def _insert(self, conn: sqlite3.Connection, last: LedgerEntry | None, round_number: int,
                session_id: bytes, event: LedgerEvent, events: list[MechanismEvent],
                rdp: np.ndarray) -> LedgerEntry:
        """Write one signed entry after ``last`` (inside the caller's transaction); ``events``
        and ``rdp`` are what the ledger composes after it."""
        assert self._identity is not None
        event_json = event.to_json()
        eps_rdp = rdp_to_epsilon(rdp, delta=self.delta) if events else 0.0  # as compose_epsilon
        eps_prv = compose_epsilon(events, delta=self.delta, accountant="prv")
        index = 1 if last is None else last.index + 1
        prev = GENESIS_HASH if last is None else last.entry_hash
        timestamp = float(self._clock())
        canonical = _canonical(
            enterprise_id=self.enterprise_id, index=index, round_number=round_number,
            session_id=session_id, event_json=event_json, eps_prv=eps_prv,
            eps_rdp=eps_rdp, delta=self.delta, budget=self.budget_epsilon,
            timestamp=timestamp, prev_hash=prev,
        )
        digest = entry_hash(canonical)
        signature = self._identity.sign(head_message(self.enterprise_id, index, digest))
        conn.execute(
            "INSERT INTO entries (idx, round_number, session_id, event, eps_prv, eps_rdp, delta,"
            " budget, timestamp, prev_hash, entry_hash, signature)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (index, round_number, session_id, event_json, eps_prv, eps_rdp, self.delta,
             self.budget_epsilon, timestamp, prev, digest, signature),
        )
        return LedgerEntry(self.enterprise_id, index, round_number, session_id, event,
                           event_json, eps_prv, eps_rdp, self.delta, self.budget_epsilon,
                           timestamp, prev, digest, signature)

    def add_receipt(self, receipt: LedgerReceipt) -> None:
        """Keep the coordinator's receipt for one of this ledger's heads (append-only).

        The caller verifies the coordinator's signature (it holds the pinned key); this checks
        that the receipt names an entry this ledger really has, so nothing else is stored. A
        receipt already kept is ignored.

        Raises:
            LedgerError: read-only ledger, a head of another ledger or entry, or the write failed.
        """
        if self._identity is None:
            raise LedgerError(f"ledger {self.path} was opened without an identity: it keeps no receipts")
        try:
            head = LedgerHead.from_bytes(receipt.head)
        except MessageFormatError as exc:
            raise LedgerError(f"receipt head must be a ledger head ({exc})") from None
        if head.enterprise_id != self.enterprise_id:
            raise LedgerError(f"receipt must name this ledger's enterprise (got {head.enterprise_id!r})")
        row = self._conn.execute(
            "SELECT entry_hash FROM entries WHERE idx = ?", (head.index,)).fetchone()
        if row is None or not constant_time_equal(bytes(row[0]), head.entry_hash):
            raise LedgerError(f"receipt must name an entry of this ledger (got entry {head.index})")
        try:
            self._conn.execute(
                "INSERT OR IGNORE INTO receipts (round_number, stage, head_index, receipt)"
                " VALUES (?, ?, ?, ?)",
                (receipt.round_number, receipt.stage, head.index, receipt.to_bytes()),
            )
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger {self.path}: receipt not written ({exc})") from exc

    def receipts(self) -> list[LedgerReceipt]:
        """The coordinator's receipts this ledger keeps, oldest first."""
        return _receipts(self._conn, self.path)

    def head(self) -> LedgerHead:
        """The signed head (newest entry); an empty ledger's head is signed on demand.

        Raises:
            LedgerError: the ledger is empty and was opened without an identity.
        """
        if self._last is not None:
            return LedgerHead(self.enterprise_id, self._last.index, self._last.entry_hash, self._last.signature)
        if self._identity is None:
            raise LedgerError(f"ledger {self.path} is empty and read-only: no head to sign")
        return LedgerHead(self.enterprise_id, 0, GENESIS_HASH,
                          self._identity.sign(head_message(self.enterprise_id, 0, GENESIS_HASH)))


def _read_only(path: Path, read: Callable[[sqlite3.Connection, Path], _T]) -> _T:
    """``read(conn, path)`` on a read-only connection to the ledger file at ``path``.

    Raises:
        LedgerError: missing file, or it cannot be opened.
    """
    with open_readonly(path, "ledger", LedgerError) as conn:
        return read(conn, path)


def read_ledger(path: str | Path) -> list[LedgerEntry]:
    """Every entry of the ledger at ``path`` (unverified; see :func:`verify_ledger`).

    Raises:
        LedgerError: missing or unreadable file.
    """
    return list(_read(Path(path))[1])


def read_ledger_meta(path: str | Path) -> dict[str, str]:
    """The ledger's header (``enterprise_id``, ``public_key``, ``budget_epsilon``, ``delta``,
    ``budget_accountant``, ``format``), read even when an entry is unreadable. Unverified: the
    entries are checked against it by :func:`verify_ledger`.

    Raises:
        LedgerError: missing file, not a ledger, or another format.
    """
    return _read_only(Path(path), _read_meta)


def _receipts(conn: sqlite3.Connection, path: Path) -> list[LedgerReceipt]:
    try:
        has = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'receipts'").fetchone()
        rows = conn.execute("SELECT receipt FROM receipts ORDER BY seq").fetchall() if has else []
    except sqlite3.DatabaseError as exc:
        raise LedgerVerificationError(f"ledger {path}: receipts table unreadable ({exc})") from exc
    out = []
    for (blob,) in rows:
        try:
            out.append(LedgerReceipt.from_bytes(bytes(blob)))
        except MessageFormatError as exc:
            raise LedgerVerificationError(f"ledger {path}: a kept receipt is malformed ({exc})") from exc
    return out


def read_receipts(path: str | Path) -> list[LedgerReceipt]:
    """The coordinator's receipts kept in the ledger at ``path`` (unverified; see
    :func:`verify_receipts`). A ledger written before receipts existed has none.

    Raises:
        LedgerError: missing or unreadable file.
        LedgerVerificationError: a kept receipt does not parse.
    """
    return _read_only(Path(path), _receipts)


def verify_receipts(entries: Sequence[LedgerEntry], receipts: Sequence[LedgerReceipt], *,
                    enterprise_id: str, coordinator_key: bytes, federation: str | None = None
                    ) -> None:
    """Check every kept receipt: signed by the coordinator's pinned key, for this federation and
    enterprise, naming an entry the ledger has with the same hash, charged in the receipt's
    round. A ledger rolled back or rewritten after a receipt was issued fails here.

    Raises:
        LedgerVerificationError: ``.entry`` names the ledger entry the failing receipt pins.
    """
    for receipt in receipts:
        where = f"receipt for round {receipt.round_number} ({receipt.stage})"
        try:
            receipt.verify(coordinator_key)
        except InvalidSignature:
            raise LedgerVerificationError(
                f"{where}: not signed by the coordinator's pinned identity key") from None
        if federation is not None and receipt.federation != federation:
            raise LedgerVerificationError(f"{where}: issued for federation {receipt.federation!r}")
        try:
            head = LedgerHead.from_bytes(receipt.head)
        except MessageFormatError as exc:
            raise LedgerVerificationError(f"{where}: head is malformed ({exc})") from None
        if head.enterprise_id != enterprise_id:
            raise LedgerVerificationError(f"{where}: names enterprise {head.enterprise_id!r}")
        if head.index == 0 or head.index > len(entries):
            raise LedgerVerificationError(
                f"{where}: the coordinator receipted entry {head.index} but the ledger has "
                f"{len(entries)} entries (ledger rolled back or truncated)", entry=head.index)
        entry = entries[head.index - 1]
        if entry.index != head.index or not constant_time_equal(entry.entry_hash, head.entry_hash):
            raise LedgerVerificationError(
                f"{where}: entry {head.index} differs from the receipted head (ledger rewritten)",
                entry=head.index)
        if entry.round_number != receipt.round_number:
            raise LedgerVerificationError(
                f"{where}: entry {head.index} was charged for round {entry.round_number}",
                entry=head.index)


def _meta_and_rows(conn: sqlite3.Connection, path: Path) -> tuple[dict[str, str], list[Any]]:
    meta = _read_meta(conn, path)
    try:
        return meta, conn.execute(_SELECT).fetchall()
    except sqlite3.DatabaseError as exc:  # a corrupted page: the file was altered
        raise LedgerVerificationError(f"ledger {path}: entries table unreadable ({exc})") from exc


def _read(path: Path) -> tuple[dict[str, str], list[LedgerEntry]]:
    meta, rows = _read_only(path, _meta_and_rows)
    entries = []
    for row in rows:
        try:
            entries.append(_row_to_entry(meta["enterprise_id"], row))
        except (MessageFormatError, TypeError, ValueError) as exc:
            raise LedgerVerificationError(f"entry {row[0]}: unreadable record ({exc})", entry=row[0]) from exc
    return meta, entries


def _close(recorded: float, recomputed: float) -> bool:
    return math.isclose(recorded, recomputed, rel_tol=EPSILON_RTOL, abs_tol=1e-9)


def verify_ledger(
    path: str | Path, *, public_key: bytes | None, expected_head: LedgerHead | None = None,
    recompute_prv: bool = True, skip_prv: bool = False,
) -> LedgerReport:
    """Verify a ledger end to end; return what it proves or raise naming the first bad entry.

    Checks, per entry in order: contiguous index, the previous entry's hash, the entry's own
    hash over its canonical encoding, the Ed25519 signature under ``public_key`` (the pinned
    identity; None means "the key recorded in the file", reported as not pinned), the δ and
    budget fixed at creation, and ε recomputed from the recorded events: RDP (what the budget
    enforces) always; PRV for every entry, for the newest only (``recompute_prv=False``), or
    not at all (``skip_prv=True``: the recorded, signed PRV figures are reported as they are;
    PRV needs Opacus' PRV accountant, hence torch, seconds to import). With ``expected_head`` (e.g. from the coordinator's
    transcript) the ledger must contain that exact entry -- so truncation is caught too.

    Raises:
        LedgerVerificationError: ``.entry`` names the failing entry index (None: file level).
        LedgerError: the file is missing or not a ledger.
    """
    path = Path(path)
    meta, entries = _read(path)
    try:
        enterprise_id = meta["enterprise_id"]
        file_key = bytes.fromhex(meta["public_key"])
        budget = float(meta["budget_epsilon"])
        delta = float(meta["delta"])
        budget_accountant = meta["budget_accountant"]
    except (KeyError, ValueError) as exc:
        raise LedgerVerificationError(f"ledger {path}: meta table is incomplete ({exc})") from exc
    if budget_accountant not in ACCOUNTANTS:
        raise LedgerVerificationError(f"ledger {path}: budget_accountant {budget_accountant!r} unknown")
    key = file_key if public_key is None else bytes(public_key)
    if public_key is not None and not constant_time_equal(key, file_key):
        raise LedgerVerificationError(
            f"ledger {path}: recorded identity {file_key.hex()[:16]}... is not the pinned key {key.hex()[:16]}..."
        )
    prev = GENESIS_HASH
    rdp = np.zeros(len(RDP_ORDERS))
    events: list[MechanismEvent] = []
    released: set[int] = set()
    for position, entry in enumerate(entries, start=1):
        def fail(reason: str, entry: LedgerEntry = entry) -> LedgerVerificationError:
            return LedgerVerificationError(f"ledger entry {entry.index}: {reason}", entry=entry.index)

        if entry.index != position:
            raise fail(f"index must be {position} (entries missing or reordered)")
        if not constant_time_equal(entry.prev_hash, prev):
            raise fail("prev_hash does not match the previous entry's hash (chain broken)")
        if not constant_time_equal(entry_hash(entry.canonical()), entry.entry_hash):
            raise fail("entry_hash does not match the entry's contents (entry altered)")
        try:
            verify_signature(key, entry.signature, head_message(enterprise_id, entry.index, entry.entry_hash))
        except InvalidSignature:
            raise fail("signature does not verify under the identity key") from None
        if entry.delta != delta or entry.budget != budget:
            raise fail(f"delta/budget ({entry.delta}, {entry.budget}) differ from the ledger's ({delta}, {budget})")
        if isinstance(entry.event, ChargeRelease):
            why = _check_release(entry, entries[:position - 1], released)
            if why is not None:
                raise fail(why)
            released.add(entry.event.entry)
            events = effective_events(entries[:position])
            rdp = _rdp_of(events)
        else:
            events.append(entry.event)
            rdp = rdp + event_rdp(entry.event)
        eps_rdp = rdp_to_epsilon(rdp, delta=delta) if events else 0.0
        if not _close(entry.eps_rdp, eps_rdp):
            raise fail(f"recorded eps_rdp {entry.eps_rdp!r} is not the recomputed {eps_rdp!r}")
        if not skip_prv and (recompute_prv or position == len(entries)):
            eps_prv = compose_epsilon(events, delta=delta, accountant="prv")
            if not _close(entry.eps_prv, eps_prv):
                raise fail(f"recorded eps_prv {entry.eps_prv!r} is not the recomputed {eps_prv!r}")
        prev = entry.entry_hash
    head = None
    if entries:
        last = entries[-1]
        head = LedgerHead(enterprise_id, last.index, last.entry_hash, last.signature)
    if expected_head is not None:
        _check_expected_head(path, expected_head, enterprise_id, key, entries)
    return LedgerReport(
        enterprise_id=enterprise_id, public_key=key, key_pinned=public_key is not None,
        budget=budget, delta=delta, budget_accountant=budget_accountant, entries=tuple(entries),
        eps_prv=entries[-1].eps_prv if entries else 0.0, eps_rdp=entries[-1].eps_rdp if entries else 0.0,
        head=head,
    )


def _check_expected_head(path: Path, head: LedgerHead, enterprise_id: str, key: bytes,
                         entries: Sequence[LedgerEntry]) -> None:
    if head.enterprise_id != enterprise_id:
        raise LedgerVerificationError(f"ledger {path}: head is for {head.enterprise_id!r}, ledger for {enterprise_id!r}")
    try:
        head.verify(key)
    except InvalidSignature:
        raise LedgerVerificationError(f"ledger {path}: head {head.index} is not signed by the identity key",
                                      entry=head.index) from None
    if head.index == 0:
        return
    if head.index > len(entries):
        raise LedgerVerificationError(
            f"ledger {path}: head names entry {head.index} but the ledger ends at {len(entries)} (truncated)",
            entry=head.index,
        )
    if not constant_time_equal(entries[head.index - 1].entry_hash, head.entry_hash):
        raise LedgerVerificationError(
            f"ledger entry {head.index}: hash differs from the signed head (ledger rewritten)", entry=head.index
        )


def _as_events(events: MechanismEvent | Sequence[MechanismEvent]) -> list[MechanismEvent]:
    """One event or a sequence of them, as a non-empty list.

    Raises:
        LedgerError: an empty sequence (a charge must name at least one release).
    """
    batch = list(events) if isinstance(events, Sequence) else [events]
    if not batch:
        raise LedgerError("a charge must name at least one mechanism event (got none)")
    return batch


# How a budget error names a round's releases.
_KIND_NAMES = {"dpsgd": "DP-SGD", "skellam": "distributed DP"}


def _kinds(events: Sequence[MechanismEvent]) -> str:
    return " + ".join(_KIND_NAMES.get(e.KIND, e.KIND) for e in events)
