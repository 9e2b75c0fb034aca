"""Bring your own causal LM, end to end (issue 16): ``secfed model init`` on a tiny Llama-shaped
checkpoint, ``secfed federation init --model``, a coordinator and three ``secfed join --model
--data`` processes over mutual TLS on loopback for two rounds of DP LoRA fine-tuning on
instruction records, then every ledger within budget and ``secfed audit`` passing."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from e2e.harness import ENV, PY, free_port
from secfed.federation.kits import EnterpriseKit
from secfed.models.tiny import write_tiny_causal_lm
from secfed.privacy import read_ledger, verify_ledger

SITES = ("north-clinic", "south-clinic", "east-clinic")
BUDGET = 8.0


def _secfed(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "secfed.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=600, cwd=cwd)


def _site_data(root: Path, k: int) -> Path:
    root.mkdir(parents=True)
    lines = []
    for i in range(24):
        if i % 2:
            lines.append({"prompt": f"Site {k} report {i}: water under the bridge.\nAnswer:",
                          "completion": " hazard=flooding priority=medium"})
        else:
            lines.append({"messages": [{"role": "user", "content": f"smoke at depot {i}?"},
                                       {"role": "assistant", "content": "hazard=fire_smoke"}]})
    (root / "records.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.mark.slow
def test_three_sites_fine_tune_a_tiny_llama_over_mtls(tmp_path: Path) -> None:
    base = write_tiny_causal_lm(tmp_path / "base", arch="llama")
    model = tmp_path / "model"
    proc = _secfed("model", "init", "--base", base, "--task", "causal-lm", "--out", model,
                   "--max-length", 64)
    assert proc.returncode == 0, proc.stderr
    proc = _secfed("federation", "init", "--name", "byom", *[a for s in SITES
                                                             for a in ("--enterprise", s)],
                   "--coordinator-url", f"https://127.0.0.1:{free_port()}", "--model", model,
                   "--out", tmp_path / "kits", "--rounds", 2, "--mode-schedule", "secagg",
                   "--epsilon", BUDGET, "--sample-rate", 0.25, "--local-steps", 3,
                   "--learning-rate", 0.01, "--optimizer", "adam", "--stage-deadline", 60,
                   "--train-deadline", 300, "--json")
    assert proc.returncode == 0, proc.stderr
    kits = json.loads(proc.stdout)
    coordinator = Path(kits["coordinator"])
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("coordinator", *SITES)}
    procs = {"coordinator": subprocess.Popen(
        [PY, "-m", "secfed.cli.main", "aggregate", "--kit", str(coordinator), "--json"],
        stdout=logs["coordinator"], stderr=subprocess.STDOUT, env=ENV)}
    for k, site in enumerate(SITES):
        data = _site_data(tmp_path / f"data-{site}", k)
        procs[site] = subprocess.Popen(
            [PY, "-m", "secfed.cli.main", "join", "--kit", kits["enterprises"][site], "--model",
             str(model), "--data", str(data), "--test-data", str(data), "--new-ledger", "--json"],
            stdout=logs[site], stderr=subprocess.STDOUT, env=ENV)
    try:
        end = time.monotonic() + 900
        codes = {n: p.wait(timeout=max(1.0, end - time.monotonic())) for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for fh in logs.values():
            fh.close()
    tail = {n: (tmp_path / f"{n}.log").read_text()[-1500:] for n in procs}
    assert set(codes.values()) == {0}, tail

    db = sqlite3.connect(f"file:{coordinator / 'state.sqlite'}?mode=ro", uri=True)
    rounds = db.execute("SELECT round, status, survivors FROM rounds ORDER BY round").fetchall()
    assert [(r, s) for r, s, _ in rounds] == [(1, "done"), (2, "done")], tail
    assert all(set(json.loads(v)) == set(SITES) for _, _, v in rounds)
    adapters = []
    for site in SITES:
        kit = EnterpriseKit.load(Path(kits["enterprises"][site]))
        ledger = kit.root / "ledger.sqlite"
        report = verify_ledger(ledger, public_key=kit.identity().public_bytes())
        entries = read_ledger(ledger)
        assert [e.round_number for e in entries] == [1, 2]
        assert report.budget == BUDGET
        assert 0 < report.eps_rdp <= BUDGET and 0 < report.eps_prv <= BUDGET, report
        adapters.append(np.fromfile(kit.root / "adapter.f32", dtype="<f4"))
        # the site trained the causal LM: it reported a perplexity on its held-out records
        events = [json.loads(x) for x in (tmp_path / f"{site}.log").read_text().splitlines()
                  if x.startswith("{")]
        reports = [e for e in events if e.get("event") == "round_report"]
        assert reports and all("perplexity" in json.dumps(r) for r in reports), reports[-1:]
    assert all(np.array_equal(adapters[0], a) for a in adapters[1:])  # one global adapter
    assert np.abs(adapters[0]).max() > 0
    audit = _secfed("audit", *[a for s in SITES for a in (
        "--ledger", Path(kits["enterprises"][s]) / "ledger.sqlite")],
        "--transcript", coordinator / "state.sqlite",
        "--federation", coordinator / "federation.toml", "--out", tmp_path / "report")
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    assert "verdict: PASS" in audit.stdout
