"""`secfed audit` over a real networked federation: coordinator and three `secfed join` processes
over mutual TLS on loopback (the federation's own e2e harness), then the audit CLI in its own
process on the kits they left behind. Slow: separate processes and real rounds."""

from __future__ import annotations

import json
import subprocess

import jsonschema
import pytest
from e2e.harness import ENV, PY, Processes, make_federation

from secfed.audit import load_schema

from .tamper import delete_entry

ENTERPRISES = ["energy-utility", "security-operator", "city-ops"]


def _audit(kits, out):
    args = [
        PY,
        "-m",
        "secfed.cli.main",
        "audit",
        "--out",
        str(out),
        "--json",
        "--transcript",
        str(kits.coordinator / "state.sqlite"),
        "--federation",
        str(kits.coordinator / "federation.toml"),
    ]
    for eid in ENTERPRISES:
        kit = kits.enterprises[eid]
        args += ["--ledger", str(kit / "ledger.sqlite"), "--outbound", str(kit / "state.sqlite")]
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.mark.slow
def test_audit_of_a_networked_federation(tmp_path):
    kits = make_federation(
        tmp_path / "fed", enterprises=ENTERPRISES, dim=2000, schedule=("secagg", "ckks"), rounds=2
    )
    procs = Processes(kits)
    procs.start_coordinator()
    for eid in ENTERPRISES:
        procs.start_join(eid)
    try:
        codes = procs.wait(240)
    finally:
        procs.stop()
    assert codes == {e: 0 for e in [*ENTERPRISES, "coordinator"]}, procs.log("coordinator.0")

    ok = _audit(kits, tmp_path / "report")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    jsonschema.validate(doc, load_schema())
    assert doc["verdict"] == "pass"
    assert {c["status"] for c in doc["checks"]} == {"pass"}
    for ent in doc["enterprises"]:
        assert ent["rounds"] == [1, 2] and ent["identity_pinned"]
        protections = {
            (m["round_number"], m["protection"])
            for m in ent["outbound"]["messages"]
            if m["stage"] == "upload"
        }
        assert protections == {(1, "masked"), (2, "encrypted")}
    assert [r["mode"] for r in doc["federation"]["rounds"]] == ["secagg", "ckks"]

    # the newest charge deleted after the fact: the coordinator's stored head exposes it
    delete_entry(kits.enterprises["city-ops"] / "ledger.sqlite", 2)
    bad = _audit(kits, tmp_path / "report-bad")
    assert bad.returncode == 1
    doc = json.loads(bad.stdout)
    failed = [c for c in doc["checks"] if c["status"] == "fail"]
    assert {(c["subject"], c["name"], c["entry"]) for c in failed} >= {
        ("city-ops", "transcript_heads", 2)
    }
    assert "FAIL city-ops transcript_heads entry 2" in bad.stderr
