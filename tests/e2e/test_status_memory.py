"""The status board over a long federation: ε from a running RDP curve equals the accountant's
composition of the same charges, and the board's memory does not grow with the rounds
(issue 19 item 5: the coordinator's resident memory over a 200-round soak)."""

from __future__ import annotations

import gc
import random
import tracemalloc

import pytest

from secfed.coordinator.status import HISTORY_SHOWN, ROUNDS_KEPT, StatusBoard
from secfed.privacy.accounting import compose_epsilon
from secfed.privacy.events import DPSGDEvent

IDS = tuple(f"org-{i}" for i in range(10))


def _terms(r: int) -> tuple[float, float, int, float]:
    """Mixed public terms: σ, sample rate and steps change from round to round."""
    return ((0.8, 1.0, 1.3)[r % 3], (0.01, 0.02)[r % 2], (3, 5, 1, 4)[r % 4], 1e-5)


def _charged(i: int, r: int) -> bool:
    """Enterprise ``i`` uploads in round ``r`` unless it drops out (a pattern per enterprise,
    so the enterprises' sets of charged rounds differ)."""
    return r % (i + 2) != 1


def _board() -> StatusBoard:
    return StatusBoard(federation="f", rounds_planned=1000, roster=IDS, target_epsilon=8.0,
                       terms_for=_terms, clock=lambda: 100.0)


def _round(board: StatusBoard, r: int) -> None:
    board.observe({"event": "round_opened", "round": r, "mode": "secagg", "at": float(r),
                   "participants": list(IDS), "deadline": r + 60.0})
    for i, eid in enumerate(IDS):
        if _charged(i, r):
            board.observe({"event": "message", "round": r, "stage": "upload", "sender": eid,
                           "bytes": 1000})
            board.observe({"event": "ledger_head", "round": r, "enterprise": eid,
                           "stage": "upload", "index": r})
    board.count_sent(r, "aggregate", 500)
    board.observe({"event": "round_done", "round": r, "at": r + 0.5})


def _reference(rounds: list[int]) -> float:
    events = [DPSGDEvent(noise_multiplier=s, sample_rate=q, steps=n)
              for s, q, n, _ in map(_terms, sorted(rounds))]
    return compose_epsilon(events, delta=_terms(max(rounds))[3], accountant="rdp")


def test_board_epsilon_equals_the_rdp_accountant_over_the_same_rounds() -> None:
    board = _board()
    for r in range(1, 51):
        _round(board, r)
        for i, e in enumerate(board.snapshot()["enterprises"]):
            rounds = [k for k in range(1, r + 1) if _charged(i, k)]
            assert e["charged_rounds"] == len(rounds)
            if rounds:  # exactly the accountant's figure, not an approximation of it
                assert e["epsilon_rdp"] == _reference(rounds), (e["id"], r)
    assert board.snapshot()["enterprises"][0]["epsilon_rdp"] > 0
    # heads replayed from the state file in any order (a restart) give the same ε
    heads = [(r, eid, "upload", r) for r in range(1, 51) for i, eid in enumerate(IDS)
             if _charged(i, r)]
    heads += heads[:40]  # a head seen twice is one charge
    random.Random(7).shuffle(heads)
    restarted = _board()
    restarted.load([], heads, {})
    for i, e in enumerate(restarted.snapshot()["enterprises"]):
        rounds = [k for k in range(1, 51) if _charged(i, k)]
        assert e["charged_rounds"] == len(rounds)
        assert e["epsilon_rdp"] == pytest.approx(_reference(rounds), rel=1e-12, abs=0.0)


def _traced(board: StatusBoard) -> int:
    gc.collect()
    board.snapshot()
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_board_memory_does_not_grow_with_rounds() -> None:
    board = _board()
    for r in range(1, 101):  # warm-up: the history shown fills up
        _round(board, r)
    tracemalloc.start()
    try:
        before = _traced(board)
        for r in range(101, 301):
            _round(board, r)
        grown = _traced(board) - before
    finally:
        tracemalloc.stop()
    assert len(board.rounds) <= ROUNDS_KEPT and len(board.snapshot()["history"]) == HISTORY_SHOWN
    assert board.snapshot()["history"][0]["round"] == 300
    # What may grow: each enterprise's set of charged rounds (one int per charge: 200 rounds x
    # 10 enterprises here, ~100 B each with the set's slack). A cache keyed by the tuple of
    # all charged rounds grew by megabytes over these 200 rounds.
    charges = sum(len(e.charged_rounds) for e in board.enterprises.values())
    assert grown < 256 * 1024, f"the board grew by {grown} B over 200 rounds ({charges} charges)"


def test_memtrace_dumps_allocation_sites_and_growth(tmp_path, monkeypatch) -> None:
    from secfed.coordinator.memtrace import ENV_VAR, MemTrace

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert MemTrace.from_env() is None  # off unless asked for
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "trace"))
    trace = MemTrace.from_env()
    try:
        first = trace.dump().read_text()
        held = [bytearray(1000) for _ in range(2000)]  # ~2 MB allocated on one line
        second = trace.dump().read_text()
    finally:
        tracemalloc.stop()
    assert "top 40 by size" in first and "growth since dump 1" not in first
    growth = second.split("growth since dump 1:")[1]
    top = growth.strip().splitlines()[0]
    assert "test_status_memory.py" in top and "+" in top, top  # the line that allocated
    assert len(held) == 2000


def test_heap_is_trimmed_when_a_round_ends(monkeypatch) -> None:
    """Freed C-heap memory goes back to the system at each round's end (glibc keeps it
    resident otherwise: the coordinator's RSS crept up while its Python objects did not)."""
    from secfed.coordinator.memtrace import TRIM_ENV_VAR, heap_trimmer, rss_kib

    monkeypatch.setenv(TRIM_ENV_VAR, "0")
    assert heap_trimmer() is None  # the operator's opt-out
    monkeypatch.delenv(TRIM_ENV_VAR)
    trim = heap_trimmer()
    assert trim is not None  # glibc (the supported platform)
    held = [bytes(1000) + bytes([i % 256]) for i in range(100_000)]  # ~100 MB of malloc chunks
    pinned = bytes(2000) + b"x"  # allocated after them: the heap's top cannot simply shrink
    del held
    freed = rss_kib()
    trim({"event": "round_done", "round": 1})
    assert freed - rss_kib() > 50 * 1024, (freed, rss_kib())
    assert pinned[-1:] == b"x"
