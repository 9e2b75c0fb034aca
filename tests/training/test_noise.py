"""DP-SGD noise: OS CSPRNG, grid-snapped, exactly sampled (secfed.training.noise).

Issue 20 item 7: the noise came from torch's Mersenne Twister (seeded with 63 bits) and its
floating-point low-order bits depended on the clipped sum (Mironov 2012). These tests pin the
distribution (mean/variance intervals at fixed sizes), the grid, that the fast path agrees with
the exact high-precision path, that no torch/numpy/``random`` generator is involved, and that
the trainer uses this sampler.
"""

import random

import mpmath
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from training_items import make_items

from secfed.errors import DPGuardError
from secfed.training import DPConfig, make_private_trainer, train_local
from secfed.training.dp_optimizer import FlatDPOptimizer
from secfed.training.noise import FAST_MARGIN, GRID_BITS, SecureGaussianNoise, noise_grid

# two-sided 1e-6 intervals everywhere: a correct sampler fails one of these about once in 1e6 runs
P_TAIL = 0.5e-6
Z_TAIL = stats.norm.isf(P_TAIL)


def _on_grid(values: np.ndarray, grid: float) -> bool:
    k = values / grid  # exact: grid is a power of two
    return bool(np.array_equal(k, np.round(k)))


def test_grid_is_a_power_of_two_between_std_over_2048_and_std_over_1024():
    for std in (1e-3, 0.7, 1.0, 1.3 * 0.7, 5.0, 1234.5):
        grid = noise_grid(std)
        assert np.frexp(grid)[0] == 0.5  # a power of two
        assert std / 2 ** (GRID_BITS + 1) < grid <= std / 2**GRID_BITS
    with pytest.raises(DPGuardError, match="guard noise"):
        noise_grid(float("nan"))


@pytest.mark.parametrize("std", [0.7, 1.6])
def test_noise_mean_and_variance_within_their_confidence_intervals(std):
    """d = 200k draws around a non-zero input: the sample mean within 5.0 sigma/sqrt(d), the sum
    of squares in the chi-square(d) interval (rounding adds <= std^2/2^20 of variance, ~0.2
    units of the sum, against an interval ~+-3000 wide), and Kolmogorov-Smirnov against N(0,1)."""
    d = 200_000
    x = torch.from_numpy(np.random.default_rng(3).uniform(-3, 3, d).astype(np.float32))
    noise = SecureGaussianNoise(std)
    z = (noise(x).double() - x.double()).numpy() / std
    assert abs(z.mean()) < Z_TAIL / np.sqrt(d)
    low, high = stats.chi2.ppf([P_TAIL, 1 - P_TAIL], df=d)
    assert low <= float((z**2).sum()) <= high
    assert stats.kstest(z, "norm").pvalue > 1e-6
    # and the sign is fair: the count of positive draws within its binomial interval
    assert abs(int((z > 0).sum()) - d / 2) < Z_TAIL * np.sqrt(d / 4)


def test_every_noised_coordinate_lies_on_the_grid():
    """Mironov's attack reads x off the low-order bits of fl(x + Z); here every released value
    is an integer multiple of the power-of-two grid, whatever x's low bits are."""
    std = 0.9
    noise = SecureGaussianNoise(std)
    base = np.random.default_rng(1).standard_normal(50_000).astype(np.float32)
    for x in (base, np.nextafter(base, np.float32(np.inf))):  # inputs one ulp apart
        y = noise(torch.from_numpy(x)).double().numpy()
        assert _on_grid(y, noise.grid)


def test_optimizer_releases_only_grid_values():
    """Through FlatDPOptimizer (divisor 1, lr 1, from zero): the parameter is minus the noised
    clipped sum, and every coordinate is on the grid of sigma * C."""
    p = nn.Parameter(torch.zeros(3000))
    sigma, clip = 1.1, 0.8
    opt = FlatDPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=sigma,
                          max_grad_norm=clip, expected_batch_size=1.0, loss_reduction="mean")
    flat = torch.randn(5, 3000, generator=torch.Generator().manual_seed(2)) * 0.01
    opt.set_per_sample_grads(flat)
    opt.step()
    y = -p.detach().double().numpy()
    assert _on_grid(y, noise_grid(sigma * clip))
    z = (y - flat.sum(0).double().numpy()) / (sigma * clip)  # clip never binds at this size
    low, high = stats.chi2.ppf([P_TAIL, 1 - P_TAIL], df=z.size)
    assert low <= float((z**2).sum()) <= high


def test_seeding_cannot_repeat_the_noise():
    """torch.manual_seed, numpy and random seeds with the same value twice: different noise."""
    noise = SecureGaussianNoise(1.0)
    x = torch.zeros(4096)
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        draws.append(noise(x))
    assert not torch.equal(draws[0], draws[1])


def test_a_torch_generator_is_refused():
    p = nn.Parameter(torch.zeros(4))
    with pytest.raises(DPGuardError, match="guard noise.*never seeded"):
        FlatDPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                        expected_batch_size=1.0, loss_reduction="mean",
                        generator=torch.Generator().manual_seed(9))


def _no_torch_gaussians(monkeypatch):
    """torch's Gaussian samplers fail when called (uniforms stay: Poisson sampling uses them)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the DP noise must not come from a torch generator")

    for name in ("normal", "randn", "randn_like"):
        monkeypatch.setattr(torch, name, refuse)
    monkeypatch.setattr(torch.Tensor, "normal_", refuse)


def test_noise_never_calls_a_torch_generator(monkeypatch):
    """With torch's samplers replaced by a function that fails, a noise-only step still runs."""
    p = nn.Parameter(torch.zeros(2000))
    opt = FlatDPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0,
                          max_grad_norm=1.0, expected_batch_size=1.0, loss_reduction="mean")
    state = torch.get_rng_state()
    _no_torch_gaussians(monkeypatch)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: 1 / 0)
    opt.set_per_sample_grads(torch.zeros(0, 2000))
    opt.step()
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator untouched
    low, high = stats.chi2.ppf([P_TAIL, 1 - P_TAIL], df=2000)
    assert low <= float((p.detach().double() ** 2).sum()) <= high


def test_the_trainer_uses_the_secure_sampler_by_default(build, monkeypatch):
    """make_private_trainer's optimizer noises with SecureGaussianNoise(sigma C); a whole
    train_local round runs with torch's Gaussian samplers disabled, and the same seeds
    (torch.manual_seed and seed=) twice give the same Poisson batches but different noise."""
    model = build("text")
    config = DPConfig(noise_multiplier=1.3, sample_rate=0.5, local_steps=2, max_grad_norm=0.7,
                      learning_rate=0.1)
    trainer = make_private_trainer(model, make_items(model, 8), config=config)
    sampler = trainer.optimizer.noise()
    trainer.close()
    assert isinstance(sampler, SecureGaussianNoise) and sampler.std == 1.3 * 0.7
    assert trainer.optimizer.noise_sampler is None and trainer.optimizer.generator is None

    runs = []
    for _ in range(2):
        model = build("text")
        data = make_items(model, 8)
        with monkeypatch.context() as patch:
            _no_torch_gaussians(patch)
            torch.manual_seed(0)
            runs.append(train_local(model, data, config=config, seed=7))
    assert runs[0].batch_sizes == runs[1].batch_sizes
    assert not np.array_equal(runs[0].delta, runs[1].delta)


def _ideal_t_range(u, s, negative, j, bits):
    """t = u +/- s A over W in [j, j+1) 2^-bits, A = sqrt(2) erfinv(1 - W), at 400 bits."""
    with mpmath.workprec(400):
        ends = []
        for w in (mpmath.ldexp(j, -bits), mpmath.ldexp(j + 1, -bits)):
            a = mpmath.sqrt(2) * mpmath.erfinv(1 - w)
            ends.append(mpmath.mpf(u) + (-s if negative else s) * a)
        return min(ends), max(ends)


def test_fast_path_agrees_with_the_exact_path():
    """4000 coordinates at random offsets: every bucket the vectorised float64 path certifies
    equals the bucket the high-precision path certifies for the whole W interval (started 3
    buckets off); an uncertified one is within one bucket of it."""
    noise = SecureGaussianNoise(0.83)
    rng = np.random.default_rng(4)
    u = rng.uniform(-5000, 5000, 4000)
    u[:1000] = np.round(u[:1000]) + 0.5  # offsets on an edge, as a zero input's would be
    words = rng.integers(0, 2**64, u.size, dtype=np.uint64)
    fast, certified = noise._fast_buckets(u, words)
    exact = np.array([
        noise._exact_bucket(float(u[i]), int(words[i]) >> 63 == 1,
                            int(words[i]) & (2**63 - 1), int(fast[i]) + 3)
        for i in range(u.size)])
    assert certified.mean() > 0.99
    assert np.array_equal(fast[certified], exact[certified])
    assert np.abs(fast - exact).max() <= 1


def test_ndtri_meets_the_accuracy_the_fast_path_assumes():
    """The fast path's error bound assumes scipy's ndtri within 2^-40 relative error on the
    half-W values it sees (2^-64 .. 1/2, i.e. A <= 6 and beyond); measured against mpmath."""
    from scipy.special import ndtri

    rng = np.random.default_rng(5)
    p = np.concatenate([0.5 * rng.random(500), 2.0 ** -rng.uniform(1, 64, 500)])
    got = ndtri(p)
    with mpmath.workprec(160):
        want = np.array([float(mpmath.sqrt(2) * mpmath.erfinv(2 * mpmath.mpf(x) - 1))
                         for x in p])
    assert np.all(np.abs(got - want) <= 2.0**-40 * np.abs(want) + 1e-300)


def test_exact_path_certifies_buckets_and_refines_at_an_edge():
    """A W interval inside one bucket gives that bucket; one holding the edge t = 7.5 draws more
    bits of W and lands on either side, in proportion to where the edge cuts the interval."""
    noise = SecureGaussianNoise(1.0)
    s = mpmath.mpf(noise._scale.numerator) / noise._scale.denominator
    bits = 63
    with mpmath.workprec(400):  # the W at which t = 0 + s A crosses 7.5
        w_edge = mpmath.erfc((mpmath.mpf(7.5) / s) / mpmath.sqrt(2))
        j_edge = int(mpmath.floor(mpmath.ldexp(w_edge, bits)))
    for j in (j_edge - 2**50, j_edge + 2**50):  # ~0.2 grid units either side of the edge
        lo, hi = _ideal_t_range(0.0, s, False, j, bits)
        want = int(mpmath.floor(lo + 0.5))
        assert want == int(mpmath.floor(hi + 0.5)) and abs(lo - 7.5) > 0.1
        assert noise._exact_bucket(0.0, False, j, want - 2) == want
    lo, hi = _ideal_t_range(0.0, s, False, j_edge, bits)
    assert lo < 7.5 < hi
    below = float((7.5 - lo) / (hi - lo))  # the share of the interval with t < 7.5
    got = [noise._exact_bucket(0.0, False, j_edge, 7) for _ in range(400)]
    assert set(got) <= {7, 8}
    assert abs(got.count(7) - 400 * below) < Z_TAIL * np.sqrt(400 * below * (1 - below)) + 1
    # mirrored: negative sign, t = 0 - s A crosses -7.5 at the same W
    got = [noise._exact_bucket(0.0, True, j_edge, -7) for _ in range(400)]
    assert set(got) <= {-7, -8}
    assert abs(got.count(-7) - 400 * below) < Z_TAIL * np.sqrt(400 * below * (1 - below)) + 1


def test_exact_path_is_taken_near_edges_and_in_the_tails():
    """Coordinates whose float64 value lies within FAST_MARGIN of an edge go to the exact path;
    the rate is about 2 * FAST_MARGIN per coordinate."""
    noise = SecureGaussianNoise(1.0)
    d = 400_000
    noise.sample_buckets(np.zeros(d))
    rate = noise.exact_path_count / d
    expected = 2 * FAST_MARGIN
    assert abs(rate - expected) < Z_TAIL * np.sqrt(expected / d)


def test_zero_std_is_the_identity_for_the_clipping_tests():
    x = torch.randn(10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(SecureGaussianNoise(0.0)(x), x)
