"""Empirical privacy audit: an ε *lower* bound from canary trials, to check a claimed ε.

The audit runs the mechanism many times with and without a canary record and lets a white-box
attacker (who knows every other record, as in Nasr et al. 2021, "Adversary Instantiation")
score each release by its projection on the canary's clipped gradient. For every threshold the
true- and false-positive rates get one-sided Clopper–Pearson bounds (Bonferroni-corrected over
the thresholds tried), and any (ε, δ)-DP mechanism must satisfy ``TPR ≤ e^ε FPR + δ`` (and the
same for the complements), so ``ε ≥ ln((TPR_low − δ) / FPR_high)`` holds with the stated
confidence. A sound mechanism's lower bound stays below its claimed ε; a broken one (e.g. noise
divided by 4) exceeds it.

The mechanism audited is DP-SGD on a logistic-regression model: per-example gradients clipped to
C, summed, Gaussian noise σ·C per step, full batch (q = 1), ``steps`` steps whose noisy
gradients are all released. Trial noise here is simulation randomness (numpy), not a secret.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import beta as beta_dist

from secfed.errors import ConfigError
from secfed.privacy.accounting import compute_epsilon

__all__ = ["AuditResult", "clopper_pearson", "epsilon_lower_bound", "audit_dpsgd"]


def clopper_pearson(successes: int, trials: int, *, alpha: float) -> tuple[float, float]:
    """Exact one-sided-at-``alpha`` lower and upper bounds on a binomial proportion."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ConfigError(f"need 0 <= successes <= trials, trials >= 1 (got {successes}, {trials})")
    lo = 0.0 if successes == 0 else float(beta_dist.ppf(alpha, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta_dist.ppf(1 - alpha, successes + 1, trials - successes))
    return lo, hi


def epsilon_lower_bound(
    scores_in: npt.ArrayLike, scores_out: npt.ArrayLike, *, delta: float, confidence: float = 0.95,
    thresholds: int = 64,
) -> tuple[float, float]:
    """``(ε_lower, threshold)``: the best ε lower bound over ``thresholds`` quantile thresholds.

    ``scores_in``: attack scores of releases that included the canary; ``scores_out``: without.
    Holds with probability ≥ ``confidence`` (Bonferroni over thresholds and both directions).
    """
    s_in = np.sort(np.asarray(scores_in, dtype=np.float64))
    s_out = np.sort(np.asarray(scores_out, dtype=np.float64))
    n_in, n_out = s_in.size, s_out.size
    if n_in < 10 or n_out < 10:
        raise ConfigError(f"need at least 10 trials each way (got {n_in}, {n_out})")
    alpha = (1 - confidence) / (4 * thresholds)  # 2 rates × 2 directions × thresholds
    candidates = np.quantile(np.concatenate([s_in, s_out]), np.linspace(0.5, 1.0, thresholds, endpoint=False))
    best, best_t = 0.0, float(candidates[0])
    for t in candidates:
        tp = int(n_in - np.searchsorted(s_in, t, side="left"))
        fp = int(n_out - np.searchsorted(s_out, t, side="left"))
        tpr_lo, _ = clopper_pearson(tp, n_in, alpha=alpha)
        _, fpr_hi = clopper_pearson(fp, n_out, alpha=alpha)
        # complement direction: the "out" world's negatives vs the "in" world's negatives
        tnr_lo, _ = clopper_pearson(n_out - fp, n_out, alpha=alpha)
        _, fnr_hi = clopper_pearson(n_in - tp, n_in, alpha=alpha)
        for num, den in ((tpr_lo, fpr_hi), (tnr_lo, fnr_hi)):
            if num - delta > 0 and den > 0:
                eps = math.log((num - delta) / den)
                if eps > best:
                    best, best_t = eps, float(t)
    return best, best_t


@dataclass(frozen=True)
class AuditResult:
    """An audit's outcome: the claimed ε (accountant) and the empirical lower bound."""

    claimed_epsilon: float
    epsilon_lower: float
    confidence: float
    trials: int
    noise_multiplier: float
    noise_divisor: float
    threshold: float

    @property
    def consistent(self) -> bool:
        """True when the evidence does not contradict the claim."""
        return self.epsilon_lower <= self.claimed_epsilon


def _clip_rows(g: npt.NDArray[np.float64], c: float) -> npt.NDArray[np.float64]:
    norms = np.linalg.norm(g, axis=-1, keepdims=True)
    return g * np.minimum(1.0, c / np.maximum(norms, 1e-12))


def audit_dpsgd(
    *, noise_multiplier: float, delta: float = 1e-5, clip_norm: float = 1.0, steps: int = 1,
    n_records: int = 64, dim: int = 16, trials: int = 20_000, noise_divisor: float = 1.0,
    confidence: float = 0.95, seed: int | None = None,
) -> AuditResult:
    """Audit full-batch DP-SGD on logistic regression with a gradient canary.

    ``noise_divisor`` > 1 deliberately breaks the mechanism (noise σ·C / divisor) while the
    claim stays the accountant's ε for σ -- the audit must then catch it.
    """
    if noise_divisor <= 0 or noise_multiplier <= 0 or steps < 1 or trials < 20:
        raise ConfigError("noise_multiplier, noise_divisor > 0, steps >= 1, trials >= 20 required")
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n_records, dim))
    labels = rng.integers(0, 2, size=n_records).astype(np.float64)
    canary_dir = rng.normal(size=dim)
    canary_dir /= np.linalg.norm(canary_dir)
    weights = np.zeros(dim)
    sigma = noise_multiplier * clip_norm / noise_divisor
    scores = {True: np.zeros(trials), False: np.zeros(trials)}
    for with_canary in (True, False):
        w = np.broadcast_to(weights, (trials, dim)).copy()
        for _ in range(steps):
            # per-example logistic-loss gradients at each trial's current weights: (p - y) x
            logits = w @ features.T
            p = 1.0 / (1.0 + np.exp(-logits))
            grads = (p - labels)[..., None] * features[None, :, :]
            summed = _clip_rows(grads, clip_norm).sum(axis=1)
            canary = clip_norm * canary_dir  # a canary whose gradient is C along its direction
            noisy = summed + (canary if with_canary else 0.0) + rng.normal(scale=sigma, size=(trials, dim))
            # white-box attacker: knows the other records' clipped sum, projects the rest
            scores[with_canary] += (noisy - summed) @ canary_dir / clip_norm
            w = w - 0.1 * noisy / n_records
    claimed = compute_epsilon(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=steps,
                              delta=delta, accountant="prv")
    lower, threshold = epsilon_lower_bound(scores[True], scores[False], delta=delta, confidence=confidence)
    return AuditResult(claimed, lower, confidence, trials, noise_multiplier, noise_divisor, threshold)
