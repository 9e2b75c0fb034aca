"""A round the coordinator aborts at its confirmation stage does not stall the federation.

Every site applies the round's sum before the coordinator records the round as done; when no
confirmation reaches the coordinator by the ``applied`` deadline (lost in the network, or late)
it aborts the round and keeps the old global hash. Sites left one step ahead used to refuse
every later round ("global_hash must be this site's adapter hash"). Now each site rolls back to
the adapter it kept -- only when the coordinator's outcome of that round says ``aborted`` and
names exactly that adapter's hash -- and the next round finishes with the exact sum; the last
round's rollback happens once the federation has finished. A real coordinator process on
loopback, participants in-process (their confirmations dropped or delayed by a wrapper).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading

import numpy as np
import pytest
from click.testing import CliRunner

from e2e.harness import (
    Processes,
    adapter_of,
    coordinator_db,
    expected_global,
    make_federation,
    wait_for,
)
from secfed.cli.main import cli
from secfed.coordinator.service import Coordinator
from secfed.errors import ProtocolAbort
from secfed.federation.kits import CoordinatorKit, EnterpriseKit
from secfed.participant import Participant
from secfed.participant.adapter import SyntheticSite
from secfed.privacy import read_ledger
from secfed.transport.api import AppliedConfirmation, applied_signed_bytes, status_for
from secfed.transport.client import CoordinatorUnreachable

ENTERPRISES = ["a-site", "b-site", "c-site"]  # secagg, n = 3
LATE = "c-site"  # its confirmation of a lost round arrives after the abort; the others' vanish
LOST = (1, 3)  # rounds whose confirmations never reach the coordinator in time (3 is the last)
DIM = 16


def _status(kits, r: int) -> str | None:
    with coordinator_db(kits) as db:
        row = db.execute("SELECT status FROM rounds WHERE round=?", (r,)).fetchone()
    return row[0] if row else None


def _run_sites(kits) -> tuple[dict[str, object], dict[str, list[dict]], dict[str, Exception]]:
    reports: dict[str, object] = {}
    events: dict[str, list[dict]] = {e: [] for e in ENTERPRISES}
    late: dict[str, Exception] = {}

    def take_part(eid: str) -> None:
        kit = EnterpriseKit.load(kits.enterprises[eid])
        p = Participant(kit, SyntheticSite(kit.root, eid, kit.federation.model),
                        events=events[eid].append, retry_for=60.0, new_ledger=True)
        real = p.client.confirm

        def confirm(*, round_number: int, confirmation, until=None):
            if round_number not in LOST:
                return real(round_number=round_number, confirmation=confirmation, until=until)
            if eid != LATE:
                raise CoordinatorUnreachable(f"POST applied of round {round_number}: lost")
            assert wait_for(lambda: _status(kits, round_number) == "aborted", 30.0, 0.02)
            try:
                return real(round_number=round_number, confirmation=confirmation, until=until)
            except ProtocolAbort as exc:
                late[f"{eid}/{round_number}"] = exc
                raise

        p.client.confirm = confirm  # type: ignore[method-assign]
        try:
            reports[eid] = p.run()
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            reports[eid] = exc
        finally:
            p.close()

    threads = [threading.Thread(target=take_part, args=(e,)) for e in ENTERPRISES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return reports, events, late


def _audit(kits, out) -> tuple[int, str | None, str]:
    """``secfed audit`` over every ledger and outbound log, the transcript and federation.toml
    (the CLI command, run in-process: a fresh interpreter costs more than the audit)."""
    args = ["audit", "--out", str(out), "--json",
            "--transcript", str(kits.coordinator / "state.sqlite"),
            "--federation", str(kits.coordinator / "federation.toml")]
    for kit_dir in kits.enterprises.values():
        args += ["--ledger", str(kit_dir / "ledger.sqlite"),
                 "--outbound", str(kit_dir / "state.sqlite")]
    done = CliRunner().invoke(cli, args)
    try:
        verdict = json.loads(done.stdout).get("verdict")
    except ValueError:
        verdict = None
    return done.exit_code, verdict, done.output[-3000:]


@pytest.mark.timeout(180)
def test_rounds_aborted_at_confirmation_are_rolled_back_and_the_federation_goes_on(
        tmp_path) -> None:
    # applied = 1.5 s: the confirmation deadline; between = 1 s: a late confirmation meets the
    # aborted round itself (not yet the next one)
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg",), rounds=3, train=20.0, stage=20.0, applied=1.5,
                           between=1.0)
    procs = Processes(kits)
    procs.start_coordinator()
    try:
        reports, events, late = _run_sites(kits)
        codes = procs.wait(60)
    finally:
        procs.stop()
    assert codes["coordinator"] == 0, procs.log("coordinator.0")
    for eid in ENTERPRISES:
        assert isinstance(reports[eid], list), reports[eid]
    db = coordinator_db(kits)
    rows = db.execute("SELECT round, status, survivors, abort_reason FROM rounds"
                      " ORDER BY round").fetchall()
    status = {r: st for r, st, _, _ in rows}
    assert status == {1: "aborted", 2: "done", 3: "aborted"}, rows
    assert all("no survivor confirmed" in (why or "") for r, _, _, why in rows if r in LOST), rows
    # the round after the aborted one ran with every site, and its sum is exact
    survivors = json.loads(rows[1][2])
    assert sorted(survivors) == ENTERPRISES
    want = expected_global([(2, tuple(survivors))], DIM)  # the finished rounds only
    for eid in ENTERPRISES:
        np.testing.assert_allclose(adapter_of(kits, eid), want, atol=2e-6, rtol=0)
        kinds = [(e["event"], e.get("round")) for e in events[eid]]
        assert ("rolled_back", 1) in kinds and ("rolled_back", 3) in kinds, kinds
        state = sqlite3.connect(kits.enterprises[eid] / "state.sqlite")
        rounds = dict(state.execute("SELECT round, status FROM rounds"))
        assert rounds == {1: "rolled-back", 2: "done", 3: "rolled-back"}, rounds
        # the charges stay (each update left its site), none lost or doubled
        ledger = [e.round_number for e in read_ledger(kits.enterprises[eid] / "ledger.sqlite")]
        assert ledger == [1, 2, 3], ledger
    # a valid confirmation after the abort gets a clear refusal (410), not an error
    assert set(late) == {f"{LATE}/1", f"{LATE}/3"}, late
    for exc in late.values():
        assert "410" in str(exc) and "was aborted" in str(exc), exc
    code, verdict, out = _audit(kits, tmp_path / "audit")
    assert (code, verdict) == (0, "pass"), out


def test_a_valid_confirmation_after_the_abort_is_refused_clearly(tmp_path) -> None:
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg",), rounds=2)
    c = Coordinator(CoordinatorKit.load(kits.coordinator))
    kit = EnterpriseKit.load(kits.enterprises[LATE])
    new_hash = "ab" * 32
    signature = kit.identity().sign(applied_signed_bytes(
        federation=kit.federation.name, round_number=1, global_hash=new_hash))
    confirmation = AppliedConfirmation(global_hash=new_hash, signature_hex=signature.hex())
    reason = "no survivor confirmed a new global hash before the deadline"
    try:
        c._open_round(1)
        assert c._live is not None
        c.state.abort_round(1, reason)  # what _finish does when no confirmation came in time
        c._live.status, c._live.abort_reason = "aborted", reason
        with pytest.raises(ProtocolAbort, match="round 1 was aborted .*refused") as caught:
            asyncio.run(c.confirm(sender=LATE, round_number=1, confirmation=confirmation))
        assert status_for(caught.value) == 410
        assert c.state.confirmations(1) == {}  # nothing recorded for an aborted round
    finally:
        c.state.close()


def test_a_survivor_gone_after_its_upload_is_not_waited_for_at_confirmation(tmp_path) -> None:
    """Its update is in the sum (its masks are recovered), but it answers nothing after the
    upload: the round is done once the survivors still taking part confirmed, not at the
    ``applied`` deadline (which a soak with dropouts paid in a third of its rounds)."""
    sites = ["a-site", "b-site", "c-site", "d-site", "e-site"]  # t = 3: 4 sign the survivor set
    gone = "e-site"
    kits = make_federation(tmp_path / "fed", enterprises=sites, dim=DIM, schedule=("secagg",),
                           rounds=1, train=20.0, stage=3.0, applied=30.0, threshold=3)
    procs = Processes(kits)
    procs.start_coordinator()
    reports: dict[str, object] = {}

    def take_part(eid: str) -> None:
        kit = EnterpriseKit.load(kits.enterprises[eid])
        p = Participant(kit, SyntheticSite(kit.root, eid, kit.federation.model),
                        retry_for=60.0, new_ledger=True)
        if eid == gone:
            exchange = p.client.exchange

            def upload_then_vanish(envelope, **kw):
                if envelope.stage == "upload":
                    p.client.submit(envelope, until=kw.get("until"))
                    raise CoordinatorUnreachable("gone after its upload")
                return exchange(envelope, **kw)

            p.client.exchange = upload_then_vanish  # type: ignore[method-assign]
        try:
            reports[eid] = p.run()
        finally:
            p.close()

    threads = [threading.Thread(target=take_part, args=(e,)) for e in sites]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = procs.wait(60)
    finally:
        procs.stop()
    assert codes["coordinator"] == 0, procs.log("coordinator.0")
    events = [json.loads(x) for x in procs.log("coordinator.0").splitlines() if x.startswith("{")]
    at = {e["event"]: e["at"] for e in events if e.get("round") == 1}
    assert "round_done" in at, procs.log("coordinator.0")[-3000:]
    assert at["round_done"] - at["aggregated"] < 15.0, at  # not the 30 s applied deadline
    row = coordinator_db(kits).execute("SELECT survivors FROM rounds WHERE round=1").fetchone()
    survivors = tuple(json.loads(row[0]))
    assert gone in survivors  # its update is in the sum
    want = expected_global([(1, survivors)], DIM)
    for eid in sites:
        if eid != gone:
            np.testing.assert_allclose(adapter_of(kits, eid), want, atol=2e-6, rtol=0)
    assert [r.status for r in reports[gone]] == ["aborted"]  # type: ignore[union-attr]


def test_a_retried_confirmation_of_a_done_round_is_acknowledged_after_the_next_opened(
        tmp_path) -> None:
    """The soak's loaded coordinator answered a confirmation too late for the site's read
    timeout; the site's retry arrived after the next round opened and was refused, and the site
    recorded its done round as aborted. An exact duplicate is acknowledged; anything else for
    an earlier round is still refused."""
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg",), rounds=3)
    c = Coordinator(CoordinatorKit.load(kits.coordinator))
    kit = EnterpriseKit.load(kits.enterprises[LATE])

    def confirmation(global_hash: str) -> AppliedConfirmation:
        signature = kit.identity().sign(applied_signed_bytes(
            federation=kit.federation.name, round_number=1, global_hash=global_hash))
        return AppliedConfirmation(global_hash=global_hash, signature_hex=signature.hex())

    sent = confirmation("ab" * 32)
    try:
        c._open_round(1)
        with c.state.transaction():  # recorded when it first arrived; the round then finished
            c.state.confirm(1, LATE, sent.global_hash, bytes.fromhex(sent.signature_hex))
        c.state.finish_round(1, global_hash_after=sent.global_hash)
        c._global_hash = sent.global_hash
        c._open_round(2)
        ack = asyncio.run(c.confirm(sender=LATE, round_number=1, confirmation=sent))
        assert ack.accepted and ack.duplicate and ack.round_number == 1
        with pytest.raises(ProtocolAbort, match="a message for an earlier round is refused"):
            asyncio.run(c.confirm(sender=LATE, round_number=1,
                                  confirmation=confirmation("cd" * 32)))
        with pytest.raises(ProtocolAbort, match="a message for an earlier round is refused"):
            asyncio.run(c.confirm(sender=ENTERPRISES[0], round_number=1, confirmation=sent))
        assert c.state.confirmations(1) == {
            LATE: (sent.global_hash, bytes.fromhex(sent.signature_hex))}
    finally:
        c.state.close()
