"""Distributed (enterprise-level) DP: Skellam shares, conditional rounding, the noise hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chi2, norm

from secfed.errors import DPGuardError, PrivacyError, ProtocolAbort
from secfed.privacy import GaussianEvent, compose_epsilon
from secfed.privacy.distributed import (
    DistributedDP,
    conditional_randomized_round,
    guaranteed_shares,
    rounded_norm_bound,
    sample_poisson,
    sample_skellam,
)
from secfed.protocol import RoundSpec, simulate

ALPHA = 1e-6  # two-sided level of every statistical check: a false alarm once in a million runs


def assert_variance(samples: np.ndarray, claimed: float) -> None:
    """Chi-square confidence interval for the variance (Skellam's excess kurtosis is 1/v ≈ 0)."""
    n = samples.size
    s2 = float(np.var(samples, ddof=1))
    lo = (n - 1) * s2 / chi2.ppf(1 - ALPHA / 2, n - 1)
    hi = (n - 1) * s2 / chi2.ppf(ALPHA / 2, n - 1)
    assert lo <= claimed <= hi, (s2, claimed, lo, hi)
    z = float(np.mean(samples)) / math.sqrt(claimed / n)
    assert abs(z) < norm.ppf(1 - ALPHA / 2)  # centred


@pytest.mark.parametrize("variance", [3.0, 250.0, 4.0e6])
def test_skellam_sampler_has_the_claimed_variance(variance: float) -> None:
    assert_variance(sample_skellam(variance, 200_000).astype(np.float64), variance)


def test_poisson_sampler_mean_and_variance() -> None:
    lam = 37.5
    x = sample_poisson(lam, 200_000).astype(np.float64)
    assert x.min() >= 0
    assert_variance(x - lam, lam)


def test_conditional_rounding_is_unbiased_and_bounded() -> None:
    rng = np.random.default_rng(1)  # test input only, not noise
    v = rng.normal(size=2000)
    v *= 300.0 / np.linalg.norm(v)
    bound = rounded_norm_bound(300.0, v.size)
    rounds = np.stack([conditional_randomized_round(v, bound=bound) for _ in range(400)])
    assert np.all(np.linalg.norm(rounds.astype(np.float64), axis=1) <= bound)
    assert np.all(np.abs(rounds - v) < 1.0)
    err = rounds.mean(axis=0) - v  # each coordinate's error has sd <= 0.5/sqrt(400)
    assert abs(float(err.mean())) < 5 * 0.5 / math.sqrt(400 * v.size)
    with pytest.raises(PrivacyError, match="L2 bound"):
        conditional_randomized_round(v, bound=299.0)


def test_hook_sum_carries_the_claimed_noise_variance_over_survivors() -> None:
    n, d = 6, 40_000
    hook = DistributedDP(clip_norm=1.0, noise_multiplier=0.8, min_participants=4)
    updates = [np.zeros(d, dtype=np.float32) for _ in range(n)]
    result = simulate(updates, mode="secagg", noise_hook=hook, dropouts={"upload": [2]})
    assert result.survivors == (0, 1, 3, 4, 5)
    release = hook.releases[0]
    noise = result.aggregate / release.grid_step  # zero inputs: the sum is pure noise, in grid units
    assert np.allclose(noise, np.round(noise), atol=1e-6)  # integer noise survived masking exactly
    event = release.event(shares=len(result.survivors))
    assert event.variance == pytest.approx(5 * release.share_variance)
    assert_variance(np.round(noise), event.variance)
    assert len(hook.releases) == len(result.survivors)  # the dropout never built its upload


def test_hook_clips_and_the_sum_is_unbiased() -> None:
    rng = np.random.default_rng(7)  # test input only
    n, d = 4, 20_000
    updates = [rng.normal(size=d).astype(np.float32) * 0.02 for _ in range(n)]  # norm ~2.8 > C
    hook = DistributedDP(clip_norm=1.0, noise_multiplier=0.5, min_participants=2)
    result = simulate(updates, mode="secagg", noise_hook=hook)
    assert all(r.clipped for r in hook.releases)
    clipped = sum(u.astype(np.float64) / np.linalg.norm(u.astype(np.float64)) for u in updates)
    resid = (result.aggregate - clipped) / hook.releases[0].grid_step
    claimed = n * hook.releases[0].share_variance + n * 0.25  # noise + at most 1/4 rounding per share
    assert float(np.var(resid)) <= claimed * 1.05
    assert abs(float(np.mean(resid))) < 6 * math.sqrt(claimed / d)


def test_refuses_small_rounds_unless_forced_and_ckks() -> None:
    hook = DistributedDP(clip_norm=1.0, noise_multiplier=1.0, min_participants=10)
    updates = [np.zeros(64, dtype=np.float32) for _ in range(3)]
    spec = RoundSpec.create(federation="f", round_number=1, mode="secagg",
                            participants=["a", "b", "c"], vector_length=64)
    with pytest.raises(DPGuardError, match="min_participants = 10"):
        hook.check_round(spec)  # what a participant calls before training
    with pytest.raises(ProtocolAbort, match="DPGuardError: .*min_participants = 10"):
        simulate(updates, mode="secagg", noise_hook=hook)  # and the protocol aborts cleanly
    ckks = RoundSpec.create(federation="f", round_number=1, mode="ckks",
                            participants=[f"p{i}" for i in range(12)], vector_length=64)
    with pytest.raises(DPGuardError, match="mask mode"):
        hook.check_round(ckks)
    forced = DistributedDP(clip_norm=1.0, noise_multiplier=1.0, min_participants=10, force=True)
    simulate(updates, mode="secagg", noise_hook=forced)
    assert len(forced.releases) == 3


def test_charge_before_send_is_conservative() -> None:
    hook = DistributedDP(clip_norm=1.0, noise_multiplier=1.0, min_participants=2)
    result = simulate([np.zeros(1000, dtype=np.float32) for _ in range(6)], mode="secagg",
                      noise_hook=hook)
    spec = RoundSpec.create(federation="f", round_number=1, mode="secagg",
                            participants=[f"p{i}" for i in range(6)], vector_length=1000)
    planned = hook.planned_event(spec)
    assert planned.shares == guaranteed_shares(spec) == 5
    actual = hook.releases[0].event(shares=len(result.survivors))
    eps_planned = compose_epsilon([planned], delta=1e-5, accountant="rdp")
    eps_actual = compose_epsilon([actual], delta=1e-5, accountant="rdp")
    assert eps_actual <= eps_planned  # survivors >= the guaranteed minimum
    # With exactly the guaranteed minimum the sum's noise is σ × bound: ε ≈ the Gaussian's.
    gauss = compose_epsilon([GaussianEvent(1.0)],
                            delta=1e-5, accountant="rdp")
    assert gauss <= eps_planned < gauss * 1.05
    with pytest.raises(DPGuardError):
        hook.releases[0].event(shares=2, colluders=2)


def test_distributed_charge_goes_through_the_ledger(tmp_path) -> None:
    from secfed.crypto.keys import IdentityKey
    from secfed.privacy import DPSGDEvent, Ledger, verify_ledger

    spec = RoundSpec.create(federation="f", round_number=3, mode="secagg",
                            participants=[f"p{i}" for i in range(12)], vector_length=5000)
    hook = DistributedDP(clip_norm=0.5, noise_multiplier=2.0, min_participants=10)
    key = IdentityKey.generate()
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path, enterprise_id="p0", identity=key, delta=1e-5, create=True) as ledger:
        ledger.charge(round_number=2, session_id=b"a" * 32, event=DPSGDEvent(1.0, 0.01, 100))
        ledger.charge(round_number=3, session_id=b"b" * 32, event=hook.planned_event(spec))
    report = verify_ledger(path, public_key=key.public_bytes())
    assert report.entries[1].event == hook.planned_event(spec)
    assert report.eps_prv == report.eps_rdp  # a Skellam event makes PRV fall back to RDP


def test_skellam_sum_norm_bound_holds_and_is_tight() -> None:
    # The participants' norm check with distributed DP rests on this bound (failure <= 2^-64
    # for an honest sum): sampled noise stays below it, and it exceeds sqrt(d v) by < 15 % at
    # d = 2e4 and < 4 % at d = 1e5, so an inflated sum has little slack to hide in.
    from secfed.privacy.distributed import skellam_sum_l2_bound

    d, v = 20_000, 40.0
    bound = skellam_sum_l2_bound(dim=d, variance=v)
    norms = [float(np.linalg.norm(sample_skellam(v, d).astype(np.float64))) for _ in range(50)]
    assert max(norms) <= bound
    assert bound < 1.15 * math.sqrt(d * v)
    assert skellam_sum_l2_bound(dim=100_000, variance=1.7e7) < 1.04 * math.sqrt(100_000 * 1.7e7)
