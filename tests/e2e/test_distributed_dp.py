"""Enterprise-level (distributed) DP wired end to end: settings, round terms, site policy, the
noise hook in the join loop, ledger charges and the decoded FedAvg.

The federation test runs a coordinator process and one ``secfed join`` process per enterprise
over real mutual TLS on loopback (synthetic sites); the others need no network.
"""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import chi2, norm

from e2e.harness import (
    Processes,
    adapter_of,
    coordinator_db,
    expected_global,
    make_federation,
    wait_for,
)
from secfed.config import (
    DistributedDPSettings,
    DPSettings,
    FederationConfig,
    ModelSettings,
    RosterEntry,
    RoundTerms,
    SitePolicy,
    federation_to_toml,
    load_federation,
    load_site_policy,
)
from secfed.crypto.keys import IdentityKey
from secfed.errors import BudgetExceeded, ConfigError, DPGuardError, HeadroomError
from secfed.federation.kits import EnterpriseKit
from secfed.participant.ledger import open_site_ledger
from secfed.participant.noise import distributed_hook, hook_from_settings
from secfed.privacy import DistributedDPEvent, DPSGDEvent, read_ledger, verify_ledger
from secfed.privacy.distributed import rounded_norm_bound
from secfed.protocol import RoundSpec

ALPHA = 1e-6  # two-sided level of each statistical check
DIM = 20_000  # coordinates: the chi-square interval for the variance is about +-5 %
SCALE_BITS = 24
DDP = DistributedDPSettings(clip_norm=1.0, noise_multiplier=2.0, min_participants=3)
# The federation run uses a small central sigma so that the FedAvg signal (norm ~0.58) stands
# 11 noise standard deviations above the noise along its own direction: a sum that lost the
# updates would fail. Its epsilon (~77 per round, counting 3 - 1 shares: the sites' default
# assumed_colluders = 1) needs a budget to match.
DDP_RUN = DistributedDPSettings(clip_norm=1.0, noise_multiplier=0.15, min_participants=3)
SGD = DPSettings(noise_multiplier=1.0, sample_rate=0.01, local_steps=5, target_epsilon=96.0,
                 distributed=DDP_RUN)


# ------------------------------------------------------------------------------ no network

def _federation(n: int, *, ddp: DistributedDPSettings | None = DDP,
                schedule: tuple[str, ...] = ("secagg",), **kw) -> FederationConfig:
    roster = tuple(RosterEntry(id=f"site-{i}",
                               identity_public_key=IdentityKey.generate().public_bytes().hex())
                   for i in range(n))
    return FederationConfig(
        name="f", coordinator_url="https://127.0.0.1:8443", roster=roster,
        coordinator_identity_public_key=IdentityKey.generate().public_bytes().hex(),
        mode_schedule=schedule, threshold=kw.pop("threshold", 3),
        min_participants=kw.pop("min_participants", 3),
        dp=DPSettings(distributed=ddp), model=ModelSettings(vector_length=64, initial_global_hash="0"),
    )


def _spec_terms(fed: FederationConfig, *, mode: str = "secagg",
                ddp: DistributedDPSettings | None = DDP) -> tuple[RoundSpec, RoundTerms]:
    ids = fed.enterprise_ids()
    spec = RoundSpec.create(federation=fed.name, round_number=1, mode=mode, participants=ids,
                            vector_length=64,
                            threshold=fed.threshold if mode == "secagg" else None,
                            min_participants=fed.min_participants if mode != "secagg+" else None)
    terms = RoundTerms(round_number=1, mode=mode, participants=ids, threshold=spec.threshold,
                       min_participants=spec.min_participants, noise_multiplier=1.0,
                       sample_rate=0.01, local_steps=5, max_grad_norm=1.0, learning_rate=0.05,
                       delta=1e-5, distributed_dp=ddp)
    return spec, terms


def test_site_refuses_a_round_whose_guaranteed_shares_are_below_its_minimum() -> None:
    # secagg n = 4, t = 2 holders besides each responder, min_participants 3: 3 shares
    # guaranteed (with t = 3 all 4 must survive since issue 20: 4 guaranteed)
    fed = _federation(4, threshold=2)
    spec, terms = _spec_terms(fed)
    strict = SitePolicy(enterprise_id="site-0", min_noise_shares=4)
    with pytest.raises(DPGuardError, match=r"noise shares must be >= 4 by site policy \(got 3"):
        distributed_hook(federation=fed, policy=strict, spec=spec, terms=terms)
    ok = SitePolicy(enterprise_id="site-0", min_noise_shares=3)
    hook = distributed_hook(federation=fed, policy=ok, spec=spec, terms=terms)
    # 3 guaranteed, 1 of them assumed known to the adversary (the default assumed_colluders)
    assert ok.assumed_colluders == 1
    assert hook is not None and hook.planned_event(spec).shares == 3 - 1
    # a coordinator announcing other settings than the pinned federation.toml is refused
    weaker = DDP.model_copy(update={"noise_multiplier": 0.5})
    with pytest.raises(ConfigError, match="must equal this site's federation.toml"):
        distributed_hook(federation=fed, policy=ok, spec=spec, terms=_spec_terms(fed, ddp=weaker)[1])
    with pytest.raises(ConfigError, match="must equal"):  # dropped silently: refused too
        distributed_hook(federation=fed, policy=ok, spec=spec, terms=_spec_terms(fed, ddp=None)[1])
    # a site that does not accept distributed DP refuses by policy (terms check and hook check)
    refuser = SitePolicy(enterprise_id="site-0", accept_distributed_dp=False)
    with pytest.raises(ConfigError, match="accept_distributed_dp = false"):
        refuser.check_round(terms, roster=fed.enterprise_ids())
    with pytest.raises(ConfigError, match="accept_distributed_dp = false"):
        distributed_hook(federation=fed, policy=refuser, spec=spec, terms=terms)
    off = _federation(4, ddp=None)
    assert distributed_hook(federation=off, policy=refuser, spec=spec,
                            terms=_spec_terms(off, ddp=None)[1]) is None


def test_below_min_participants_refused_unless_forced_and_ckks_refused() -> None:
    with pytest.raises(ValueError, match=r"min_participants = 10 needs .* \(got 4\)"):
        _federation(4, ddp=DistributedDPSettings())
    forced = _federation(4, ddp=DistributedDPSettings(force=True))
    spec, terms = _spec_terms(forced, ddp=forced.dp.distributed)
    hook = distributed_hook(federation=forced, policy=SitePolicy(enterprise_id="site-0"),
                            spec=spec, terms=terms)
    assert hook is not None and hook.force
    with pytest.raises(ValueError, match=r"needs mask modes .* must not contain \['ckks'\]"):
        _federation(4, schedule=("secagg", "ckks"))
    # a ckks round announced anyway (coordinator not following the file) is refused by the site
    spec, terms = _spec_terms(_federation(4), mode="ckks")
    with pytest.raises(ConfigError, match="needs a mask mode"):
        distributed_hook(federation=_federation(4), policy=SitePolicy(enterprise_id="site-0"),
                         spec=spec, terms=terms)


def test_ring_headroom_for_the_noise_is_checked() -> None:
    loud = DistributedDPSettings(clip_norm=4.0, noise_multiplier=50.0, min_participants=3)
    fed = _federation(4, ddp=loud)
    spec, terms = _spec_terms(fed, ddp=loud)
    spec32 = RoundSpec.create(federation="f", round_number=1, mode="secagg",
                              participants=fed.enterprise_ids(), vector_length=64, ring_bits=32,
                              threshold=3, min_participants=3)
    with pytest.raises(HeadroomError, match="headroom"):
        distributed_hook(federation=fed, policy=SitePolicy(enterprise_id="site-0"), spec=spec32,
                         terms=terms)
    assert distributed_hook(federation=fed, policy=SitePolicy(enterprise_id="site-0"),
                            spec=spec, terms=terms) is not None  # Z_2^64 holds it


def test_settings_round_trip_and_cli_init(tmp_path) -> None:
    fed = _federation(4)
    path = tmp_path / "federation.toml"
    path.write_text(federation_to_toml(fed))
    assert "[dp.distributed]" in path.read_text()
    assert load_federation(path) == fed
    from secfed.cli.main import cli

    out = tmp_path / "kits"
    runner = CliRunner()
    res = runner.invoke(cli, [
        "federation", "init", "--name", "f", "--coordinator-url", "https://127.0.0.1:8443",
        "--out", str(out), "--synthetic-dim", "64", "--noise-multiplier", "1.0",
        *[a for e in ("a", "b", "c") for a in ("--enterprise", e)],
        "--dp-distributed", "--dp-distributed-noise", "1.5", "--dp-distributed-min-participants",
        "3",
    ])
    assert res.exit_code == 0, res.output
    kit = EnterpriseKit.load(out / "a")
    assert kit.federation.dp.distributed == DistributedDPSettings(noise_multiplier=1.5,
                                                                  min_participants=3)
    assert load_site_policy(out / "a" / "site.toml").accept_distributed_dp is True
    res = runner.invoke(cli, [
        "federation", "init", "--name", "f", "--coordinator-url", "https://127.0.0.1:8443",
        "--out", str(tmp_path / "k2"), "--synthetic-dim", "64", "--enterprise", "a",
        "--enterprise", "b", "--dp-distributed-noise", "1.5",
    ])
    assert res.exit_code == 2 and "needs --dp-distributed" in res.output
    res = runner.invoke(cli, [
        "federation", "init", "--name", "f", "--coordinator-url", "https://127.0.0.1:8443",
        "--out", str(tmp_path / "k3"), "--synthetic-dim", "64", "--enterprise", "a",
        "--enterprise", "b", "--dp-distributed", "--mode-schedule", "secagg,ckks",
        "--dp-distributed-force",
    ])
    assert res.exit_code == 1 and "must not contain ['ckks']" in res.output


def test_budget_check_counts_both_charges(tmp_path) -> None:
    fed = _federation(4)
    spec, _ = _spec_terms(fed)
    planned = hook_from_settings(DDP).planned_event(spec)
    ledger = open_site_ledger(tmp_path / "ledger.sqlite", enterprise_id="site-0",
                              identity=IdentityKey.generate(), budget_epsilon=3.0, delta=1e-5,
                              create=True)
    alone = ledger.check(noise_multiplier=1.0, sample_rate=0.01, steps=5)
    assert alone < 1.1  # DP-SGD alone fits the budget of 3 easily
    with pytest.raises(BudgetExceeded, match="DP-SGD \\+ distributed DP"):
        ledger.check(noise_multiplier=1.0, sample_rate=0.01, steps=5,
                     distributed=DistributedDPEvent(planned.l2_sensitivity,
                                                    planned.l1_sensitivity,
                                                    planned.variance / 4, planned.shares))
    after = ledger.check(noise_multiplier=1.0, sample_rate=0.01, steps=5, distributed=planned)
    ledger.charge(round_number=1, session_id=b"s" * 32, noise_multiplier=1.0, sample_rate=0.01,
                  steps=5, distributed=planned)
    assert ledger.epsilon() == pytest.approx(after, rel=1e-6)  # PRV falls back to RDP here
    # the survivors' exact figure (more shares than guaranteed) is below the charged one
    exact = DistributedDPEvent(planned.l2_sensitivity, planned.l1_sensitivity,
                               planned.variance * 4 / 3, 4)
    assert ledger.exact_epsilon(planned=planned, exact=exact) < ledger.epsilon()


# ------------------------------------------------------------------------------ federation

def _assert_variance(samples: np.ndarray, claimed: float) -> None:
    n = samples.size
    s2 = float(np.var(samples, ddof=1))
    lo = (n - 1) * s2 / chi2.ppf(1 - ALPHA / 2, n - 1)
    hi = (n - 1) * s2 / chi2.ppf(ALPHA / 2, n - 1)
    assert lo <= claimed <= hi, (s2, claimed, lo, hi)
    assert abs(float(np.mean(samples))) / math.sqrt(claimed / n) < norm.ppf(1 - ALPHA / 2)


def test_federation_with_distributed_dp(tmp_path) -> None:
    sites = ["a-site", "b-site", "c-site", "d-site"]  # n = 4, t = 2 (+ the responder: 3)
    refuser = "d-site"  # its site.toml does not accept distributed DP
    kits = make_federation(tmp_path / "fed", enterprises=sites, dim=DIM, schedule=("secagg",),
                           rounds=1, train=60.0, stage=20.0, dp=SGD)
    site_toml = kits.enterprises[refuser] / "site.toml"
    site_toml.write_text(site_toml.read_text().replace("accept_distributed_dp = true",
                                                       "accept_distributed_dp = false"))
    procs = Processes(kits)
    # Start the sites first (they retry until the coordinator listens) so that the deadlines
    # need not cover their start-up. A stage closes as soon as every site answered or refused,
    # so the 60 s train deadline only matters on a loaded machine (it was 12 s: too short there).
    for eid in sites:
        procs.start_join(eid)
    try:
        assert wait_for(lambda: all('"retry"' in procs.log(e) for e in sites), 120, period=0.2)
        procs.start_coordinator()
        codes = procs.wait(150)
    finally:
        procs.stop()
    assert set(codes.values()) == {0}, procs.log("coordinator.0")
    db = coordinator_db(kits)
    status, survivors_json, spec_blob = db.execute(
        "SELECT status, survivors, spec FROM rounds WHERE round = 1").fetchone()
    assert status == "done", procs.log("coordinator.0")
    survivors = tuple(json.loads(survivors_json))
    assert survivors == ("a-site", "b-site", "c-site")
    spec = RoundSpec.from_bytes(spec_blob)
    assert spec.ring_bits == 32  # the kit checked the noised sum fits Z_2^32

    # The claim, from the settings alone: grid step, rounded L2 bound, per-share variance.
    g = max(1, round(2**SCALE_BITS * DDP_RUN.clip_norm / DDP_RUN.norm_units))
    gamma = g / 2**SCALE_BITS
    bound = rounded_norm_bound(DDP_RUN.clip_norm / gamma, DIM)
    guaranteed = spec.quorum  # t + 1 = 3 survive every accepted secagg round (issue 20)
    share_variance = (DDP_RUN.noise_multiplier * bound) ** 2 / guaranteed
    for eid in survivors:
        ledger = kits.enterprises[eid] / "ledger.sqlite"
        pinned = EnterpriseKit.load(kits.enterprises[eid]).identity().public_bytes()
        verify_ledger(ledger, public_key=pinned)
        entries = read_ledger(ledger)
        assert [e.round_number for e in entries] == [1, 1]
        assert entries[0].event == DPSGDEvent(noise_multiplier=1.0, sample_rate=0.01, steps=5)
        ddp = entries[1].event
        assert isinstance(ddp, DistributedDPEvent)
        # charged: the guaranteed shares less the site's default assumed_colluders = 1
        assert guaranteed == 3 and ddp.shares == guaranteed - 1
        assert ddp.l2_sensitivity == pytest.approx(bound, rel=1e-12)
        assert ddp.variance == pytest.approx((guaranteed - 1) * share_variance, rel=1e-12)
        # both charges committed before the update left the site
        state = sqlite3.connect(kits.enterprises[eid] / "state.sqlite")
        (upload_at,) = state.execute(
            "SELECT sent_at FROM outbound WHERE round = 1 AND stage = 'upload'").fetchone()
        assert max(e.timestamp for e in entries) < upload_at
        # the upload carried the head of the distributed-DP entry
        head = db.execute("SELECT ledger_head FROM transcript WHERE round = 1 AND stage = 'upload'"
                          " AND sender = ?", (eid,)).fetchone()[0]
        assert head is not None and entries[1].entry_hash in head
        detail = json.loads(state.execute("SELECT detail FROM rounds WHERE round = 1").fetchone()[0])
        facts = detail["distributed_dp"]
        assert facts["survivors"] == 3 and facts["planned_shares"] == 3 - 1
        assert facts["assumed_colluders"] == 1
        assert facts["epsilon_survivors"] == pytest.approx(facts["epsilon_ledger"], rel=1e-9)

    # Every survivor applied the same aggregate: plaintext FedAvg + the summed noise / survivors.
    got = [adapter_of(kits, eid).astype(np.float64) for eid in survivors]
    assert all(np.array_equal(got[0], x) for x in got[1:])
    fedavg = expected_global([(1, survivors)], DIM)
    noise = got[0] - fedavg
    claimed = len(survivors) * share_variance * gamma**2 / len(survivors) ** 2
    _assert_variance(noise, claimed)
    # the update itself is there: along the FedAvg direction the adapter holds |FedAvg| + noise
    along = float(got[0] @ fedavg) / float(np.linalg.norm(fedavg))
    assert abs(along - float(np.linalg.norm(fedavg))) < norm.ppf(1 - ALPHA / 2) * math.sqrt(claimed)
    assert float(np.linalg.norm(fedavg)) > 10 * math.sqrt(claimed)
    # rounding adds at most 1/4 grid step^2 per share: negligible next to the +-5 % interval
    assert len(survivors) * 0.25 * gamma**2 / len(survivors) ** 2 < 1e-4 * claimed

    # The refuser refused before any secret: no key, share or update sent, nothing charged.
    state = sqlite3.connect(kits.enterprises[refuser] / "state.sqlite")
    status, detail = state.execute("SELECT status, detail FROM rounds WHERE round = 1").fetchone()
    assert status == "refused" and "accept_distributed_dp = false" in detail
    # the one message it sends is its signed refusal (issue 22 item 6: it says why)
    assert state.execute("SELECT stage, protection FROM outbound").fetchall() == [
        ("refusal", "signed")]
    ledger = kits.enterprises[refuser] / "ledger.sqlite"
    assert not ledger.exists() or read_ledger(ledger) == []
    assert db.execute("SELECT COUNT(*) FROM transcript WHERE sender = ?",
                      (refuser,)).fetchone()[0] == 0
    assert not (kits.enterprises[refuser] / "adapter.f32").exists()  # applied nothing

    # The auditor recomputes epsilon over the distributed-DP entries.
    from secfed.audit import build_report

    report = build_report(
        ledgers=[kits.enterprises[e] / "ledger.sqlite" for e in survivors],
        transcript=kits.coordinator / "state.sqlite",
        federation=kits.coordinator / "federation.toml",
        outbound=[(e, kits.enterprises[e] / "state.sqlite") for e in survivors],
    )
    by_name = {(c.name, c.subject): c.status.value for c in report.checks}
    for eid in survivors:
        assert by_name[("epsilon_recomputed", eid)] == "pass", report.failures
        assert by_name[("charged_before_send", eid)] == "pass", report.failures
