"""The site's ledger charge runs beside key set-up and training, and still lands before its
update leaves: a slow charge holds the upload back; a failed charge sends no update at all, and the
other sites finish the round without it (its masks cancel). A real coordinator on loopback,
participants in-process."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from e2e.harness import Processes, adapter_of, expected_global, make_federation
from secfed.errors import LedgerError
from secfed.federation.kits import EnterpriseKit
from secfed.participant import Participant
from secfed.participant.adapter import SyntheticSite

ENTERPRISES = ["a-site", "b-site", "c-site", "d-site"]  # n = 4, t = 3: one dropout tolerated
SLOW, DIM = "a-site", 64


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("charge")
    kits = make_federation(root / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg",), rounds=2, train=8.0, stage=8.0)
    procs = Processes(kits)
    procs.start_coordinator()
    yield kits
    procs.stop()


def _round(kits, patch) -> dict[str, object]:
    """One round with every enterprise in its own thread; ``patch(eid, participant)`` first."""
    out: dict[str, object] = {}

    def take_part(eid: str) -> None:
        kit = EnterpriseKit.load(kits.enterprises[eid])
        p = Participant(kit, SyntheticSite(kit.root, eid, kit.federation.model), retry_for=60.0,
                        new_ledger=True)
        try:
            patch(eid, p)
            out[eid] = p.run(max_rounds=1)[0]
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            out[eid] = exc
        finally:
            out[eid + ":outbound"] = p.state.db.execute(
                "SELECT round, stage, sent_at FROM outbound ORDER BY seq").fetchall()
            out[eid + ":entries"] = [(e.round_number, e.timestamp) for e in p.ledger._ledger.entries()]
            p.close()

    threads = [threading.Thread(target=take_part, args=(e,)) for e in ENTERPRISES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_slow_charge_holds_the_upload_and_a_failed_charge_sends_nothing(federation) -> None:
    kits = federation

    def slow(eid: str, p: Participant) -> None:
        if eid == SLOW:
            real = p.ledger.charge_round

            def charge(**kwargs):
                time.sleep(1.0)  # longer than the (instant) stand-in training
                return real(**kwargs)

            p.ledger.charge_round = charge  # type: ignore[method-assign]

    out = _round(kits, slow)
    for eid in ENTERPRISES:
        assert getattr(out[eid], "status", out[eid]) == "done", out[eid]
    sent = {stage: at for r, stage, at in out[SLOW + ":outbound"] if r == 1}
    ((round_number, charged_at),) = out[SLOW + ":entries"]
    assert round_number == 1
    assert sent["advertise"] < charged_at  # key set-up did not wait for the charge
    assert charged_at <= sent["upload"]  # the update did

    def failing(eid: str, p: Participant) -> None:
        if eid == SLOW:
            def charge(**kwargs):
                raise LedgerError("ledger write failed (test)")

            p.ledger.charge_round = charge  # type: ignore[method-assign]

    out = _round(kits, failing)
    assert isinstance(out[SLOW], LedgerError), out[SLOW]
    stages = [stage for r, stage, _ in out[SLOW + ":outbound"] if r == 2]
    assert "advertise" in stages and "upload" not in stages  # keys went out, the update never
    assert [r for r, _ in out[SLOW + ":entries"]] == [1]
    survivors = tuple(e for e in ENTERPRISES if e != SLOW)
    for eid in survivors:
        report = out[eid]
        assert getattr(report, "status", report) == "done", report
        assert tuple(report.survivors) == survivors  # type: ignore[union-attr]
    want = expected_global([(1, tuple(ENTERPRISES)), (2, survivors)], DIM)
    for eid in survivors:
        np.testing.assert_allclose(adapter_of(kits, eid), want, atol=1e-5)
