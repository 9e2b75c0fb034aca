"""End to end with verified norm probes (issue 17): separate processes, mutual TLS on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from e2e.harness import Processes, adapter_of, coordinator_db, expected_global, make_federation
from secfed.cli.main import cli
from secfed.config import federation_to_toml, load_federation

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
