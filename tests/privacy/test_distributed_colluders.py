"""Distributed DP charges only the noise shares the adversary does not know (issue 20, item 4).

Colluding enterprises know their own Skellam shares and can subtract them from the sum, and every
enterprise of the round receives the sum knowing its own share. A site's ``assumed_colluders``
(``site.toml``) is how many shares its charge treats as known: the planned (ledger, before the
upload) and the exact (after the sum) events count ``shares - colluders``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from secfed.config import (
    DistributedDPSettings,
    DPSettings,
    FederationConfig,
    ModelSettings,
    RosterEntry,
    RoundTerms,
    SitePolicy,
)
from secfed.crypto.keys import IdentityKey
from secfed.errors import DPGuardError
from secfed.participant.ledger import open_site_ledger
from secfed.participant.noise import distributed_hook
from secfed.privacy import DistributedDPEvent, GaussianEvent, compose_epsilon
from secfed.privacy.distributed import DistributedDP, rounded_norm_bound
from secfed.protocol import RoundSpec, simulate

N, DIM, SCALE_BITS = 10, 1000, 24
DDP = DistributedDPSettings(clip_norm=1.0, noise_multiplier=1.0, min_participants=3)
IDS = tuple(f"site-{i}" for i in range(N))
# secagg, n = 10, t = 7 = min_participants: 7 noise shares are guaranteed in any accepted sum
SPEC = RoundSpec.create(federation="f", round_number=1, mode="secagg", participants=IDS,
                        vector_length=DIM, scale_bits=SCALE_BITS)
GUARANTEED = 7


def _reference_event(colluders: int) -> DistributedDPEvent:
    """The charge computed by hand from the settings (Kairouz et al. grid, Agarwal et al.
    Skellam): each share has variance (sigma * bound)^2 / guaranteed; the adversary knows
    ``colluders`` of the guaranteed shares, so the rest carry the noise."""
    g = max(1, round(2**SCALE_BITS * DDP.clip_norm / DDP.norm_units))
    gamma = g / 2**SCALE_BITS
    bound = rounded_norm_bound(DDP.clip_norm / gamma, DIM)
    share = (DDP.noise_multiplier * bound) ** 2 / GUARANTEED
    honest = GUARANTEED - colluders
    return DistributedDPEvent(l2_sensitivity=bound, l1_sensitivity=min(bound**2, math.sqrt(DIM) * bound),
                              variance=honest * share, shares=honest)


def _federation() -> FederationConfig:
    roster = tuple(RosterEntry(id=i, identity_public_key=IdentityKey.generate().public_bytes().hex())
                   for i in IDS)
    return FederationConfig(name="f", coordinator_url="https://127.0.0.1:8443", roster=roster,
                            coordinator_identity_public_key=IdentityKey.generate().public_bytes().hex(),
                            threshold=7, min_participants=7, dp=DPSettings(distributed=DDP),
                            model=ModelSettings(vector_length=DIM, initial_global_hash="0"))


def _terms() -> RoundTerms:
    return RoundTerms(round_number=1, mode="secagg", participants=IDS, threshold=7,
                      min_participants=7, noise_multiplier=1.0, sample_rate=0.01, local_steps=5,
                      max_grad_norm=1.0, learning_rate=0.05, delta=1e-5, distributed_dp=DDP)


def test_site_default_assumes_one_colluder() -> None:
    # Every enterprise of the round receives the sum and knows its own noise share.
    assert SitePolicy(enterprise_id="site-0").assumed_colluders == 1


def test_assumed_colluders_raise_the_charge_and_equal_the_reference() -> None:
    fed = _federation()
    eps = []
    for colluders in range(GUARANTEED):
        policy = SitePolicy(enterprise_id="site-0", assumed_colluders=colluders)
        hook = distributed_hook(federation=fed, policy=policy, spec=SPEC, terms=_terms())
        assert hook is not None and hook.colluders == colluders
        planned = hook.planned_event(SPEC)
        reference = _reference_event(colluders)
        assert planned.shares == reference.shares == GUARANTEED - colluders
        assert planned.l2_sensitivity == pytest.approx(reference.l2_sensitivity, rel=1e-12)
        assert planned.l1_sensitivity == pytest.approx(reference.l1_sensitivity, rel=1e-12)
        assert planned.variance == pytest.approx(reference.variance, rel=1e-12)
        e = compose_epsilon([planned], delta=1e-5, accountant="rdp")
        assert e == pytest.approx(compose_epsilon([reference], delta=1e-5, accountant="rdp"), rel=1e-9)
        # the Skellam charge sits just above the Gaussian with the honest shares' variance:
        # sigma_eff = sigma * sqrt((guaranteed - colluders) / guaranteed)
        sigma_eff = DDP.noise_multiplier * math.sqrt((GUARANTEED - colluders) / GUARANTEED)
        gauss = compose_epsilon([GaussianEvent(sigma_eff)], delta=1e-5, accountant="rdp")
        assert gauss <= e < gauss * 1.05
        eps.append(e)
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False)), eps
    # colluders holding every guaranteed share leave nothing to charge against: refused
    # before any secret (the hook is built in the join loop's checks)
    with pytest.raises(DPGuardError, match=r"minus assumed colluders must be >= 1 \(got 7 - 7\)"):
        distributed_hook(federation=fed, spec=SPEC, terms=_terms(),
                         policy=SitePolicy(enterprise_id="site-0", assumed_colluders=GUARANTEED))


def test_ledger_budget_check_sees_the_colluders(tmp_path) -> None:
    fed = _federation()
    after = []
    for colluders in (0, 1, 3):
        ledger = open_site_ledger(tmp_path / f"l{colluders}.sqlite", enterprise_id="site-0",
                                  identity=IdentityKey.generate(), budget_epsilon=1e6, delta=1e-5,
                                  create=True)
        hook = distributed_hook(federation=fed, spec=SPEC, terms=_terms(),
                                policy=SitePolicy(enterprise_id="site-0", assumed_colluders=colluders))
        assert hook is not None
        after.append(ledger.check(noise_multiplier=1.0, sample_rate=0.01, steps=5,
                                  distributed=hook.planned_event(SPEC)))
        ledger.charge(round_number=1, session_id=b"s" * 32, noise_multiplier=1.0,
                      sample_rate=0.01, steps=5, distributed=hook.planned_event(SPEC))
        assert ledger.epsilon() == pytest.approx(after[-1], rel=1e-6)
    assert after[0] < after[1] < after[2]


def test_exact_event_after_the_sum_counts_survivors_less_colluders() -> None:
    updates = [np.zeros(200, dtype=np.float32) for _ in range(6)]
    for colluders in (0, 2):
        hook = DistributedDP(clip_norm=1.0, noise_multiplier=1.0, min_participants=2,
                             colluders=colluders)
        result = simulate(updates, mode="secagg", noise_hook=hook, dropouts={"upload": [5]})
        survivors = len(result.survivors)
        assert survivors == 5
        exact = hook.exact_event(survivors)
        share = hook.releases[-1].share_variance
        assert exact.shares == survivors - colluders
        assert exact.variance == pytest.approx((survivors - colluders) * share, rel=1e-12)
    with pytest.raises(DPGuardError):
        DistributedDP(clip_norm=1.0, noise_multiplier=1.0, colluders=1).exact_event(3)  # no release
