"""Accountant values against references, event encoding, calibration, guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.stats import norm

from secfed.errors import ConfigError, DPGuardError, MessageFormatError
from secfed.privacy import (
    DistributedDPEvent,
    DPSGDEvent,
    GaussianEvent,
    calibrate_noise,
    check_accounting_matches,
    check_delta,
    compose_epsilon,
    compute_epsilon,
    default_delta,
    event_from_json,
    plan_noise,
)
from secfed.privacy.analysis import skellam_rdp


def gaussian_exact_epsilon(mu: float, delta: float) -> float:
    """ε of μ-GDP at δ from the exact privacy profile of the Gaussian mechanism
    (Balle & Wang 2018; Dong, Roth, Su 2019): δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""

    def profile(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(profile, 0.0, 100.0, xtol=1e-12)


def test_rdp_reference_from_opacus_docs() -> None:
    eps = compute_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, accountant="rdp")
    assert eps == pytest.approx(7.32911, abs=1e-3)


def test_closed_form_reference_values() -> None:
    assert gaussian_exact_epsilon(1.0, 1e-5) == pytest.approx(4.3772, abs=1e-4)
    assert gaussian_exact_epsilon(math.sqrt(10) / 2.0, 1e-5) == pytest.approx(7.5113, abs=1e-4)


def test_prv_single_gaussian_release_matches_closed_form() -> None:
    eps = compose_epsilon([GaussianEvent(noise_multiplier=1.0)], delta=1e-5, accountant="prv")
    exact = gaussian_exact_epsilon(1.0, 1e-5)
    assert abs(eps - exact) < 1e-3
    assert eps >= exact - 1e-6  # an upper bound, never below the truth


@pytest.mark.parametrize("history", [
    ((2.0, 0.001, 16),), ((2.0, 0.001, 17),), ((1.0, 0.01, 500),), ((5.0, 1.0, 3),),
    ((1.1, 0.004, 300), (1.3, 0.004, 400)),
])
def test_prv_on_the_fft_friendly_grid_equals_opacus_stock_accountant(history) -> None:
    """The widened grid (faster FFT) gives Opacus' own PRV figure, far inside the ledger's
    1e-6 verification tolerance, so ledgers recorded with the stock grid still verify."""
    import warnings

    from opacus.accountants import PRVAccountant
    from scipy.fft import next_fast_len

    from secfed.privacy.accounting import _fft_friendly_prv_accountant, _prv_epsilon, prv_eps_error

    stock = PRVAccountant()
    stock.history = list(history)
    eps_error = prv_eps_error(sum(n for _, _, n in history))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        reference = stock.get_epsilon(1e-5, eps_error=eps_error)
        fast = _fft_friendly_prv_accountant()
        fast.history = list(history)
        dprv = fast._get_dprv(eps_error=eps_error, delta_error=1e-8)
    assert _prv_epsilon(tuple(sorted(history)), 1e-5) == pytest.approx(reference, rel=1e-7)
    size = len(dprv.pmf)
    assert size % 2 == 0 and next_fast_len(size, real=True) == size  # the point of the grid


def test_prv_ten_gaussian_releases_match_closed_form_in_any_grouping() -> None:
    exact = gaussian_exact_epsilon(math.sqrt(10) / 2.0, 1e-5)
    as_ten = compose_epsilon([GaussianEvent(2.0)] * 10, delta=1e-5)
    as_one = compose_epsilon([GaussianEvent(2.0, count=10)], delta=1e-5)
    assert abs(as_ten - exact) < 1e-3 and as_ten >= exact - 1e-6
    assert as_one == as_ten


def test_composition_is_replayable_and_order_free() -> None:
    events = [DPSGDEvent(1.1, 0.02, 300), DPSGDEvent(0.9, 0.02, 100), DPSGDEvent(1.1, 0.02, 200)]
    a = compose_epsilon(events, delta=1e-5, accountant="rdp")
    b = compose_epsilon(list(reversed(events)), delta=1e-5, accountant="rdp")
    merged = compose_epsilon([DPSGDEvent(1.1, 0.02, 500), DPSGDEvent(0.9, 0.02, 100)], delta=1e-5,
                             accountant="rdp")
    assert a == pytest.approx(b, rel=1e-12) and a == pytest.approx(merged, rel=1e-12)
    prv = compose_epsilon(events, delta=1e-5, accountant="prv")
    assert 0 < prv < a  # PRV is tighter than RDP here
    single = compose_epsilon(events[:1], delta=1e-5, accountant="rdp")
    assert single < a  # composition only ever adds


def test_prv_below_rdp_on_the_reference_run() -> None:
    prv = compute_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, accountant="prv")
    rdp = compute_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, accountant="rdp")
    assert 6.0 < prv < rdp


def test_events_are_frozen_and_round_trip_canonically() -> None:
    events = [DPSGDEvent(1.25, 0.01, 40), GaussianEvent(2.0, 3),
              DistributedDPEvent(l2_sensitivity=4100.0, l1_sensitivity=2.0e5, variance=1.6e7, shares=9)]
    for event in events:
        text = event.to_json()
        assert event_from_json(text) == event
        assert event_from_json(text.encode()) == event
        with pytest.raises(AttributeError):
            event.count = 2  # type: ignore[misc,union-attr]
    assert events[0].to_json() == '{"kind":"dpsgd","noise_multiplier":1.25,"sample_rate":0.01,"steps":40,"v":1}'


@pytest.mark.parametrize("text", [
    "not json",
    "[1]",
    '{"kind":"dpsgd","noise_multiplier":1.25,"sample_rate":0.01,"steps":40,"v":2}',
    '{"kind":"laplace","noise_multiplier":1.25,"v":1}',
    '{"kind":"dpsgd","noise_multiplier":1.25,"sample_rate":0.01,"v":1}',
    '{"kind":"dpsgd","noise_multiplier":1.25,"sample_rate":0.01,"steps":40,"v":1,"x":0}',
    '{"kind":"dpsgd","noise_multiplier":-1.0,"sample_rate":0.01,"steps":40,"v":1}',
    '{"kind":"dpsgd","noise_multiplier":1.25,"sample_rate":1.5,"steps":40,"v":1}',
    '{"v":1,"kind":"dpsgd","noise_multiplier":1.25,"sample_rate":0.01,"steps":40}',  # not canonical
    '{"kind":"dpsgd","noise_multiplier":1,"sample_rate":0.01,"steps":40,"v":1}',  # int, not 1.0
])
def test_event_decoder_rejects_malformed(text: str) -> None:
    with pytest.raises(MessageFormatError):
        event_from_json(text)


@pytest.mark.parametrize("kwargs", [
    {"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1},
    {"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1},
    {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 0},
    {"noise_multiplier": float("nan"), "sample_rate": 0.1, "steps": 1},
    {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.5},
])
def test_event_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        DPSGDEvent(**kwargs)


def test_skellam_rdp_approaches_gaussian_for_large_variance() -> None:
    # Skellam with variance μ and sensitivity Δ behaves like a Gaussian with σ = sqrt(μ)/Δ.
    delta2, mu = 1000.0, 1.0e6  # σ_eff = 1
    sk = skellam_rdp(l2_sensitivity=delta2, l1_sensitivity=delta2 * 30, variance=mu, orders=[2, 8, 32])
    gauss = np.array([2, 8, 32]) / 2.0
    assert np.all(sk >= gauss) and np.allclose(sk, gauss, rtol=0.01)


def test_distributed_event_accounts_through_rdp_for_both_accountants() -> None:
    event = DistributedDPEvent(l2_sensitivity=1000.0, l1_sensitivity=3.0e4, variance=1.0e6, shares=10)
    rdp = compose_epsilon([event], delta=1e-5, accountant="rdp")
    assert compose_epsilon([event], delta=1e-5, accountant="prv") == rdp
    gauss = compose_epsilon([GaussianEvent(1.0)], delta=1e-5, accountant="rdp")
    assert gauss <= rdp < gauss * 1.02


def test_default_delta_and_delta_guard() -> None:
    assert default_delta(1000) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)
    check_delta(1e-5, n_records=1000)
    with pytest.raises(DPGuardError, match="1/N_records"):
        check_delta(1e-3, n_records=1000)
    with pytest.raises(DPGuardError, match="delta must be in"):
        check_delta(0.0)
    with pytest.raises(ConfigError):
        default_delta(0)


@pytest.mark.parametrize("accountant", ["rdp", pytest.param("prv", marks=pytest.mark.slow)])
def test_calibrated_sigma_is_smallest_within_one_percent(accountant: str) -> None:
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.02, steps=1000,
                            accountant=accountant)
    kwargs = {"sample_rate": 0.02, "steps": 1000, "delta": 1e-5, "accountant": accountant}
    assert compute_epsilon(noise_multiplier=sigma, **kwargs) <= 8.0
    assert compute_epsilon(noise_multiplier=sigma * 0.99, **kwargs) > 8.0


def test_calibration_refuses_unreachable_target() -> None:
    with pytest.raises(ConfigError, match="unreachable"):
        calibrate_noise(target_epsilon=1e-6, delta=1e-5, sample_rate=1.0, steps=10**6)


@settings(max_examples=10, deadline=None)
@given(
    target=st.floats(min_value=0.3, max_value=20.0),
    q=st.floats(min_value=1e-3, max_value=0.1),  # realistic DP-SGD rates (larger q: slow RDP series)
    steps=st.integers(min_value=1, max_value=20_000),
    delta_exp=st.integers(min_value=5, max_value=9),
)
def test_calibrated_sigma_never_overshoots(target: float, q: float, steps: int, delta_exp: int) -> None:
    delta = 10.0 ** -delta_exp
    sigma = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps, accountant="rdp")
    eps = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="rdp")
    assert eps <= target


def test_accounting_guard_names_the_mismatching_field() -> None:
    same = {"noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0}
    check_accounting_matches(accountant_params=same, optimizer_params=dict(same))
    for field, wrong in [("noise_multiplier", 1.0), ("sample_rate", 0.45), ("steps", 99),
                         ("max_grad_norm", 0.5)]:
        with pytest.raises(DPGuardError, match=field):
            check_accounting_matches(accountant_params=same, optimizer_params={**same, field: wrong})
    partial = {k: v for k, v in same.items() if k != "sample_rate"}
    with pytest.raises(DPGuardError, match="sample_rate is missing on the optimizer side"):
        check_accounting_matches(accountant_params=same, optimizer_params=partial)


def test_plan_noise_fits_the_whole_horizon_into_the_budget() -> None:
    plan = plan_noise(n_records=5000, sample_rate=0.01, steps_per_round=50, rounds=20)
    assert plan.delta == 1e-5 and plan.total_steps == 1000 and plan.budget_epsilon == 8.0
    events = [plan.round_event()] * plan.rounds
    assert compose_epsilon(events, delta=plan.delta, accountant="rdp") == pytest.approx(plan.epsilon_at_horizon)
    assert plan.epsilon_at_horizon <= 8.0
    one_more = compose_epsilon([*events, plan.round_event()], delta=plan.delta, accountant="rdp")
    assert one_more > 8.0 * 0.99  # sigma is not wastefully large: the horizon uses the budget
    with pytest.raises(DPGuardError, match="1/N_records"):
        plan_noise(n_records=100, sample_rate=0.1, steps_per_round=5, rounds=2, delta=0.05)
    assert plan_noise(n_records=10**7, sample_rate=0.001, steps_per_round=10, rounds=2).delta == pytest.approx(1e-8)


@pytest.mark.slow
def test_prv_at_large_step_counts_stays_an_upper_bound_below_rdp() -> None:
    for steps in (50_000, 200_000):
        kwargs = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": steps, "delta": 1e-5}
        prv, rdp = compute_epsilon(accountant="prv", **kwargs), compute_epsilon(accountant="rdp", **kwargs)
        assert 0 < prv < rdp


def test_events_accept_numpy_scalars_and_stay_canonical() -> None:
    event = DPSGDEvent(np.float32(1.5), np.float64(0.01), np.int64(40))
    assert event == DPSGDEvent(1.5, 0.01, 40) and type(event.steps) is int
    assert event_from_json(event.to_json()) == event


def test_concurrent_charges_of_one_history_compose_the_prv_once(monkeypatch) -> None:
    """Many sites in one process (the Flower simulation) charge the same round at the same
    moment: the PRV of one (history, δ) is composed once, the others wait for it and get the
    same ε (before, every thread missed the cache and composed it again: n sites, n times)."""
    import threading

    from secfed.privacy import accounting

    accounting._prv_epsilon.cache_clear()
    calls = []
    real = accounting._fft_friendly_prv_accountant

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(accounting, "_fft_friendly_prv_accountant", counting)
    events = [DPSGDEvent(noise_multiplier=1.07, sample_rate=0.013, steps=5)] * 3
    start, results = threading.Barrier(8), []

    def charge():
        start.wait()
        results.append(compose_epsilon(events, delta=1e-5))

    threads = [threading.Thread(target=charge) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 8 and len(set(results)) == 1 and results[0] > 0
    accounting._prv_epsilon.cache_clear()
