"""Privacy accounting front door: ε of a sequence of mechanism events, σ calibration, guards.

Two accountants, both from Opacus' analysis code:

* ``"rdp"`` -- Rényi DP composition (Mironov 2017; subsampled Gaussian of Mironov et al. 2019),
  converted with Balle et al. 2020. Cheap and monotone: the online budget check uses it.
* ``"prv"`` -- numerical composition of privacy loss random variables (Gopi et al. 2021), the
  tighter figure used for reports. We report Opacus' *upper* bound ``eps_upper``; its error
  parameter follows :func:`prv_eps_error` (PRV cost grows like sqrt(steps) / eps_error, so the
  tolerance widens with the number of composed steps: 1e-4 up to 16 compositions, 0.01 up to
  4000, then 0.01·sqrt(steps/4000)). Events without a PRV (distributed Skellam) make the whole
  composition fall back to RDP, and so does a PRV computation that fails numerically; both
  are valid upper bounds.

Composition is order-free: a sequence of events is replayed into a fresh accountant.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from secfed.errors import ConfigError, DPGuardError
from secfed.privacy.analysis import (
    RDP_ORDERS,
    rdp_to_epsilon,
    skellam_rdp,
    subsampled_gaussian_rdp,
)
from secfed.privacy.events import DistributedDPEvent, DPSGDEvent, GaussianEvent, MechanismEvent

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_BUDGET_EPSILON",
    "MAX_DEFAULT_DELTA",
    "Accountant",
    "default_delta",
    "check_delta",
    "event_rdp",
    "compose_epsilon",
    "compute_epsilon",
    "load_accountant",
    "calibrate_noise",
    "prv_eps_error",
    "check_accounting_matches",
    "NoisePlan",
    "plan_noise",
    "rounds_within_budget",
]

Accountant = Literal["prv", "rdp"]
ACCOUNTANTS = ("prv", "rdp")
DEFAULT_BUDGET_EPSILON = 8.0  # DESIGN.md "Privacy semantics": ε budget 8 per enterprise
MAX_DEFAULT_DELTA = 1e-5  # δ = min(1e-5, 0.1 / N_records)
CALIBRATION_RTOL = 1e-3  # bisection stops when σ is known to 0.1 % (target: within 1 %)
MIN_NOISE_MULTIPLIER = 0.05  # below this no realistic budget is met; bisection floor
MAX_NOISE_MULTIPLIER = 1.0e4


def default_delta(n_records: int) -> float:
    """δ = min(1e-5, 0.1 / N_records) (DESIGN.md).

    Raises:
        ConfigError: ``n_records`` < 1.
    """
    if isinstance(n_records, bool) or not isinstance(n_records, int) or n_records < 1:
        raise ConfigError(f"n_records must be an integer >= 1 (got {n_records!r})")
    return min(MAX_DEFAULT_DELTA, 0.1 / n_records)


def check_delta(delta: float, *, n_records: int | None = None) -> None:
    """Refuse a δ that is not in (0, 1) or, given the dataset size, not below 1/N.

    A δ ≥ 1/N allows a mechanism that publishes one whole record; it is no guarantee.

    Raises:
        DPGuardError: names δ, the rule and N.
    """
    if not isinstance(delta, int | float) or not math.isfinite(delta) or not 0 < delta < 1:
        raise DPGuardError(f"delta must be in (0, 1) (got {delta!r})")
    if n_records is not None:
        if n_records < 1:
            raise DPGuardError(f"n_records must be >= 1 (got {n_records})")
        if delta >= 1.0 / n_records:
            raise DPGuardError(
                f"delta must be < 1/N_records = {1.0 / n_records:.3g} (got {delta:.3g} with N = {n_records})"
            )


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {ACCOUNTANTS} (got {accountant!r})")


def event_rdp(event: MechanismEvent) -> np.ndarray:
    """The RDP curve (over :data:`RDP_ORDERS`) of one event."""
    return _event_rdp_cached(event).copy()


@lru_cache(maxsize=4096)
def _event_rdp_cached(event: MechanismEvent) -> np.ndarray:
    if isinstance(event, DPSGDEvent):
        return subsampled_gaussian_rdp(
            sample_rate=event.sample_rate, noise_multiplier=event.noise_multiplier, steps=event.steps
        )
    if isinstance(event, GaussianEvent):
        return subsampled_gaussian_rdp(
            sample_rate=1.0, noise_multiplier=event.noise_multiplier, steps=event.count
        )
    if isinstance(event, DistributedDPEvent):
        return skellam_rdp(
            l2_sensitivity=event.l2_sensitivity, l1_sensitivity=event.l1_sensitivity,
            variance=event.variance, count=event.count,
        )
    raise ConfigError(f"event must be a mechanism event (got {type(event).__name__})")


def prv_eps_error(total_compositions: int) -> float:
    """PRV error parameter for a composition of this many steps (see the module docstring)."""
    if total_compositions <= 16:
        return 1e-4
    return 0.01 * max(1.0, math.sqrt(total_compositions / 4000.0))


def _prv_history(events: Sequence[MechanismEvent]) -> tuple[tuple[float, float, int], ...] | None:
    """Merge identical (σ, q) into one self-composition; None if an event has no PRV."""
    merged: dict[tuple[float, float], int] = {}
    for event in events:
        if isinstance(event, DPSGDEvent):
            key, n = (event.noise_multiplier, event.sample_rate), event.steps
        elif isinstance(event, GaussianEvent):
            key, n = (event.noise_multiplier, 1.0), event.count
        else:
            return None
        merged[key] = merged.get(key, 0) + n
    return tuple(sorted((s, q, n) for (s, q), n in merged.items()))


def load_accountant() -> None:
    """Import the PRV accountant now (Opacus, and with it torch: seconds), so a process that
    will charge a ledger pays that at start-up instead of inside its first round's charge."""
    _fft_friendly_prv_class()


def _fft_friendly_prv_accountant():
    """A fresh accountant of :func:`_fft_friendly_prv_class`."""
    return _fft_friendly_prv_class()()


@lru_cache(maxsize=1)
def _fft_friendly_prv_class() -> type:
    """Opacus' PRV accountant on a slightly wider grid whose length is FFT-friendly.

    Opacus discretises on ``[-L, L]`` with ``L`` its safe truncation bound, so the grid length is
    whatever that bound gives, often with a large prime factor that makes the composing FFT
    several times slower than the rest of the computation. This widens the grid symmetrically
    (same mesh, same alignment, ``L`` only grows, which only shrinks the truncation error) to the
    next even length with small prime factors. The ε is the same to ~1e-8 relative (checked in
    ``tests/privacy/test_privacy_accounting.py``), far inside the ledger's verification
    tolerance, so ledgers written before this change still verify.
    """
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import Domain, compute_safe_domain_size
    from scipy.fft import next_fast_len

    class _Accountant(PRVAccountant):
        def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
            bound = compute_safe_domain_size(prvs=prvs, max_self_compositions=num_self_compositions,
                                             eps_error=eps_error, delta_error=delta_error)
            mesh = eps_error / np.sqrt(sum(num_self_compositions) * np.log(12 / delta_error) / 2)
            size = Domain.create_aligned(-bound, bound, mesh).size
            while (size := next_fast_len(size, real=True)) % 2:
                size += 1
            half = (size - 2) // 2  # create_aligned gives [-half, half + 1] * mesh: `size` points
            domain = Domain.create_aligned(-(half - 0.5) * mesh, (half - 0.5) * mesh, mesh)
            if domain.size != size or domain.t_min > -bound or domain.t_max < bound:
                return super()._get_domain(prvs, num_self_compositions, eps_error, delta_error)
            return domain

    return _Accountant


@lru_cache(maxsize=1024)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    accountant = _fft_friendly_prv_accountant()
    accountant.history = [tuple(h) for h in history]
    total = sum(n for _, _, n in history)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # log(1 - q) at q = 1 is -inf by design
        eps = float(accountant.get_epsilon(delta, eps_error=prv_eps_error(total)))
    if not math.isfinite(eps) or eps < 0:
        raise FloatingPointError(f"PRV gave {eps}")
    return eps


_PRV_PENDING: dict[tuple[tuple[tuple[float, float, int], ...], float], threading.Lock] = {}
_PRV_PENDING_GUARD = threading.Lock()


def _prv_epsilon_once(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """:func:`_prv_epsilon`, computed once per (history, δ) even when many threads ask at the
    same moment: callers of one key wait for the first one's result (then the cache answers)
    instead of each missing the cache and composing the same PRV again. A simulation runs every
    site's participant in one process and they all charge the same round together, so without
    this n sites cost n PRV compositions (~1 s each) instead of one."""
    key = (history, delta)
    with _PRV_PENDING_GUARD:
        lock = _PRV_PENDING.setdefault(key, threading.Lock())
    try:
        with lock:
            return _prv_epsilon(history, delta)
    finally:
        with _PRV_PENDING_GUARD:
            if _PRV_PENDING.get(key) is lock:
                del _PRV_PENDING[key]


def _rdp_epsilon(events: Sequence[MechanismEvent], delta: float) -> float:
    total = np.zeros(len(RDP_ORDERS))
    for event in events:
        total += _event_rdp_cached(event)
    return rdp_to_epsilon(total, delta=delta)


def compose_epsilon(
    events: Iterable[MechanismEvent], *, delta: float, accountant: Accountant = "prv"
) -> float:
    """ε at ``delta`` of the composition of ``events`` (replayed into a fresh accountant).

    Raises:
        ConfigError: unknown accountant or not an event.
        DPGuardError: δ outside (0, 1).
    """
    _check_accountant(accountant)
    check_delta(delta)
    events = tuple(events)
    for event in events:
        if not isinstance(event, DPSGDEvent | GaussianEvent | DistributedDPEvent):
            raise ConfigError(f"events must be mechanism events (got {type(event).__name__})")
    if not events:
        return 0.0
    if accountant == "prv":
        history = _prv_history(events)
        if history is not None:
            try:
                return _prv_epsilon_once(history, float(delta))
            except (ValueError, FloatingPointError, ArithmeticError, MemoryError):
                pass  # documented fallback: the RDP bound is also a valid upper bound
    return _rdp_epsilon(events, float(delta))


def compute_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
    accountant: Accountant = "prv",
) -> float:
    """ε after ``steps`` DP-SGD steps with Poisson rate ``sample_rate`` and noise σ.

    Raises:
        ConfigError: a parameter out of range.
        DPGuardError: δ outside (0, 1).
    """
    event = DPSGDEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return compose_epsilon((event,), delta=delta, accountant=accountant)


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
    accountant: Accountant = "rdp",
) -> float:
    """The smallest σ (to 0.1 %) whose ε after ``steps`` steps is ≤ ``target_epsilon``.

    Never overshoots: the returned σ was itself evaluated and met the target. Calibrate once,
    for the planned horizon (rounds × local steps), with the accountant that enforces the
    budget (RDP by default).

    Raises:
        ConfigError: bad parameters, or no σ ≤ 1e4 reaches the target.
    """
    if not isinstance(target_epsilon, int | float) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ConfigError(f"target_epsilon must be a finite number > 0 (got {target_epsilon!r})")

    def eps(sigma: float) -> float:
        return compute_epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps,
                               delta=delta, accountant=accountant)

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                f"target_epsilon {target_epsilon} is unreachable with sigma <= {MAX_NOISE_MULTIPLIER:g}"
                f" (q = {sample_rate}, steps = {steps}, delta = {delta})"
            )
    lo = hi / 2.0
    while eps(lo) <= target_epsilon:
        hi = lo
        lo /= 2.0
        if lo < MIN_NOISE_MULTIPLIER:
            return hi
    # Invariant: eps(lo) > target >= eps(hi).
    while (hi - lo) / hi > CALIBRATION_RTOL:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class NoisePlan:
    """σ chosen once for an enterprise's planned horizon, and what it buys."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    delta: float
    budget_epsilon: float
    accountant: str
    epsilon_at_horizon: float

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    def round_event(self) -> DPSGDEvent:
        """The event one round of local training charges."""
        return DPSGDEvent(self.noise_multiplier, self.sample_rate, self.steps_per_round)


def plan_noise(
    *, n_records: int, sample_rate: float, steps_per_round: int, rounds: int,
    budget_epsilon: float = DEFAULT_BUDGET_EPSILON, delta: float | None = None,
    accountant: Accountant = "rdp",
) -> NoisePlan:
    """Calibrate σ once so that ``rounds`` × ``steps_per_round`` DP-SGD steps fit the budget.

    δ defaults to ``min(1e-5, 0.1 / n_records)`` and is refused if ≥ 1/N.

    Raises:
        ConfigError: bad horizon or unreachable budget.
        DPGuardError: δ not below 1/N.
    """
    for name, value in (("steps_per_round", steps_per_round), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1 (got {value!r})")
    delta = default_delta(n_records) if delta is None else delta
    check_delta(delta, n_records=n_records)
    steps = rounds * steps_per_round
    sigma = calibrate_noise(target_epsilon=budget_epsilon, delta=delta, sample_rate=sample_rate,
                            steps=steps, accountant=accountant)
    eps = compute_epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                          accountant=accountant)
    return NoisePlan(sigma, sample_rate, steps_per_round, rounds, delta, float(budget_epsilon),
                     accountant, eps)


# Fields whose value the accountant and the optimizer must agree on, and the tolerance.
ACCOUNTING_FIELDS = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm")
_GUARD_RTOL = 1e-9


def check_accounting_matches(
    *, accountant_params: Mapping[str, float], optimizer_params: Mapping[str, float]
) -> None:
    """Raise unless the accountant sees the q, σ, C and step count the optimizer uses.

    ``accountant_params``: what goes into the ledger/accountant; ``optimizer_params``: what the
    DP optimizer was built with (``optimizer.noise_multiplier``, the Poisson sampler's rate,
    ``optimizer.max_grad_norm``, the steps actually taken). Fields missing from both are not
    checked; a field present on one side only is a mismatch.

    Raises:
        DPGuardError: names the first mismatching field and both values.
    """
    for name in ACCOUNTING_FIELDS:
        in_acc, in_opt = name in accountant_params, name in optimizer_params
        if not in_acc and not in_opt:
            continue
        if in_acc != in_opt:
            side = "optimizer" if in_acc else "accountant"
            raise DPGuardError(f"{name} is missing on the {side} side (accounting must see every DP parameter)")
        a, o = accountant_params[name], optimizer_params[name]
        if a is None or o is None or not math.isclose(float(a), float(o), rel_tol=_GUARD_RTOL, abs_tol=0.0):
            raise DPGuardError(
                f"{name} must be the same for the accountant and the optimizer "
                f"(accountant {a!r}, optimizer {o!r})"
            )


def rounds_within_budget(*, noise_multiplier: float, sample_rate: float, steps: int,
                         rounds: int, budget: float, delta: float,
                         accountant: Accountant = "rdp") -> int:
    """How many of ``rounds`` rounds of ``steps`` DP-SGD steps each fit a fresh ledger's
    ``budget`` (the ledger's gate: ``accountant`` at ``delta``); ``rounds`` when all do.

    Raises:
        ConfigError: bad parameters.
    """
    def fits(k: int) -> bool:
        event = DPSGDEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                           steps=steps * k)
        return compose_epsilon([event], delta=delta, accountant=accountant) <= budget

    if fits(rounds):
        return rounds
    lo, hi = 0, rounds  # fits(lo) (nothing spent) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
