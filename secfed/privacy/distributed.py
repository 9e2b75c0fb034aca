"""Optional enterprise-level (distributed) DP: Skellam noise shares added under secure aggregation.

Each enterprise clips its whole adapter delta to L2 norm C, maps it onto an integer grid of step
γ (C ≈ ``norm_units`` grid steps), rounds it randomly with the norm bound re-checked after
rounding (conditional randomized rounding, Kairouz, Liu, Steinke 2021, "The Distributed
Discrete Gaussian Mechanism", Sec. 4.1), and adds a Skellam noise share (Agarwal, Kairouz, Liu
2021). Skellam is closed under addition, so the masked sum carries Skellam noise of variance
(shares that reached the sum) × (per-share variance) although no party added it all. Each share
is sized so that the *smallest* set of survivors the round accepts already carries the target
variance; accounting counts only the shares of survivors.

Randomness: every uniform comes from a fresh 256-bit seed from the OS CSPRNG (``secrets``)
expanded by the AES-256-CTR keystream (:mod:`secfed.crypto.prg`). Poisson variates are drawn by
exact inversion against a float64 CDF table; values whose probability is below 2^-53 are never
drawn, so the sampler is within d·2^-52 total variation of the exact distribution (≤ 2.2e-10
for d = 1e6 coordinates), which is far below δ.

The hook plugs into :class:`secfed.protocol.ParticipantRound` (``noise_hook=``) in the mask
modes, where it rewrites the encoded ring vector in place.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from secfed.crypto.prg import keystream
from secfed.errors import ConfigError, DPGuardError, HeadroomError, PrivacyError
from secfed.names import MASK_MODES
from secfed.privacy.events import DistributedDPEvent

__all__ = [
    "DEFAULT_NORM_UNITS",
    "ROUNDING_BETA",
    "DistributedDP",
    "DistributedRelease",
    "rounded_norm_bound",
    "conditional_randomized_round",
    "sample_poisson",
    "sample_skellam",
    "guaranteed_shares",
    "SUM_CHECK_FAILURE",
    "skellam_sum_l2_bound",
]

DEFAULT_NORM_UNITS = 4096  # C in grid steps: fine enough that rounding adds ~sqrt(d)/2 << C
ROUNDING_BETA = math.exp(-0.5)  # Kairouz et al. 2021: each rounding try fails w.p. <= beta
MAX_ROUNDING_TRIES = 64
_TAIL_SIGMAS = 40.0  # CDF table spans lambda +- 40 sqrt(lambda): the mass outside is < 1e-300
_MAX_TABLE = 20_000_000
# Headroom: a coordinate of the noised sum stays within n x (L2 bound) + 20 noise standard
# deviations; the (near-Gaussian) Skellam sum passes that with probability < 1e-80 per coordinate.
HEADROOM_SIGMAS = 20.0


def rounded_norm_bound(norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """L2 bound that conditional randomized rounding enforces on a vector of L2 norm ``norm``.

    ``min(norm + sqrt(d), sqrt(norm² + d/4 + sqrt(2 ln(1/β)) (norm + sqrt(d)/2)))`` (Kairouz et
    al. 2021, Eq. (19)); a rounding is accepted only if it meets the bound.
    """
    d = float(dim)
    return min(norm + math.sqrt(d),
               math.sqrt(norm**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(d) / 2)))


def _uniforms(n: int) -> npt.NDArray[np.float64]:
    """n uniforms in [0, 1) with 53 random bits each, from a fresh OS seed via AES-CTR."""
    words = keystream(secrets.token_bytes(32), n, np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def conditional_randomized_round(
    values: npt.NDArray[np.float64], *, bound: float, max_tries: int = MAX_ROUNDING_TRIES
) -> npt.NDArray[np.int64]:
    """Round each coordinate up with probability equal to its fractional part (unbiased), and
    retry until the rounded vector's L2 norm is at most ``bound``.

    Raises:
        PrivacyError: no try met the bound (the input norm exceeds what ``bound`` allows).
    """
    floor = np.floor(values)
    frac = values - floor
    base = floor.astype(np.int64)
    for _ in range(max_tries):
        rounded = base + (_uniforms(values.size) < frac)
        if float(np.linalg.norm(rounded.astype(np.float64))) <= bound:
            return rounded
    raise PrivacyError(
        f"conditional rounding: no rounding within L2 bound {bound:.6g} after {max_tries} tries "
        f"(input norm {float(np.linalg.norm(values)):.6g})"
    )


def sample_poisson(lam: float, n: int) -> npt.NDArray[np.int64]:
    """n Poisson(``lam``) variates by inversion on CSPRNG uniforms (see the module docstring).

    Raises:
        ConfigError: ``lam`` not finite and > 0, or too large for a CDF table.
    """
    from scipy.stats import poisson

    if not math.isfinite(lam) or lam <= 0:
        raise ConfigError(f"Poisson rate must be a finite number > 0 (got {lam!r})")
    spread = _TAIL_SIGMAS * math.sqrt(lam) + 40
    lo, hi = max(0, int(math.floor(lam - spread))), int(math.ceil(lam + spread))
    if hi - lo > _MAX_TABLE:
        raise ConfigError(f"Poisson rate {lam:.3g} is too large for exact sampling (lower norm_units)")
    ks = np.arange(lo, hi + 1)
    cdf = poisson.cdf(ks, lam)
    return lo + np.searchsorted(cdf, _uniforms(n), side="right").astype(np.int64)


def sample_skellam(variance: float, n: int) -> npt.NDArray[np.int64]:
    """n symmetric Skellam variates of the given variance: Poisson(v/2) − Poisson(v/2)."""
    return sample_poisson(variance / 2.0, n) - sample_poisson(variance / 2.0, n)


SUM_CHECK_FAILURE = 2.0**-64  # chance that an honest noised sum fails the participants' norm check


def _skellam_tail_exponent(a: float, variance: float) -> float:
    """ln of the Chernoff bound on P(X >= a) for a symmetric Skellam X of this variance.

    E[e^(tX)] = exp(v (cosh t - 1)); at the optimal t = asinh(a / v) the bound is
    exp(v (sqrt(1 + (a/v)^2) - 1) - a asinh(a / v)).
    """
    r = a / variance
    return variance * (math.sqrt(1.0 + r * r) - 1.0) - a * math.asinh(r)


def skellam_sum_l2_bound(*, dim: int, variance: float, failure: float = SUM_CHECK_FAILURE) -> float:
    """An L2 norm that ``dim`` i.i.d. symmetric Skellam variates of ``variance`` exceed with
    probability at most ``failure``.

    Two steps, each allowed ``failure / 2``. (1) Chernoff on each coordinate: |X_i| < M for all
    i, with M the smallest value where 2 d exp(tail exponent) <= failure / 2. (2) Given that,
    Y_i = X_i^2 lies in [0, M^2], with E[Y_i] <= v and E[Y_i^2] <= E[X^4] = 3v^2 + v (conditioning
    on Y < M^2 only lowers both); Bernstein's inequality gives sum Y_i <= d v + s with
    s = L M^2 / 3 + sqrt((L M^2 / 3)^2 + 2 L d (3v^2 + v)), L = ln(2 / failure). For d = 1e5
    the bound is about 1.04 sqrt(d v): tight enough that an added vector of a few noise-free
    inputs' norm is still refused.
    """
    if variance <= 0 or dim < 1:
        return 0.0
    half = failure / 2.0
    log_target = math.log(half / (2.0 * dim))
    lo, hi = 0.0, 1.0
    while _skellam_tail_exponent(hi * math.sqrt(variance), variance) > log_target:
        hi *= 2.0
    for _ in range(100):  # bisection on M / sqrt(v)
        mid = (lo + hi) / 2.0
        if _skellam_tail_exponent(mid * math.sqrt(variance), variance) > log_target:
            lo = mid
        else:
            hi = mid
    m2 = (hi * math.sqrt(variance)) ** 2
    big_l = math.log(2.0 / half)
    linear = big_l * m2 / 3.0
    s = linear + math.sqrt(linear**2 + 2.0 * big_l * dim * (3.0 * variance**2 + variance))
    return math.sqrt(dim * variance + s)


def guaranteed_shares(spec: Any) -> int:
    """The fewest noise shares that can reach an accepted sum of this round."""
    floor = int(spec.min_participants)
    if spec.mode == "secagg":
        # a responder needs t holders besides itself, so t + 1 survive (spec.quorum)
        floor = max(floor, int(spec.threshold) + 1)
    return max(floor, 1)


@dataclass(frozen=True)
class DistributedRelease:
    """What one enterprise added in one round (for accounting; holds no secret)."""

    round_number: int
    dim: int
    l2_bound: float  # grid units, after rounding
    share_variance: float  # grid units², this enterprise's Skellam share
    grid_step: float  # γ in float units of the update
    clipped: bool

    def event(self, *, shares: int, colluders: int = 0) -> DistributedDPEvent:
        """The mechanism event when ``shares`` noise shares reached the sum, ``colluders`` of
        which the adversary may know (their noise protects nobody against it)."""
        effective = shares - colluders
        if effective < 1:
            raise DPGuardError(f"shares - colluders must be >= 1 (got {shares} - {colluders})")
        l1 = min(self.l2_bound**2, math.sqrt(self.dim) * self.l2_bound)  # integer vectors: |x|_1 <= |x|_2²
        return DistributedDPEvent(l2_sensitivity=self.l2_bound, l1_sensitivity=l1,
                                  variance=effective * self.share_variance, shares=effective)


@dataclass
class DistributedDP:
    """The noise hook: ``DistributedDP(clip_norm=C, noise_multiplier=σ)(encoded, spec=, me=)``.

    ``noise_multiplier`` is the central σ: the sum over the guaranteed minimum of shares has
    per-coordinate noise std σ × (rounded L2 bound). Refuses rounds with fewer than
    ``min_participants`` enterprises unless ``force``.

    ``colluders``: how many of the shares in the sum the adversary is assumed to know (the
    colluding enterprises' own shares -- and every enterprise of the round receives the sum
    knowing its own). They change only the *charge*: the events count ``shares - colluders``
    shares. Each share stays sized for the federation's guaranteed minimum, so that every site
    adds the same variance whatever it assumes.
    """

    clip_norm: float
    noise_multiplier: float
    min_participants: int = 10
    norm_units: int = DEFAULT_NORM_UNITS
    force: bool = False
    colluders: int = 0
    releases: list[DistributedRelease] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not math.isfinite(self.clip_norm) or self.clip_norm <= 0:
            raise ConfigError(f"clip_norm must be a finite number > 0 (got {self.clip_norm!r})")
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier <= 0:
            raise ConfigError(f"noise_multiplier must be a finite number > 0 (got {self.noise_multiplier!r})")
        if self.min_participants < 1:
            raise ConfigError(f"min_participants must be >= 1 (got {self.min_participants})")
        if not 16 <= self.norm_units <= 2**20:
            raise ConfigError(f"norm_units must be in [16, 2^20] (got {self.norm_units})")
        if self.colluders < 0:
            raise ConfigError(f"colluders must be >= 0 (got {self.colluders})")

    def grid_multiplier(self, scale_bits: int) -> int:
        """Ring units per grid step: g = round(2^scale_bits · C / norm_units) (≥ 1)."""
        return max(1, round(2.0**scale_bits * self.clip_norm / self.norm_units))

    def max_sum_abs(self, *, n_participants: int, guaranteed: int, dim: int,
                    scale_bits: int) -> int:
        """Ring units that no coordinate of the noised sum of ``n_participants`` shares exceeds
        (except with probability < 1e-80), each share sized for ``guaranteed`` shares."""
        gamma = self.grid_multiplier(scale_bits) / 2.0**scale_bits
        bound = rounded_norm_bound(self.clip_norm / gamma, dim)
        share_var = (self.noise_multiplier * bound) ** 2 / max(1, guaranteed)
        grid = n_participants * math.ceil(bound) + math.ceil(
            HEADROOM_SIGMAS * math.sqrt(n_participants * share_var)
        )
        return grid * self.grid_multiplier(scale_bits)

    def check_headroom(self, spec: Any) -> None:
        """The ring of ``spec`` must hold the noised sum without wrapping.

        Raises:
            HeadroomError: the bound of :meth:`max_sum_abs` exceeds 2^(ring_bits-1) - 1.
        """
        need = self.max_sum_abs(n_participants=len(spec.participants),
                                guaranteed=guaranteed_shares(spec), dim=int(spec.vector_length),
                                scale_bits=int(spec.scale_bits))
        if need > 2 ** (int(spec.ring_bits) - 1) - 1:
            raise HeadroomError(
                f"distributed DP: the noised sum may reach {need} ring units, above the "
                f"Z_2^{spec.ring_bits} headroom {2 ** (int(spec.ring_bits) - 1) - 1} "
                "(use ring_bits = 64 or a smaller noise_multiplier/clip_norm)"
            )

    def check_round(self, spec: Any) -> None:
        """Refuse a round too small for enterprise-level DP to mean anything, or whose ring
        cannot hold the noised sum.

        Raises:
            DPGuardError: fewer than ``min_participants`` and not forced; a CKKS round; or no
                guaranteed share beyond the assumed colluders'.
            HeadroomError: see :meth:`check_headroom`.
        """
        if spec.mode not in MASK_MODES:
            raise DPGuardError(
                f"distributed DP needs a mask mode ({', '.join(MASK_MODES)}) (got {spec.mode!r})"
            )
        n = len(spec.participants)
        if n < self.min_participants and not self.force:
            raise DPGuardError(
                f"distributed DP needs at least min_participants = {self.min_participants} enterprises"
                f" (got {n}); pass force=True to run anyway"
            )
        shares = guaranteed_shares(spec)
        if shares - self.colluders < 1:
            raise DPGuardError(
                f"distributed DP: guaranteed noise shares minus assumed colluders must be >= 1 "
                f"(got {shares} - {self.colluders})"
            )
        self.check_headroom(spec)

    def planned_release(self, spec: Any) -> DistributedRelease:
        """The release this hook will make in ``spec``'s round (before any data is touched)."""
        self.check_round(spec)
        g = self.grid_multiplier(spec.scale_bits)
        gamma = g / 2.0**spec.scale_bits
        bound = rounded_norm_bound(self.clip_norm / gamma, spec.vector_length)
        share = (self.noise_multiplier * bound) ** 2 / guaranteed_shares(spec)
        return DistributedRelease(spec.round_number, spec.vector_length, bound, share, gamma, False)

    def planned_event(self, spec: Any) -> DistributedDPEvent:
        """What to charge before the update leaves: the guaranteed minimum of shares, less the
        ``colluders`` the adversary is assumed to know."""
        return self.planned_release(spec).event(shares=guaranteed_shares(spec),
                                                colluders=self.colluders)

    def exact_event(self, survivors: int) -> DistributedDPEvent:
        """The last release's event when ``survivors`` shares reached the sum (less the
        ``colluders``).

        Raises:
            DPGuardError: no release yet, or no survivor's share beyond the colluders'.
        """
        if not self.releases:
            raise DPGuardError("distributed DP: the noise hook never ran (no release to account)")
        return self.releases[-1].event(shares=survivors, colluders=self.colluders)

    def sum_l2_bound(self, *, spec: Any, members: int) -> float:
        """An L2 bound on the decoded sum of ``members`` honest hooked inputs (float units).

        Each input is at most ``l2_bound`` grid steps after conditional rounding (enforced, not
        probable) and adds a Skellam share; the ``members`` shares sum to one Skellam of
        ``members x share_variance`` per coordinate, bounded by :func:`skellam_sum_l2_bound`
        (fails for an honest sum with probability <= :data:`SUM_CHECK_FAILURE`). The sum
        decodes as grid steps x γ exactly, so no fixed-point slack is added. Participants
        refuse a masked sum above this bound.
        """
        release = self.planned_release(spec)
        noise = skellam_sum_l2_bound(dim=release.dim, variance=members * release.share_variance)
        return release.grid_step * (members * release.l2_bound + noise)

    def __call__(self, encoded: npt.NDArray[np.unsignedinteger], *, spec: Any, me: str) -> None:
        """Clip, round onto the grid, add this enterprise's Skellam share; in place, in the ring."""
        release = self.planned_release(spec)
        ring_bits = int(spec.ring_bits)
        signed = np.int64 if ring_bits == 64 else np.int32
        if encoded.dtype != (np.uint64 if ring_bits == 64 else np.uint32):
            raise ConfigError(f"encoded vector must be uint{ring_bits} (got {encoded.dtype})")
        if encoded.shape != (spec.vector_length,):
            raise ConfigError(f"encoded vector must have shape ({spec.vector_length},) (got {encoded.shape})")
        x = encoded.view(signed).astype(np.float64) / 2.0**spec.scale_bits
        norm = float(np.linalg.norm(x))
        clipped = norm > self.clip_norm
        if clipped:
            x *= self.clip_norm / norm
        grid = conditional_randomized_round(x / release.grid_step, bound=release.l2_bound)
        noised = grid + sample_skellam(release.share_variance, grid.size)
        g = self.grid_multiplier(spec.scale_bits)
        # Two's complement wrap: (noised * g) mod 2^k, written back into the ring vector.
        encoded[:] = (noised.astype(np.int64) * np.int64(g)).astype(signed).view(encoded.dtype)
        self.releases.append(
            DistributedRelease(release.round_number, release.dim, release.l2_bound,
                               release.share_variance, release.grid_step, clipped)
        )
