"""A federation's plan: every setting its kits pin, validated in one pydantic model, and
:func:`plan_federation`, which writes the kits from it.

``secfed federation init`` and ``invite`` build a :class:`FederationPlan` from their options
(whose defaults are the plan's field defaults), so the settings' rules and defaults live only
in :mod:`secfed.config`; :func:`model_settings_for` makes the ``[model]`` table from a model
directory or a synthetic size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from secfed.config import (
    AggregationMode,
    Deadlines,
    DPSettings,
    FederationConfig,
    ModelSettings,
    SitePolicy,
    default_of,
    validated,
)
from secfed.errors import ConfigError
from secfed.federation.kits import KitPaths, create_kits
from secfed.names import synthetic_layout_digest, vector_hash

__all__ = ["FederationPlan", "make_plan", "plan_federation", "model_settings_for"]


class FederationPlan(BaseModel):
    """Every setting a federation's kits pin, before any key exists.

    The rules are the config models' own (:class:`~secfed.config.FederationConfig`,
    :class:`~secfed.config.DPSettings`, :class:`~secfed.config.Deadlines`,
    :class:`~secfed.config.ModelSettings`); the roster size is checked when the kits are
    written, against the real number of enterprises.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    coordinator_url: str
    model: ModelSettings
    mode_schedule: tuple[AggregationMode, ...] = default_of(FederationConfig, "mode_schedule")
    rounds: int = default_of(FederationConfig, "rounds")
    threshold: int | None = None
    min_participants: int | None = None
    deadlines: Deadlines = Deadlines()
    dp: DPSettings = DPSettings()
    policy_budget_epsilon: float | None = Field(
        None, gt=0, description="each site's budget (default: the plan's target epsilon)")
    policy_min_noise_multiplier: float = default_of(SitePolicy, "min_noise_multiplier")

    def invitation_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`secfed.federation.enrol.invite`."""
        return dict(name=self.name, coordinator_url=self.coordinator_url, model=self.model,
                    mode_schedule=tuple(self.mode_schedule), rounds=self.rounds,
                    threshold=self.threshold, min_participants=self.min_participants,
                    deadlines=self.deadlines, dp=self.dp)


def plan_federation(plan: FederationPlan, out: str | Path, *, enterprises: list[str],
                    force: bool = False) -> KitPaths:
    """Write every party's kit for ``plan`` under ``out`` on this machine (the whole
    enrolment; see :func:`secfed.federation.kits.create_kits`).

    Raises:
        ConfigError: a setting breaks a rule for this roster, or ``out`` is not new/empty.
    """
    return create_kits(out, enterprises=list(enterprises), **plan.invitation_settings(),
                       policy_budget_epsilon=plan.policy_budget_epsilon,
                       policy_min_noise_multiplier=plan.policy_min_noise_multiplier,
                       force=force)


def make_plan(**fields: Any) -> FederationPlan:
    """A :class:`FederationPlan` from keyword fields.

    Raises:
        ConfigError: a field breaks a rule (one line naming it).
    """
    return validated(FederationPlan, **fields)


def model_settings_for(*, model_dir: Path | None, synthetic_dim: int | None,
                       trainable: str = "adapter") -> ModelSettings:
    """The ``[model]`` table of a new federation, from a model directory or a synthetic size.

    ``trainable`` names what sites train (``secfed.models.TRAINABLE_SCOPES``); the vector the
    federation aggregates is that set.

    Raises:
        ConfigError: neither or both given, or a trainable set for a synthetic model.
        ModelError: a trainable set the model does not have.
    """
    if (model_dir is None) == (synthetic_dim is None):
        raise ConfigError("exactly one of --model and --synthetic-dim must be given (got "
                          f"{'both' if model_dir else 'neither'})")
    if synthetic_dim is not None:
        if synthetic_dim < 1:
            raise ConfigError(f"--synthetic-dim must be >= 1 (got {synthetic_dim})")
        if trainable != "adapter":
            raise ConfigError(f"--trainable {trainable} needs --model (a synthetic federation "
                              "has no towers)")
        zeros = np.zeros(synthetic_dim, np.float32)
        return ModelSettings(
            vector_length=synthetic_dim,
            initial_global_hash=vector_hash(synthetic_layout_digest(synthetic_dim), zeros),
        )
    from secfed.models import adapter_layout, get_flat
    from secfed.models.scopes import load_for_scope

    model = load_for_scope(model_dir, trainable)
    layout = adapter_layout(model)
    vec = get_flat(model, layout)
    return ModelSettings(
        vector_length=layout.total, initial_global_hash=vector_hash(layout.digest(), vec),
        trainable=trainable,  # type: ignore[arg-type]
    )

