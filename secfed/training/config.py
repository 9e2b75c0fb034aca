"""``DPConfig``: the DP-SGD settings of one round of local training."""

from __future__ import annotations

from dataclasses import dataclass, fields

from secfed.config import OPTIMIZERS, DPSGDTerms

__all__ = ["OPTIMIZERS", "DPConfig"]


@dataclass(frozen=True)
class DPConfig(DPSGDTerms):
    """DP-SGD settings of one round of local training: :class:`secfed.config.DPSGDTerms`
    (every field is what the accountant is told and what the optimizer uses), plus:

    Attributes:
        allow_zero_noise: sigma = 0 gives no privacy; it is refused unless this is set (only for
            tests of the clipping path, never for an update that leaves the site).
    """

    allow_zero_noise: bool = False

    def _zero_noise_allowed(self) -> bool:
        return self.allow_zero_noise

    @classmethod
    def of(cls, terms: DPSGDTerms) -> DPConfig:
        """The trainer's settings for a round's DP-SGD terms (no zero noise)."""
        return cls(**{f.name: getattr(terms, f.name) for f in fields(DPSGDTerms)})
