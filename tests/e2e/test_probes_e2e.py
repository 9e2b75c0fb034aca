"""End to end with verified norm probes (issue 17): separate processes, mutual TLS on loopback."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from e2e.harness import Processes, adapter_of, coordinator_db, expected_global, make_federation
from secfed.cli.main import cli
from secfed.config import federation_to_toml, load_federation
from secfed.federation.kits import EnterpriseKit
from secfed.participant import Participant
from secfed.participant.adapter import SyntheticSite

DIM = 3000
ENTERPRISES = ["energy-utility", "security-operator", "city-ops"]


def _with_probes(root: Path, probes: int) -> None:
    """Every party's copy of federation.toml gains ``probes`` (all copies stay identical)."""
    for path in sorted(root.rglob("federation.toml")):
        fed = load_federation(path)
        model = fed.model.model_copy(update={"ring_bits": 64})  # probes need Z_2^64
        path.write_text(federation_to_toml(fed.model_copy(update={"probes": probes, "model": model})))


@pytest.mark.slow  # two rounds over real processes: ~2 minutes on the 2-core machine
def test_probed_rounds_sum_exactly_and_record_shares(tmp_path) -> None:
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg", "ckks"), rounds=2)
    _with_probes(kits.root, 32)
    procs = Processes(kits)
    procs.start_coordinator()
    for eid in ENTERPRISES:
        procs.start_join(eid)
    try:
        codes = procs.wait(150)
    finally:
        procs.stop()
    assert codes == {e: 0 for e in [*ENTERPRISES, "coordinator"]}, procs.log("coordinator.0")
    db = coordinator_db(kits)
    rounds = db.execute("SELECT round, mode, status, survivors FROM rounds ORDER BY round").fetchall()
    assert [(r[0], r[1], r[2]) for r in rounds] == [(1, "secagg", "done"), (2, "ckks", "done")]
    survivors = [(r[0], tuple(json.loads(r[3]))) for r in rounds]
    want = expected_global(survivors, DIM)
    for eid in ENTERPRISES:
        np.testing.assert_allclose(adapter_of(kits, eid).astype(np.float64), want, atol=2e-6, rtol=0)
    stages = {s for (s,) in db.execute("SELECT DISTINCT stage FROM transcript WHERE round = 1")}
    assert {"probe", "contribute"} <= stages
    assert not db.execute("SELECT 1 FROM transcript WHERE round = 2 AND stage = 'probe'").fetchall()
    res = CliRunner().invoke(cli, ["contributions", "--transcript",
                                   str(kits.coordinator / "state.sqlite"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert [r["round"] for r in report["rounds"]] == [1]  # the ckks round carries no probes
    first = report["rounds"][0]
    assert first["excluded"] == [] and set(first["norm_estimates"]) == set(ENTERPRISES)
    assert abs(sum(first["shares"].values()) - 1.0) < 1e-9
    assert first["revealed_scalars"] == {e: 33 for e in ENTERPRISES}
    assert set(report["cumulative"]) == set(ENTERPRISES)


def test_contribution_reports_ride_on_the_applied_confirmations(tmp_path) -> None:
    """A probed round has no contribute round trip of its own: each site sends its contribution
    report on its applied confirmation (the same bytes it records as sent), the coordinator
    takes it as the contribute stage's message (the same transcript row), and the shares and
    ``secfed contributions`` are as before. Sites in-process, the coordinator a real process."""
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=16,
                           schedule=("secagg",), rounds=1)
    _with_probes(kits.root, 8)
    procs = Processes(kits)
    procs.start_coordinator()
    posted: dict[str, list[str]] = {e: [] for e in ENTERPRISES}
    carried: dict[str, bytes] = {}
    reports: dict[str, object] = {}

    def take_part(eid: str) -> None:
        kit = EnterpriseKit.load(kits.enterprises[eid])
        p = Participant(kit, SyntheticSite(kit.root, eid, kit.federation.model),
                        retry_for=60.0, new_ledger=True)
        submit, exchange, confirm = p.client.submit, p.client.exchange, p.client.confirm

        def spy_submit(envelope, **kw):
            posted[eid].append(envelope.stage)
            return submit(envelope, **kw)

        def spy_exchange(envelope, **kw):
            posted[eid].append(envelope.stage)
            return exchange(envelope, **kw)

        def spy_confirm(*, round_number, confirmation, until=None):
            carried[eid] = bytes.fromhex(confirmation.contribution_hex)
            return confirm(round_number=round_number, confirmation=confirmation, until=until)

        p.client.submit, p.client.exchange = spy_submit, spy_exchange  # type: ignore[method-assign]
        p.client.confirm = spy_confirm  # type: ignore[method-assign]
        try:
            reports[eid] = p.run()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            reports[eid] = exc
        finally:
            p.close()

    threads = [threading.Thread(target=take_part, args=(e,)) for e in ENTERPRISES]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = procs.wait(60)
    finally:
        procs.stop()
    assert codes["coordinator"] == 0, procs.log("coordinator.0")
    assert all(isinstance(reports[e], list) for e in ENTERPRISES), reports
    for eid in ENTERPRISES:
        assert "upload" in posted[eid] and "contribute" not in posted[eid], posted[eid]
    db = coordinator_db(kits)
    assert db.execute("SELECT status FROM rounds WHERE round = 1").fetchone() == ("done",)
    got = dict(db.execute("SELECT sender, payload FROM transcript WHERE round = 1 AND stage = ?",
                          ("contribute",)))
    assert set(got) == set(ENTERPRISES) and all(carried[e] for e in ENTERPRISES)
    assert {e: bytes(v) for e, v in got.items()} == carried
    for eid in ENTERPRISES:  # the site's own outbound record holds the same bytes
        state = sqlite3.connect(kits.enterprises[eid] / "state.sqlite")
        rows = [h for (h,) in state.execute(
            "SELECT sha256 FROM outbound WHERE round = 1 AND stage = 'contribute'")]
        state.close()
        assert rows == [hashlib.sha256(carried[eid]).hexdigest()]
    res = CliRunner().invoke(cli, ["contributions", "--transcript",
                                   str(kits.coordinator / "state.sqlite"), "--json"])
    assert res.exit_code == 0, res.output
    first = json.loads(res.output)["rounds"][0]
    assert first["disputed"] == [] and first["excluded"] == []
    assert set(first["shares"]) == set(ENTERPRISES)
    assert abs(sum(first["shares"].values()) - 1.0) < 1e-9
    assert first["revealed_scalars"] == {e: 9 for e in ENTERPRISES}
