"""Enterprise-level (distributed) DP in the join loop: the round's noise hook and its checks.

The federation's ``[dp.distributed]`` table (pinned in this site's own ``federation.toml``) and the
coordinator's round terms must agree; the site's ``site.toml`` decides whether it takes part at
all (``accept_distributed_dp``) and how many noise shares a round must guarantee
(``min_noise_shares``). Every check here runs before the round's first secret exists.
"""

from __future__ import annotations

from secfed.config import (
    MASK_MODES,
    DistributedDPSettings,
    FederationConfig,
    RoundTerms,
    SitePolicy,
)
from secfed.errors import ConfigError, DPGuardError
from secfed.privacy.distributed import DistributedDP, guaranteed_shares
from secfed.protocol.spec import RoundSpec

__all__ = ["hook_from_settings", "distributed_hook"]


def hook_from_settings(settings: DistributedDPSettings, *, colluders: int = 0) -> DistributedDP:
    """A fresh noise hook for ``settings`` (one per round: it records that round's release);
    ``colluders``: noise shares the charge assumes the adversary knows."""
    return DistributedDP(
        clip_norm=settings.clip_norm, noise_multiplier=settings.noise_multiplier,
        min_participants=settings.min_participants, norm_units=settings.norm_units,
        force=settings.force, colluders=colluders,
    )


def distributed_hook(*, federation: FederationConfig, policy: SitePolicy, spec: RoundSpec,
                     terms: RoundTerms) -> DistributedDP | None:
    """The round's noise hook (``None`` when the federation runs without distributed DP).

    Raises:
        ConfigError: the announced settings differ from this site's ``federation.toml``, the
            site's policy refuses distributed DP, or the round is not in a mask mode.
        DPGuardError: fewer enterprises than ``min_participants`` (not forced), fewer
            guaranteed noise shares than the site's ``min_noise_shares``, or none beyond its
            ``assumed_colluders``.
        HeadroomError: the round's ring cannot hold the noised sum.
    """
    announced, pinned = terms.distributed_dp, federation.dp.distributed
    if announced != pinned:
        raise ConfigError(
            "distributed_dp must equal this site's federation.toml [dp.distributed] "
            f"(got {announced.model_dump() if announced else None}, pinned "
            f"{pinned.model_dump() if pinned else None})"
        )
    if announced is None:
        return None
    if not policy.accept_distributed_dp:
        raise ConfigError("distributed_dp must be off by site policy (accept_distributed_dp = false)")
    if spec.mode not in MASK_MODES:
        raise ConfigError(
            f"distributed_dp needs a mask mode {list(MASK_MODES)} (got {spec.mode!r})"
        )
    # The charge counts only the shares the site's assumed colluders do not know.
    hook = hook_from_settings(announced, colluders=policy.assumed_colluders)
    hook.check_round(spec)
    shares = guaranteed_shares(spec)
    if shares < policy.min_noise_shares:
        raise DPGuardError(
            f"guaranteed noise shares must be >= {policy.min_noise_shares} by site policy "
            f"(got {shares}: mode {spec.mode}, threshold {spec.threshold}, "
            f"min_participants {spec.min_participants})"
        )
    return hook
