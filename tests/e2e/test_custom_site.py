"""The public Python API: ``secfed.Site`` + ``secfed.join`` with a user's own model and loop.

``examples/custom_site.py`` (a plain PyTorch DP-SGD loop over an MLP) federates against a real
coordinator over mutual TLS on loopback; a site that reports another DP mechanism than the
round's terms is refused after the ledger charge, before its update leaves."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import secfed
from e2e.harness import ENV, PY, Processes, adapter_of, free_port
from secfed.config import Deadlines, DPSettings, RoundTerms
from secfed.errors import ConfigError, DPGuardError
from secfed.federation.kits import EnterpriseKit, create_kits
from secfed.participant.site import DrivenSite
from secfed.privacy.ledger import read_ledger

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_site.py"


def _example():
    spec = importlib.util.spec_from_file_location("custom_site_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kits(root: Path, enterprises: list[str], vector: np.ndarray, *, rounds: int):
    return create_kits(
        root, name="custom", enterprises=enterprises,
        coordinator_url=f"https://127.0.0.1:{free_port()}",
        model=secfed.site_settings(vector), rounds=rounds,
        deadlines=Deadlines(train=60.0, stage=6.0, applied=6.0),
        dp=DPSettings(noise_multiplier=1.0, sample_rate=0.1, local_steps=8, learning_rate=0.5,
                      max_grad_norm=1.0),
    )


def _join_all(kits, sites: dict[str, object], *, max_rounds: int) -> dict[str, object]:
    out: dict[str, object] = {}

    def take_part(eid: str) -> None:
        try:
            out[eid] = secfed.join(kits.enterprises[eid], sites[eid], new_ledger=True,
                                   max_rounds=max_rounds)
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            out[eid] = exc

    threads = [threading.Thread(target=take_part, args=(e,)) for e in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def test_custom_sites_federate_their_own_pytorch_model(tmp_path) -> None:
    example = _example()
    enterprises = ["acme", "globex", "initech"]
    sites = {e: example.TabularSite(e) for e in enterprises}
    start = sites["acme"].global_vector()
    kits = _kits(tmp_path / "fed", enterprises, start, rounds=2)
    procs = Processes(kits)
    procs.start_coordinator()
    try:
        out = _join_all(kits, sites, max_rounds=2)
    finally:
        procs.stop()
    final = adapter_of(kits, "acme")
    assert not np.allclose(final, start)  # the federation moved the user's model
    for eid in enterprises:
        reports = out[eid]
        assert [r.status for r in reports] == ["done", "done"], reports  # type: ignore[union-attr]
        assert reports[-1].survivors == tuple(enterprises)  # type: ignore[union-attr]
        np.testing.assert_array_equal(adapter_of(kits, eid), final)
        # apply() handed the aggregate to the user's model itself
        np.testing.assert_array_equal(sites[eid].global_vector(), final)
        ledger = read_ledger(kits.enterprises[eid] / "ledger.sqlite")
        assert [e.round_number for e in ledger] == [1, 2]
        assert 0 < reports[-1].epsilon <= EnterpriseKit.load(  # type: ignore[union-attr]
            kits.enterprises[eid]).policy.budget_epsilon


class _LyingSite:
    """Trains fewer steps than the round asks and says so: the ledger's charge must not shrink."""

    def __init__(self, dim: int) -> None:
        self.vec = np.zeros(dim, np.float32)

    def global_vector(self) -> np.ndarray:
        return self.vec

    def train(self, terms: RoundTerms) -> secfed.Update:
        return secfed.Update(delta=np.full(self.vec.size, 0.01, np.float32),
                             mechanism=secfed.Mechanism(noise_multiplier=terms.noise_multiplier,
                                                        sample_rate=terms.sample_rate,
                                                        steps=terms.local_steps - 1))

    def apply(self, new_global: np.ndarray) -> None:
        self.vec = new_global

    def evaluate(self) -> dict[str, float]:
        return {}


def test_a_site_reporting_another_mechanism_is_refused_after_the_charge(tmp_path) -> None:
    enterprises = ["liar", "b-site", "c-site", "d-site"]  # t = 3: the round survives one loss
    dim = 16
    kits = _kits(tmp_path / "fed", enterprises, np.zeros(dim, np.float32), rounds=1)
    honest = {e: _LyingSite(dim) for e in enterprises[1:]}
    for site in honest.values():  # honest: report exactly what the terms fix
        site.train = (lambda s: lambda terms: secfed.Update(  # type: ignore[method-assign]
            delta=np.full(dim, 0.01, np.float32), mechanism=secfed.Mechanism(
                terms.noise_multiplier, terms.sample_rate, terms.local_steps)))(site)
    procs = Processes(kits)
    procs.start_coordinator()
    try:
        out = _join_all(kits, {"liar": _LyingSite(dim), **honest}, max_rounds=1)
    finally:
        procs.stop()
    assert isinstance(out["liar"], DPGuardError), out["liar"]
    assert "steps" in str(out["liar"]) and "not sent" in str(out["liar"])
    # the charge for the round's own terms stays; the update never left
    (entry,) = read_ledger(kits.enterprises["liar"] / "ledger.sqlite")
    terms = EnterpriseKit.load(kits.enterprises["liar"]).federation.dp
    assert entry.round_number == 1
    assert (entry.event.noise_multiplier, entry.event.sample_rate, entry.event.steps) == (
        terms.noise_multiplier, terms.sample_rate, terms.local_steps)
    with sqlite3.connect(kits.enterprises["liar"] / "state.sqlite") as db:
        stages = {s for (s,) in db.execute("SELECT stage FROM outbound WHERE round = 1")}
    assert "advertise" in stages and "upload" not in stages
    for eid in enterprises[1:]:
        (report,) = out[eid]  # type: ignore[misc]
        assert report.status == "done" and report.survivors == tuple(enterprises[1:]), report


def test_driven_site_refuses_bad_updates_and_a_vector_the_kit_was_not_made_for(tmp_path) -> None:
    dim = 8
    kits = _kits(tmp_path / "fed", ["a", "b", "c"], np.zeros(dim, np.float32), rounds=1)
    kit = EnterpriseKit.load(kits.enterprises["a"])
    terms = RoundTerms(round_number=1, mode="secagg", participants=("a", "b", "c"), threshold=2,
                       min_participants=2, noise_multiplier=1.0, sample_rate=0.1, local_steps=8,
                       max_grad_norm=1.0, learning_rate=0.5, optimizer="sgd", delta=1e-5)
    site = _LyingSite(dim)
    driven = DrivenSite(kit.root, kit.federation.model, site)
    honest = secfed.Mechanism(1.0, 0.1, 8)
    for bad in (np.zeros(dim + 1, np.float32), np.full(dim, np.nan, np.float32)):
        site.train = lambda t, d=bad: secfed.Update(d, honest)  # type: ignore[method-assign]
        with pytest.raises(DPGuardError, match="update.delta"):
            driven.train(terms)
    site.train = lambda t: (np.zeros(dim), honest)  # type: ignore[method-assign]
    with pytest.raises(DPGuardError, match="secfed.Update"):
        driven.train(terms)
    site.train = lambda t: secfed.Update(np.ones(dim), honest)  # type: ignore[method-assign]
    assert driven.train(terms).delta.dtype == np.float32
    other = _LyingSite(dim)
    other.vec = np.ones(dim, np.float32)
    with pytest.raises(ConfigError, match="initial_global_hash"):
        DrivenSite(tmp_path / "other-kit-root", kit.federation.model, other)
    with pytest.raises(ConfigError, match="secfed.Site"):
        DrivenSite(kit.root, kit.federation.model, object())  # type: ignore[arg-type]


@pytest.mark.slow  # four processes, each importing torch
def test_the_example_script_runs_as_written(tmp_path) -> None:
    kit_root = tmp_path / "kits"
    url = f"https://127.0.0.1:{free_port()}"
    names = ["acme", "globex", "initech"]
    args = [PY, str(EXAMPLE), "init", "--out", str(kit_root), "--rounds", "2", "--url", url]
    for n in names:
        args += ["--enterprise", n]
    subprocess.run(args, check=True, env=ENV, timeout=120)
    coordinator = subprocess.Popen([PY, "-m", "secfed.cli.main", "aggregate", "--kit",
                                    str(kit_root / "coordinator")], env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        joins = {n: subprocess.Popen([PY, str(EXAMPLE), "join", "--kit", str(kit_root / n),
                                      "--new-ledger"], env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for n in names}
        results = {n: p.communicate(timeout=300) for n, p in joins.items()}
    finally:
        coordinator.kill()
        coordinator.wait()
    for n, (stdout, stderr) in results.items():
        assert joins[n].returncode == 0, stderr[-2000:]
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["rounds_done"] == 2 and summary["epsilon"] > 0, summary
    assert sys.executable  # the same interpreter ran every process
