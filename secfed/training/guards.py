"""Guardrails against silent DP-SGD mistakes; each raises ``DPGuardError`` naming its check.

The failures Opacus and FL users report most: a sampler other than the accounted Poisson one
(Opacus #813: a weighted sampler made q ~45,000x off), a normalisation that does not match the
accounting (#819), and per-sample gradients silently missing so adapters are corrupted while loss
and epsilon look normal (#820). Every message starts with ``guard <name>:``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from secfed.errors import DPGuardError
from secfed.training.config import DPConfig
from secfed.training.noise import noise_grid

__all__ = [
    "NOISE_TAIL",
    "AccountedRelease",
    "check_accountant_history",
    "check_accounting",
    "check_adapter_delta",
    "check_per_sample_grads",
    "check_sampler",
    "delta_norm_bound",
]

# For z ~ N(0, s^2 I_d): P(||z|| > s (sqrt(d) + t)) <= exp(-t^2 / 2) (Gaussian concentration of
# the 1-Lipschitz norm, E||z|| <= s sqrt(d)). t = 10 puts a false alarm at e^-50 per step.
NOISE_TAIL = 10.0
# Relative slack for float32 rounding in the bound.
_ROUNDING = 1e-4
# Adam defaults (torch): the bound in delta_norm_bound uses them.
ADAM_BETAS = (0.9, 0.999)


class AccountedRelease(Protocol):
    """What the accountant/ledger is charged with (``secfed.privacy``'s DP-SGD event shape)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _fail(check: str, message: str) -> DPGuardError:
    return DPGuardError(f"guard {check}: {message}")


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)


def check_sampler(batch_sampler: Any, *, dataset_size: int, config: DPConfig) -> None:
    """The batch sampler must be Opacus' Poisson sampler with the accounted q and step count.

    Raises:
        DPGuardError: ``sampler`` (not Poisson), ``sample_rate``, ``dataset_size`` or ``steps``.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if type(batch_sampler) is not UniformWithReplacementSampler:
        inner = getattr(batch_sampler, "sampler", None)
        name = type(batch_sampler).__name__ + (f"({type(inner).__name__})" if inner else "")
        raise _fail(
            "sampler",
            "DP-SGD needs Poisson sampling (opacus UniformWithReplacementSampler) so that the "
            f"accounted sample rate holds (got {name})",
        )
    if not _same(batch_sampler.sample_rate, config.sample_rate):
        raise _fail(
            "sample_rate",
            f"sampler's sample_rate must equal the accounted q={config.sample_rate!r} "
            f"(got {batch_sampler.sample_rate!r})",
        )
    if batch_sampler.num_samples != dataset_size:
        raise _fail(
            "dataset_size",
            f"sampler must draw from all {dataset_size} records (got {batch_sampler.num_samples})",
        )
    if len(batch_sampler) != config.local_steps:
        raise _fail(
            "steps",
            f"sampler must yield local_steps={config.local_steps} batches "
            f"(got {len(batch_sampler)})",
        )


def check_accounting(
    *,
    accounted: AccountedRelease,
    config: DPConfig,
    optimizer: Any,
    batch_sampler: Any,
    dataset_size: int,
) -> None:
    """Before training: q, sigma, steps the accountant is charged with, and C, are what the
    optimizer and sampler will use (``secfed.privacy.check_accounting_matches``); gradients are
    averaged by the fixed q*N (Opacus #819).

    Raises:
        DPGuardError: ``accounting`` (naming the field), ``sample_rate``, ``normalisation`` or
            ``optimizer``.
    """
    from secfed.privacy import check_accounting_matches

    if not _same(config.sample_rate, batch_sampler.sample_rate):
        raise _fail(
            "sample_rate",
            f"sampler's sample_rate must equal config.sample_rate={config.sample_rate!r} "
            f"(got {batch_sampler.sample_rate!r})",
        )
    try:
        check_accounting_matches(
            accountant_params={
                "noise_multiplier": accounted.noise_multiplier,
                "sample_rate": accounted.sample_rate,
                "steps": accounted.steps,
                "max_grad_norm": config.max_grad_norm,
            },
            optimizer_params={
                "noise_multiplier": optimizer.noise_multiplier,
                "sample_rate": batch_sampler.sample_rate,
                "steps": len(batch_sampler),
                "max_grad_norm": optimizer.max_grad_norm,
            },
        )
    except DPGuardError as exc:
        raise _fail("accounting", str(exc)) from None
    expected = accounted.sample_rate * dataset_size
    if optimizer.loss_reduction != "mean" or not _same(optimizer.expected_batch_size, expected):
        raise _fail(
            "normalisation",
            "the clipped, noised gradient sum must be divided by the fixed expected batch q*N="
            f"{expected!r} (loss_reduction='mean') (got {optimizer.expected_batch_size!r}, "
            f"{optimizer.loss_reduction!r})",
        )
    inner = optimizer.original_optimizer
    for group in inner.param_groups:
        if group.get("weight_decay", 0) or group.get("momentum", 0):
            raise _fail(
                "optimizer",
                "weight decay and momentum are not allowed (the delta bound assumes none) "
                f"(got weight_decay={group.get('weight_decay')}, "
                f"momentum={group.get('momentum')})",
            )


def check_per_sample_grads(
    per_sample: Iterable[tuple[str, torch.Tensor | None]], batch_size: int
) -> None:
    """Every trainable parameter must have per-example gradients for the whole batch (#820).

    Args:
        per_sample: ``(name, [B, ...] tensor or None)`` for each trainable parameter.

    Raises:
        DPGuardError: ``per_sample_grads`` naming the first parameter without them.
    """
    for name, grad_sample in per_sample:
        if grad_sample is None:
            raise _fail(
                "per_sample_grads",
                f"parameter {name!r} got no per-sample gradient (its module ran without the "
                "per-example hooks, or it is used outside a module call); DP-SGD would silently "
                "skip or corrupt it (Opacus #820)",
            )
        if grad_sample.shape[0] != batch_size:
            raise _fail(
                "per_sample_grads",
                f"parameter {name!r} has per-sample gradients for {grad_sample.shape[0]} "
                f"examples (batch of {batch_size})",
            )


def delta_norm_bound(
    *, config: DPConfig, batch_sizes: Sequence[int], dimension: int, dataset_size: int
) -> float:
    """Largest L2 norm the adapter delta can have after the steps DP-SGD took.

    SGD: each step moves by lr * (B_t * C + ||z_t||) / (q N), with B_t the realised batch size
    and ||z_t|| <= sigma C (sqrt(d) + NOISE_TAIL) + sqrt(d) gamma / 2: the noised sum is snapped
    to the grid gamma of :func:`secfed.training.noise.noise_grid`, which moves each coordinate
    by at most gamma / 2. Adam: each coordinate of a step moves by at
    most lr * (1 - b1) sqrt(1 - b2^t) / ((1 - b1^t) sqrt((1 - b2)(1 - b1^2 / b2))) (Cauchy-Schwarz
    on the moment sums), independent of the gradients.
    """
    lr, clip, sigma = config.learning_rate, config.max_grad_norm, config.noise_multiplier
    if config.optimizer == "sgd":
        expected = config.sample_rate * dataset_size
        noise = sigma * clip * (math.sqrt(dimension) + NOISE_TAIL)
        if sigma > 0:
            noise += math.sqrt(dimension) * noise_grid(sigma * clip) / 2
        total = sum(lr * (b * clip + noise) / expected for b in batch_sizes)
    else:
        b1, b2 = ADAM_BETAS
        base = (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))
        total = sum(
            lr * math.sqrt(dimension) * base * math.sqrt(1 - b2**t) / (1 - b1**t)
            for t in range(1, len(batch_sizes) + 1)
        )
    return total * (1 + _ROUNDING) + 1e-12


def check_adapter_delta(delta: np.ndarray, *, bound: float) -> float:
    """The delta must be finite, not all zero, and within ``bound``; returns its L2 norm.

    Raises:
        DPGuardError: ``delta_finite``, ``delta_nonzero`` or ``delta_norm``.
    """
    if not np.isfinite(delta).all():
        bad = int((~np.isfinite(delta)).sum())
        raise _fail("delta_finite", f"adapter delta has {bad} NaN/inf entries")
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    if norm == 0.0:
        raise _fail(
            "delta_nonzero",
            "adapter delta is all zero: the optimizer never moved the adapter (per-sample "
            "gradients or noise never reached it)",
        )
    if norm > bound:
        raise _fail(
            "delta_norm",
            f"adapter delta norm must be <= {bound:.6g}, what clipped and noised steps can "
            f"produce (got {norm:.6g})",
        )
    return norm


def check_accountant_history(history: Sequence[tuple[float, float, int]],
                             accounted: AccountedRelease) -> None:
    """After training: the Opacus accountant saw exactly one (sigma, q, steps) release equal to
    the accounted one.

    Raises:
        DPGuardError: ``accountant``.
    """
    ok = (
        len(history) == 1
        and _same(history[0][0], accounted.noise_multiplier)
        and _same(history[0][1], accounted.sample_rate)
        and history[0][2] == accounted.steps
    )
    if not ok:
        raise _fail(
            "accountant",
            "the optimizer's steps must compose to the accounted (sigma, q, steps)=("
            f"{accounted.noise_multiplier}, {accounted.sample_rate}, {accounted.steps}) "
            f"(got {list(history)})",
        )
