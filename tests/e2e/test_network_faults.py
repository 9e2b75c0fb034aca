"""The network between the sites and the coordinator misbehaves (issue 19 item 4): a fault proxy
on loopback adds latency and jitter, drops and resets connections, stalls every peer and
partitions the federation until it heals, one fault per round. Every round either finishes with
the exact sum or aborts cleanly and the next one runs; no ledger entry is lost or doubled; the
coordinator's resident memory and open file descriptors come back to their baseline."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from e2e.faultproxy import FaultProxy
from e2e.harness import (
    Processes,
    adapter_of,
    coordinator_db,
    expected_global,
    free_port,
    make_federation,
    wait_for,
)
from secfed.privacy import read_ledger

ENTERPRISES = ["energy-utility", "security-operator", "city-ops", "transit-authority"]
DIM = 64
ROUNDS = 8


def _rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]


class _Sampler(threading.Thread):
    """The coordinator's (time, RSS, fds) every 20 ms until it exits. Which samples fall in its
    last round is read afterwards from the rounds' closing times: the coordinator exits as soon
    as its last round is done (an exited process has no VmRSS), and the test's status polls can
    see the last round only after it ended."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.02):
            try:
                self.samples.append((time.time(), _rss_kib(self.pid), _fds(self.pid)))
            except (OSError, AttributeError):  # exited (no status, or a zombie's without VmRSS)
                return


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _status(kits, r: int) -> str | None:
    with coordinator_db(kits) as db:
        row = db.execute("SELECT status FROM rounds WHERE round=?", (r,)).fetchone()
    return row[0] if row else None


def _behind_proxy(kits) -> FaultProxy:
    """Sites keep the pinned URL (the proxy); the coordinator listens on another port."""
    fed = kits.coordinator / "federation.toml"
    text = fed.read_text()
    proxy_port = int(re.search(r'coordinator_url = "https://127\.0\.0\.1:(\d+)"', text).group(1))  # type: ignore[union-attr]
    real = free_port()
    fed.write_text(text.replace(f"127.0.0.1:{proxy_port}", f"127.0.0.1:{real}"))
    return FaultProxy(proxy_port, real)


@pytest.mark.slow
def test_fault_matrix_rounds_finish_exactly_or_abort_cleanly(tmp_path) -> None:
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg",), rounds=ROUNDS, stage=10.0, train=90.0,
                           applied=8.0)
    proxy = _behind_proxy(kits)
    procs = Processes(kits)
    procs.start_coordinator()
    for eid in ENTERPRISES:
        # Training outlasts the test's lag in seeing a round open, so each fault lands in its round
        # (with 0.3 s the rounds ran ahead and the faults hit a finished federation).
        procs.start_join(eid, "--synthetic-train-s", "2.0")
    pid = procs.coordinator.pid  # type: ignore[union-attr]
    matrix: dict[int, str] = {}
    struck: dict[int, float] = {}  # round -> when its fault began
    try:
        assert wait_for(lambda: _status(kits, 1) == "done", 120, 0.05), procs.log("coordinator.0")
        baseline = (_rss_kib(pid), _fds(pid))
        sampler = _Sampler(pid)
        sampler.start()

        def during(r: int, name: str) -> None:
            """Wait for round r-1 to end and round r to open: one fault per round."""
            assert wait_for(lambda: _status(kits, r - 1) in ("done", "aborted"), 180, 0.02), \
                procs.log("coordinator.0")
            assert wait_for(lambda: _status(kits, r) is not None, 120, 0.02), procs.log("coordinator.0")
            matrix[r] = name
            struck[r] = time.time()

        during(2, "latency 50 ms + jitter 0-100 ms")
        proxy.faults.latency_s, proxy.faults.jitter_s = 0.05, 0.1
        assert wait_for(lambda: _status(kits, 2) in ("done", "aborted"), 120, 0.05)
        proxy.faults.latency_s = proxy.faults.jitter_s = 0.0

        during(3, "connections reset (RST) every 0.5 s until the round ends")
        end = time.monotonic() + 60
        while _status(kits, 3) not in ("done", "aborted") and time.monotonic() < end:
            proxy.reset_all()
            time.sleep(0.5)

        during(4, "connections reset, new ones dropped for 3 s")
        proxy.faults.refuse = True
        proxy.reset_all()  # kept-alive connections would otherwise never need a new one
        time.sleep(3.0)
        proxy.faults.refuse = False

        during(5, "every peer stalled for 5 s")
        proxy.faults.stall = True
        time.sleep(5.0)
        proxy.faults.stall = False

        during(6, "partition for 5 s, then healed (dead connections reset)")
        proxy.partition(5.0)
        proxy.reset_all()  # what a real partition leaves: dead connections

        during(7, "clean")
        assert wait_for(lambda: _status(kits, ROUNDS) in ("done", "aborted"), 180, 0.01)
        codes = procs.wait(240)
    finally:
        procs.stop()
        proxy.close()
    sampler.halt.set()
    sampler.join()
    with coordinator_db(kits) as db:
        closed = dict(db.execute("SELECT round, closed_at FROM rounds"))
    # after every faulted round: while the last round ran
    last_round = [(rss, fds) for at, rss, fds in sampler.samples
                  if closed[ROUNDS - 1] <= at <= closed[ROUNDS]]
    assert last_round, ("no sample of the coordinator while its last round ran", closed)
    for r, at in struck.items():  # every fault began before its round ended
        assert closed[r] > at, (r, matrix[r], at, closed)
    after = last_round[-1]
    print(json.dumps({"baseline_rss_kib": baseline[0], "baseline_fds": baseline[1],
                      "after_rss_kib": after[0], "after_fds": after[1],
                      "proxy": {"accepted": proxy.accepted, "refused": proxy.refused,
                                "reset": proxy.reset}}, sort_keys=True))
    assert set(codes.values()) == {0}, procs.log("coordinator.0")
    assert proxy.refused > 0 and proxy.reset > 0  # the faults really happened
    db = coordinator_db(kits)
    rows = db.execute("SELECT round, status, survivors FROM rounds ORDER BY round").fetchall()
    outcome = {r: st for r, st, _ in rows}
    print(json.dumps({f"round {r} ({matrix.get(r, 'baseline')})": outcome[r] for r in outcome}))
    assert sorted(outcome) == list(range(1, ROUNDS + 1))
    assert set(outcome.values()) <= {"done", "aborted"}
    assert outcome[1] == "done" and outcome[ROUNDS] == "done"  # the next round runs
    finished = [(r, tuple(json.loads(s))) for r, st, s in rows if st == "done"]
    want = expected_global(finished, DIM)
    for eid in ENTERPRISES:
        np.testing.assert_allclose(adapter_of(kits, eid), want, atol=2e-6, rtol=0)
        state = sqlite3.connect(kits.enterprises[eid] / "state.sqlite")
        charged = {r for (r,) in state.execute(
            "SELECT round FROM rounds WHERE status IN ('charged','done','aborted','lost',"
            "'rolled-back')")}  # a rolled-back round's update left: its charge stays
        ledger = [e.round_number for e in read_ledger(kits.enterprises[eid] / "ledger.sqlite")]
        assert len(ledger) == len(set(ledger)), ledger  # none doubled
        assert set(ledger) == charged  # none lost
        heads = {r for (r,) in db.execute(
            "SELECT round FROM transcript WHERE stage='upload' AND sender=?", (eid,))}
        assert heads <= charged
    # memory and connections back to baseline (a little slack for allocator noise)
    assert after[1] <= baseline[1] + 4, (baseline, after)
    assert after[0] <= baseline[0] * 1.25, (baseline, after)
