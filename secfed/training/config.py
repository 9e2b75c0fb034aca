"""``DPConfig``: the DP-SGD settings of one round of local training."""

from __future__ import annotations

import math
from dataclasses import dataclass

from secfed.errors import ConfigError

__all__ = ["OPTIMIZERS", "DPConfig"]

# Optimizers whose per-step update norm we can bound (see guards.delta_norm_bound): plain SGD
# (no momentum, no weight decay) and Adam with the default betas.
OPTIMIZERS = ("sgd", "adam")


def _positive_finite(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {rule} (got {value!r})")


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings; every field is what the accountant is told and what the optimizer uses.

    Attributes:
        noise_multiplier: sigma; the Gaussian noise std is ``noise_multiplier * max_grad_norm``.
        sample_rate: q, the Poisson sampling probability of each record per step.
        local_steps: number of DP-SGD steps this round (empty Poisson batches count).
        max_grad_norm: C, the per-example L2 clip bound.
        learning_rate: step size.
        optimizer: ``"sgd"`` (plain) or ``"adam"``.
        allow_zero_noise: sigma = 0 gives no privacy; it is refused unless this is set (only for
            tests of the clipping path, never for an update that leaves the site).
    """

    noise_multiplier: float
    sample_rate: float
    local_steps: int
    max_grad_norm: float = 1.0
    learning_rate: float = 0.05
    optimizer: str = "sgd"
    allow_zero_noise: bool = False

    def __post_init__(self) -> None:
        _positive_finite("noise_multiplier", self.noise_multiplier, allow_zero=True)
        if self.noise_multiplier == 0 and not self.allow_zero_noise:
            raise ConfigError(
                "noise_multiplier must be > 0 (got 0: no privacy); set allow_zero_noise only "
                "in tests"
            )
        _positive_finite("sample_rate", self.sample_rate)
        if self.sample_rate > 1:
            raise ConfigError(f"sample_rate must be in (0, 1] (got {self.sample_rate!r})")
        if (
            isinstance(self.local_steps, bool)
            or not isinstance(self.local_steps, int)
            or self.local_steps < 1
        ):
            raise ConfigError(f"local_steps must be an integer >= 1 (got {self.local_steps!r})")
        _positive_finite("max_grad_norm", self.max_grad_norm)
        _positive_finite("learning_rate", self.learning_rate)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r})")
