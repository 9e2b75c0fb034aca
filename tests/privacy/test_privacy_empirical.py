"""Empirical audit: Clopper–Pearson bounds, and the ε lower bound against real/broken DP-SGD."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from secfed.privacy.empirical import audit_dpsgd, clopper_pearson, epsilon_lower_bound


@pytest.mark.parametrize("k,n", [(0, 50), (7, 50), (50, 50), (312, 1000)])
def test_clopper_pearson_matches_scipy_exact_interval(k: int, n: int) -> None:
    lo, hi = clopper_pearson(k, n, alpha=0.025)
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)


def test_identical_worlds_give_no_evidence() -> None:
    rng = np.random.default_rng(3)  # simulation randomness only
    a, b = rng.normal(size=5000), rng.normal(size=5000)
    eps, _ = epsilon_lower_bound(a, b, delta=1e-5)
    assert eps < 0.3


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 4])
def test_real_mechanism_lower_bound_stays_below_the_claim(steps: int) -> None:
    result = audit_dpsgd(noise_multiplier=1.0, steps=steps, trials=20_000)
    assert result.consistent and 0.5 < result.epsilon_lower < result.claimed_epsilon


@pytest.mark.slow
def test_noise_divided_by_four_is_caught() -> None:
    result = audit_dpsgd(noise_multiplier=1.0, steps=1, trials=20_000, noise_divisor=4.0)
    assert result.claimed_epsilon == pytest.approx(4.3772, abs=1e-3)
    assert not result.consistent and result.epsilon_lower > result.claimed_epsilon
