"""The privacy ledger: append-only, tamper detection naming the entry, budgets, crash safety."""

from __future__ import annotations

import os
import secrets
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secfed.crypto.keys import IdentityKey
from secfed.errors import (
    BudgetExceeded,
    InvalidSignature,
    LedgerError,
    LedgerVerificationError,
    MessageFormatError,
)
from secfed.privacy import (
    DPSGDEvent,
    GaussianEvent,
    Ledger,
    LedgerHead,
    compose_epsilon,
    event_from_json,
    read_ledger,
    verify_ledger,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


EVENT = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.01, steps=50)


def make_ledger(path: Path, identity: IdentityKey, rounds: int = 4, budget: float = 8.0) -> Ledger:
    ledger = Ledger.open(path, enterprise_id="acme", identity=identity, budget_epsilon=budget,
                         delta=1e-5, clock=FakeClock(), create=True)
    for r in range(rounds):
        ledger.charge(round_number=r, session_id=secrets.token_bytes(32), event=EVENT)
    return ledger


@pytest.fixture
def identity() -> IdentityKey:
    return IdentityKey.generate()


@pytest.fixture
def ledger_path(tmp_path: Path, identity: IdentityKey) -> Path:
    path = tmp_path / "ledger.sqlite"
    make_ledger(path, identity).close()
    return path


def raw_edit(path: Path, sql: str, params: tuple = ()) -> None:
    """What an attacker with file access does: drop the triggers, then edit."""
    conn = sqlite3.connect(path)
    conn.executescript("DROP TRIGGER entries_no_update; DROP TRIGGER entries_no_delete;")
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_entries_record_the_accounting(ledger_path: Path, identity: IdentityKey) -> None:
    report = verify_ledger(ledger_path, public_key=identity.public_bytes())
    assert report.key_pinned and len(report.entries) == 4 and report.rounds == (0, 1, 2, 3)
    for k, entry in enumerate(report.entries, start=1):
        assert entry.index == k and entry.event == EVENT and entry.delta == 1e-5
        assert entry.eps_rdp == pytest.approx(compose_epsilon([EVENT] * k, delta=1e-5, accountant="rdp"))
        assert entry.eps_prv == pytest.approx(compose_epsilon([EVENT] * k, delta=1e-5, accountant="prv"))
        assert entry.eps_prv < entry.eps_rdp
    assert report.entries[1].prev_hash == report.entries[0].entry_hash
    assert report.spent == report.eps_rdp and report.remaining == pytest.approx(8.0 - report.eps_rdp)
    assert [e.entry_hash for e in read_ledger(ledger_path)] == [e.entry_hash for e in report.entries]


def test_sql_triggers_refuse_update_and_delete(ledger_path: Path) -> None:
    conn = sqlite3.connect(ledger_path)
    for sql in ("UPDATE entries SET eps_rdp = 0.0 WHERE idx = 2", "DELETE FROM entries WHERE idx = 4",
                "UPDATE meta SET value = '100.0' WHERE key = 'budget_epsilon'"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only|write-once"):
            conn.execute(sql)
    conn.close()


COLUMNS = ["round_number", "session_id", "event", "eps_prv", "eps_rdp", "delta", "budget",
           "timestamp", "prev_hash", "entry_hash", "signature"]


def _flip_one_byte(value: object) -> object:
    if isinstance(value, bytes):
        return bytes([value[0] ^ 0x01]) + value[1:]
    if isinstance(value, float):
        raw = bytearray(repr(value).encode())
        pos = next(i for i in range(len(raw) - 1, -1, -1) if chr(raw[i]).isdigit())
        raw[pos] = ord("1") if raw[pos] != ord("1") else ord("2")
        return float(raw.decode())
    if isinstance(value, int):
        return value ^ 1
    text = str(value)
    pos = text.index("1")  # every event text here contains a digit 1
    return text[:pos] + "2" + text[pos + 1:]


@pytest.mark.parametrize("column", COLUMNS)
def test_flipping_any_field_of_a_row_names_the_entry(ledger_path: Path, identity: IdentityKey,
                                                     column: str) -> None:
    conn = sqlite3.connect(ledger_path)
    (value,) = conn.execute(f"SELECT {column} FROM entries WHERE idx = 3").fetchone()
    conn.close()
    raw_edit(ledger_path, f"UPDATE entries SET {column} = ? WHERE idx = 3", (_flip_one_byte(value),))
    with pytest.raises(LedgerVerificationError) as info:
        verify_ledger(ledger_path, public_key=identity.public_bytes())
    assert info.value.entry in (3, 4)  # a changed entry_hash is seen at 3 (own hash) or 4 (link)
    assert f"entry {info.value.entry}" in str(info.value)


def test_flipping_any_byte_of_a_row_in_the_file_is_detected(ledger_path: Path, identity: IdentityKey) -> None:
    """Every byte of entry 2's record body in the SQLite file, from session_id to signature."""
    entry = read_ledger(ledger_path)[1]
    conn = sqlite3.connect(ledger_path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    original = ledger_path.read_bytes()
    start, sig = original.find(entry.session_id), original.find(entry.signature)
    assert 0 < start < sig
    for pos in range(start, sig + len(entry.signature)):
        blob = bytearray(original)
        blob[pos] ^= 0x01
        ledger_path.write_bytes(bytes(blob))
        with pytest.raises(LedgerVerificationError) as info:
            verify_ledger(ledger_path, public_key=identity.public_bytes(), recompute_prv=False)
        assert info.value.entry in (2, 3), (pos - start, str(info.value))
    ledger_path.write_bytes(original)
    verify_ledger(ledger_path, public_key=identity.public_bytes())


def test_deleting_a_row_is_detected(ledger_path: Path, identity: IdentityKey) -> None:
    raw_edit(ledger_path, "DELETE FROM entries WHERE idx = 2")
    with pytest.raises(LedgerVerificationError) as info:
        verify_ledger(ledger_path, public_key=identity.public_bytes())
    assert info.value.entry == 3


def test_truncation_is_detected_against_the_pinned_head(ledger_path: Path, identity: IdentityKey) -> None:
    head = verify_ledger(ledger_path, public_key=identity.public_bytes()).head
    assert head is not None and head.index == 4
    raw_edit(ledger_path, "DELETE FROM entries WHERE idx = 4")
    verify_ledger(ledger_path, public_key=identity.public_bytes())  # the chain alone still holds
    with pytest.raises(LedgerVerificationError, match="truncated") as info:
        verify_ledger(ledger_path, public_key=identity.public_bytes(), expected_head=head)
    assert info.value.entry == 4


def test_resigning_with_a_foreign_key_is_detected(tmp_path: Path, identity: IdentityKey) -> None:
    mallory = IdentityKey.generate()
    path = tmp_path / "forged.sqlite"
    make_ledger(path, mallory).close()  # a well-formed ledger, signed by the wrong key
    with pytest.raises(LedgerVerificationError, match="pinned key"):
        verify_ledger(path, public_key=identity.public_bytes())
    # Even with the meta key swapped to the pinned one, each signature fails and names entry 1.
    conn = sqlite3.connect(path)
    conn.executescript("DROP TRIGGER meta_no_update;")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'public_key'", (identity.public_bytes().hex(),))
    conn.commit()
    conn.close()
    with pytest.raises(LedgerVerificationError, match="signature") as info:
        verify_ledger(path, public_key=identity.public_bytes())
    assert info.value.entry == 1


def test_a_self_signed_false_epsilon_is_detected(tmp_path: Path, identity: IdentityKey) -> None:
    """The key holder itself records a smaller ε, re-hashing and re-signing consistently."""
    from secfed.privacy import ledger as ledger_module

    path = tmp_path / "liar.sqlite"
    real = ledger_module.compose_epsilon

    def understate(events, *, delta, accountant="prv"):
        eps = real(events, delta=delta, accountant=accountant)
        return eps / 2 if len(events) == 2 else eps

    ledger = make_ledger(path, identity, rounds=1)
    ledger_module.compose_epsilon = understate
    try:
        ledger.charge(round_number=1, session_id=b"s" * 32, event=EVENT)
    finally:
        ledger_module.compose_epsilon = real
    ledger.charge(round_number=2, session_id=b"t" * 32, event=EVENT)
    ledger.close()
    with pytest.raises(LedgerVerificationError, match="eps_prv") as info:
        verify_ledger(path, public_key=identity.public_bytes())
    assert info.value.entry == 2


def test_budget_refused_before_any_write(tmp_path: Path, identity: IdentityKey) -> None:
    ledger = make_ledger(tmp_path / "l.sqlite", identity, rounds=2, budget=2.0)
    spent = ledger.epsilon_spent()[1]
    big = DPSGDEvent(noise_multiplier=0.8, sample_rate=0.05, steps=400)
    with pytest.raises(BudgetExceeded) as info:
        ledger.check_budget(big)
    exc = info.value
    assert exc.spent == pytest.approx(spent) and exc.budget == 2.0 and exc.after > 2.0
    assert exc.needed == pytest.approx(exc.after - spent)
    for word in ("spent", "needs", "budget"):
        assert word in str(exc)
    with pytest.raises(BudgetExceeded):
        ledger.charge(round_number=2, session_id=b"x" * 32, event=big)
    assert len(ledger.entries()) == 2


def test_head_round_trip_and_signature(ledger_path: Path, identity: IdentityKey) -> None:
    ledger = Ledger.open(ledger_path, enterprise_id="acme", identity=identity, delta=1e-5)
    head = ledger.head()
    parsed = LedgerHead.from_bytes(head.to_bytes())
    assert parsed == head and parsed.index == 4
    parsed.verify(identity.public_bytes())
    with pytest.raises(InvalidSignature):
        parsed.verify(IdentityKey.generate().public_bytes())
    blob = head.to_bytes()
    for bad in (blob[:-1], b"XXXX" + blob[4:], blob[:4] + b"\x02" + blob[5:], blob + b"\x00"):
        with pytest.raises(MessageFormatError):
            LedgerHead.from_bytes(bad)
    empty = Ledger.open(ledger_path.with_name("empty.sqlite"), enterprise_id="acme", identity=identity,
                        create=True)
    empty.head().verify(identity.public_bytes())
    assert empty.head().index == 0


def test_reopen_checks_identity_and_budget(ledger_path: Path, identity: IdentityKey) -> None:
    with pytest.raises(LedgerError, match="another identity"):
        Ledger.open(ledger_path, enterprise_id="acme", identity=IdentityKey.generate(), delta=1e-5)
    with pytest.raises(LedgerError, match="budget_epsilon"):
        Ledger.open(ledger_path, enterprise_id="acme", identity=identity, budget_epsilon=9.0, delta=1e-5)
    readonly = Ledger.open(ledger_path, enterprise_id="acme", identity=None, delta=1e-5)
    with pytest.raises(LedgerError, match="without an identity"):
        readonly.charge(round_number=9, session_id=b"x", event=EVENT)


def test_simulated_federation_1000_rounds_never_over_budget(tmp_path: Path) -> None:
    """Random budgets and per-round mechanisms; every charge that went out stays within budget."""
    rng = secrets.SystemRandom()
    enterprises = {}
    for k in range(3):
        key = IdentityKey.generate()
        budget = rng.uniform(1.0, 8.0)
        enterprises[f"e{k}"] = (key, Ledger.open(tmp_path / f"e{k}.sqlite", enterprise_id=f"e{k}",
                                                 identity=key, budget_epsilon=budget, delta=1e-5,
                                                 create=True))
    # Releases large enough that budgets run out early: most of the 1000 rounds are refusals,
    # which is the path under test (accepted charges each run the PRV accountant).
    # GaussianEvent(8.0) costs 0.48 (RDP) < the smallest budget, so every enterprise gets at
    # least one charge through (P[never drawn in 1000 rounds] = (3/4)^1000).
    choices = [GaussianEvent(3.0), DPSGDEvent(1.0, 0.02, 300), DPSGDEvent(0.8, 0.05, 100),
               GaussianEvent(8.0)]
    sent: dict[str, list] = {name: [] for name in enterprises}
    refused = 0
    for round_number in range(1000):
        for name, (_, ledger) in enterprises.items():
            event = rng.choice(choices)
            try:
                ledger.check_budget(event)
            except BudgetExceeded:
                refused += 1
                would_be = compose_epsilon([*sent[name], event], delta=1e-5, accountant="rdp")
                assert would_be > ledger.budget_epsilon  # never a spurious refusal
                continue
            ledger.charge(round_number=round_number, session_id=os.urandom(32), event=event)
            sent[name].append(event)  # "the update leaves" only after the charge committed
    assert refused > 0
    for name, (key, ledger) in enterprises.items():
        ledger.close()
        report = verify_ledger(tmp_path / f"{name}.sqlite", public_key=key.public_bytes(), recompute_prv=False)
        assert len(report.entries) == len(sent[name]) > 0
        assert all(e.eps_rdp <= report.budget for e in report.entries)
        assert compose_epsilon(sent[name], delta=1e-5, accountant="rdp") <= report.budget


class _FailingConnection:
    """Wraps a sqlite3 connection and raises at the n-th ``execute`` (a crash between statements)."""

    def __init__(self, conn: sqlite3.Connection, fail_at: int, after: bool) -> None:
        self._conn, self._fail_at, self._after, self.calls = conn, fail_at, after, 0

    def execute(self, *args):
        self.calls += 1
        if self.calls == self._fail_at and not self._after:
            raise sqlite3.OperationalError("injected crash before statement")
        result = self._conn.execute(*args)
        if self.calls == self._fail_at and self._after:
            raise sqlite3.OperationalError("injected crash after statement")
        return result

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def test_exception_injected_at_every_statement_never_under_reports(tmp_path: Path,
                                                                   identity: IdentityKey) -> None:
    path = tmp_path / "crash.sqlite"
    make_ledger(path, identity, rounds=1).close()
    probe = Ledger.open(path, enterprise_id="acme", identity=identity, delta=1e-5)
    counter = _FailingConnection(probe._conn, fail_at=10**9, after=False)
    probe._conn = counter  # type: ignore[assignment]
    probe.charge(round_number=1, session_id=b"p" * 32, event=EVENT)
    statements = counter.calls
    probe.close()
    assert statements >= 3  # BEGIN, SELECT tail, INSERT, COMMIT
    sent = 2
    for fail_at in range(1, statements + 1):
        for after in (False, True):
            ledger = Ledger.open(path, enterprise_id="acme", identity=identity, delta=1e-5)
            ledger._conn = _FailingConnection(ledger._conn, fail_at, after)  # type: ignore[assignment]
            try:
                ledger.charge(round_number=100 + fail_at, session_id=os.urandom(32), event=EVENT)
                sent += 1  # charge returned: the update may leave
            except LedgerError:
                pass
            ledger._conn._conn.close()  # type: ignore[attr-defined]
            report = verify_ledger(path, public_key=identity.public_bytes(), recompute_prv=False)
            assert len(report.entries) >= sent  # never under-reports what was sent
            assert len(report.entries) <= sent + 1  # at most the one in-flight charge extra


def _forked(child) -> int:
    """Run ``child()`` in a forked process that dies with ``os._exit``; return its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        code = 0
        try:
            child()
        except BaseException:  # noqa: BLE001 - any failure is reported by the exit status
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_process_killed_at_every_statement_leaves_a_verifiable_ledger(tmp_path: Path,
                                                                      identity: IdentityKey) -> None:
    """A hard crash (``os._exit``, no cleanup, no rollback) before/after each SQL statement."""
    path = tmp_path / "killed.sqlite"
    make_ledger(path, identity, rounds=1).close()
    committed = 1
    for fail_at in range(1, 5):  # BEGIN IMMEDIATE, SELECT tail, INSERT, COMMIT
        for after in (False, True):

            class Dying(_FailingConnection):
                def execute(self, *args):
                    self.calls += 1
                    if self.calls == self._fail_at and not self._after:
                        os._exit(137)
                    result = self._conn.execute(*args)
                    if self.calls == self._fail_at and self._after:
                        os._exit(137)
                    return result

            def child(fail_at: int = fail_at, after: bool = after) -> None:
                ledger = Ledger.open(path, enterprise_id="acme", identity=identity, delta=1e-5)
                ledger._conn = Dying(ledger._conn, fail_at, after)  # type: ignore[assignment]
                ledger.charge(round_number=10 + fail_at, session_id=os.urandom(32), event=EVENT)

            assert _forked(child) == 137
            report = verify_ledger(path, public_key=identity.public_bytes(), recompute_prv=False)
            # Only a process that got past COMMIT may have sent; it must be on disk.
            expect_new = 1 if (fail_at == 4 and after) else 0
            assert len(report.entries) == committed + expect_new
            committed = len(report.entries)
    assert committed == 2


def test_sigkill_during_a_charge_loop_never_under_reports(tmp_path: Path, identity: IdentityKey) -> None:
    import signal
    import time

    path = tmp_path / "sigkill.sqlite"
    make_ledger(path, identity, rounds=1).close()
    small = GaussianEvent(noise_multiplier=50.0)
    for attempt in range(3):
        start = len(read_ledger(path))
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(read_fd)
            ledger = Ledger.open(path, enterprise_id="acme", identity=identity, delta=1e-5)
            for r in range(10_000):
                ledger.charge(round_number=100 * attempt + r, session_id=os.urandom(32), event=small)
                os.write(write_fd, b"s")  # "the update left": only after charge() returned
            os._exit(0)
        os.close(write_fd)
        time.sleep(0.5 + 0.4 * attempt)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read_fd, "rb") as pipe:
            sent = len(pipe.read())
        report = verify_ledger(path, public_key=identity.public_bytes(), recompute_prv=False)
        charged = len(report.entries) - start
        assert sent >= 1
        assert sent <= charged <= sent + 1  # never under-reports; at most the in-flight charge extra
        with Ledger.open(path, enterprise_id="acme", identity=identity, delta=1e-5) as ledger:
            ledger.charge(round_number=10**6 + attempt, session_id=b"x" * 32, event=small)  # still writable


def test_a_second_writer_cannot_fork_the_chain(ledger_path: Path, identity: IdentityKey) -> None:
    first = Ledger.open(ledger_path, enterprise_id="acme", identity=identity, delta=1e-5)
    second = Ledger.open(ledger_path, enterprise_id="acme", identity=identity, delta=1e-5)
    first.charge(round_number=10, session_id=b"a" * 32, event=EVENT)
    with pytest.raises(LedgerError, match="changed under this writer"):
        second.charge(round_number=10, session_id=b"b" * 32, event=EVENT)
    first.close()
    second.close()
    assert len(verify_ledger(ledger_path, public_key=identity.public_bytes()).entries) == 5


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), flips=st.lists(st.integers(0, 10_000), max_size=4))
def test_head_parser_fuzz_only_raises_message_format_error(data: bytes, flips: list[int]) -> None:
    key = _FUZZ_KEY
    good = LedgerHead("acme", 7, b"\x11" * 32, key.sign(b"x")).to_bytes()
    mutated = bytearray(good)
    for f in flips:
        mutated[f % len(mutated)] ^= 1 + f % 255
    for blob in (data, bytes(mutated), good[: len(data) % len(good)]):
        try:
            head = LedgerHead.from_bytes(blob)
        except MessageFormatError:
            continue
        assert head.to_bytes() == blob  # anything accepted re-encodes to the same bytes
        with pytest.raises(InvalidSignature):
            head.verify(key.public_bytes())


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=120) | st.sampled_from([DPSGDEvent(1.5, 0.01, 3).to_json()]),
       cut=st.integers(0, 200))
def test_event_parser_fuzz_only_raises_message_format_error(text: str, cut: int) -> None:
    for candidate in (text, text[:cut], text.replace("1", "9")):
        try:
            event = event_from_json(candidate)
        except MessageFormatError:
            continue
        assert event.to_json() == candidate


_FUZZ_KEY = IdentityKey.generate()


def test_a_rounds_events_are_checked_and_charged_together(tmp_path: Path,
                                                          identity: IdentityKey) -> None:
    # Ledger.check_budget/charge take a round's releases in order: every prefix is checked
    # (the error names the releases), and the charge writes all of them or none.
    from secfed.privacy import DistributedDPEvent

    ledger = make_ledger(tmp_path / "l.sqlite", identity, rounds=1, budget=3.0)
    dpsgd = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.01, steps=5)
    fits = DistributedDPEvent(1.0, 10.0, 400.0, 4)
    heavy = DistributedDPEvent(1.0, 10.0, 0.5, 2)
    alone = ledger.check_budget(dpsgd)
    both = ledger.check_budget([dpsgd, fits])
    assert alone < both <= 3.0
    with pytest.raises(BudgetExceeded, match=r"this round \(DP-SGD \+ distributed DP\)"):
        ledger.check_budget([dpsgd, heavy])
    with pytest.raises(BudgetExceeded):
        ledger.charge(round_number=1, session_id=b"r" * 32, event=[dpsgd, heavy])
    assert len(ledger.entries()) == 1  # nothing of the refused round was written
    last = ledger.charge(round_number=1, session_id=b"r" * 32, event=(dpsgd, fits))
    entries = ledger.entries()
    assert [e.event for e in entries[1:]] == [dpsgd, fits] and last == entries[-1]
    assert entries[2].prev_hash == entries[1].entry_hash
    assert ledger.epsilon_spent()[0] == pytest.approx(both, rel=1e-6)
    with pytest.raises(LedgerError, match="at least one"):
        ledger.charge(round_number=2, session_id=b"e" * 32, event=[])
    ledger.close()
    verify_ledger(tmp_path / "l.sqlite", public_key=identity.public_bytes())
