"""Bring your own training loop: the :class:`Site` protocol and :func:`join`.

A user who keeps their own model and training code implements four methods and hands the
object to :func:`join`; the join loop does everything else -- the round's policy checks, the
privacy ledger, secure aggregation, the applied-hash confirmations, persistence of the global
vector in the kit::

    class MySite:
        def global_vector(self) -> np.ndarray: ...       # the trainable vector, float32
        def train(self, terms: RoundTerms) -> Update: ... # DP training as the terms fix
        def apply(self, new_global: np.ndarray) -> None: ...
        def evaluate(self) -> dict[str, float]: ...

    secfed.join("kits/acme", MySite())

What a custom site cannot change: the round's terms fix the DP mechanism (noise multiplier σ,
Poisson rate q, steps); the loop charges exactly that mechanism to the site's ledger, committed
to disk before the update exists; and an :class:`Update` whose reported mechanism differs from
the terms is refused (``DPGuardError``) -- nothing about it leaves the site and the charge stays.
secfed cannot look inside custom code: a site that reports the terms while running something
else defeats its own privacy. Train through :func:`secfed.training.train_local` (or report what
its :class:`~secfed.training.TrainResult` says ran) so that the mechanism comes from the DP
engine's own accounting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from secfed.config import ModelSettings, RoundTerms
from secfed.errors import ConfigError, DPGuardError
from secfed.participant.adapter import (
    StoreBacked,
    TrainOutcome,
    _StoredAdapter,
    synthetic_layout_digest,
    vector_hash,
)

__all__ = ["Mechanism", "Site", "Update", "join", "site_settings"]


@dataclass(frozen=True)
class Mechanism:
    """The DP-SGD mechanism one round of local training ran: what the ledger must be charged."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class Update:
    """What :meth:`Site.train` returns: the change to the global vector (float32, the global
    vector's length) and the mechanism that produced it. ``metrics`` stay at the site."""

    delta: np.ndarray
    mechanism: Mechanism
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Site(Protocol):
    """What :func:`join` drives: the user's model, seen as one flat float32 vector.

    ``global_vector`` is the vector the site holds now (at the first join: the initial one the
    federation was made for, see :func:`site_settings`). ``train(terms)`` runs DP training for
    one round as ``terms`` fix it (``noise_multiplier``, ``sample_rate``, ``local_steps``,
    ``max_grad_norm``, ``learning_rate``, ``optimizer``) from the current global vector and
    returns the :class:`Update`; it must leave the model at the global vector or not rely on
    where it is left, because ``apply(new_global)`` follows with the aggregate's result.
    ``evaluate()`` returns local metrics (never sent).
    """

    def global_vector(self) -> np.ndarray: ...
    def train(self, terms: RoundTerms) -> Update: ...
    def apply(self, new_global: np.ndarray) -> None: ...
    def evaluate(self) -> dict[str, float]: ...


def site_settings(initial_vector: np.ndarray, **model_fields: Any) -> ModelSettings:
    """The ``[model]`` table of a federation of custom sites starting from ``initial_vector``.

    A custom vector has no named layout: its digest binds only its length. ``model_fields``
    passes the other :class:`~secfed.config.ModelSettings` fields (``clip_bound``,
    ``scale_bits``, ``ring_bits``).

    Raises:
        ConfigError: the vector is empty, not one-dimensional or not finite.
    """
    vec = _checked_vector(initial_vector, what="initial_vector")
    return ModelSettings(vector_length=vec.size,
                         initial_global_hash=vector_hash(synthetic_layout_digest(vec.size), vec),
                         **model_fields)


def _checked_vector(vec: Any, *, what: str, length: int | None = None) -> np.ndarray:
    arr = np.asarray(vec)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.floating):
        raise ConfigError(f"{what} must be a non-empty 1-D float array (got shape "
                          f"{arr.shape}, dtype {arr.dtype})")
    if length is not None and arr.size != length:
        raise ConfigError(f"{what} must hold the federation's vector_length {length} values "
                          f"(got {arr.size})")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{what} must be finite (got a NaN or infinity)")
    return arr.astype(np.float32)


class DrivenSite(StoreBacked):
    """A user's :class:`Site` as the join loop's local site: the global vector persisted in the
    kit (a restarted site is handed the last applied vector), every update checked."""

    def __init__(self, kit_root: Path, settings: ModelSettings, site: Site) -> None:
        missing = [m for m in ("global_vector", "train", "apply", "evaluate")
                   if not callable(getattr(site, m, None))]
        if missing:
            raise ConfigError(f"site must implement secfed.Site (missing {missing})")
        self.site = site
        self.length = settings.vector_length
        initial = _checked_vector(site.global_vector(), what="site.global_vector()",
                                  length=self.length)
        self._store = _StoredAdapter(kit_root, synthetic_layout_digest(self.length), initial,
                                     settings.initial_global_hash)
        if self._store.applied_round:  # restarted: continue from the last applied round
            site.apply(self._store.vector.copy())

    def train(self, terms: RoundTerms) -> TrainOutcome:
        """Run the site's training and check what it returns against the terms.

        Raises:
            DPGuardError: not an :class:`Update`, a mechanism other than the terms', or a delta
                of the wrong length / not finite (nothing of it is sent).
        """
        update = self.site.train(terms)
        if not isinstance(update, Update) or not isinstance(update.mechanism, Mechanism):
            raise DPGuardError(f"site.train must return secfed.Update with a secfed.Mechanism "
                               f"(got {type(update).__name__})")
        ran = update.mechanism
        fixed = (terms.noise_multiplier, terms.sample_rate, terms.local_steps)
        reported = (ran.noise_multiplier, ran.sample_rate, ran.steps)
        if reported != fixed:
            raise DPGuardError(
                f"site.train reports (noise_multiplier, sample_rate, steps) = {reported} but the "
                f"round's terms fix {fixed}: the update is not sent (the ledger charge stays)")
        try:
            delta = _checked_vector(update.delta, what="update.delta", length=self.length)
        except ConfigError as exc:
            raise DPGuardError(str(exc)) from None
        metrics = {k: float(v) for k, v in update.metrics.items()
                   if isinstance(v, int | float) and math.isfinite(v)}
        return TrainOutcome(delta, float(ran.noise_multiplier), float(ran.sample_rate),
                            int(ran.steps), metrics)

    def _loaded(self) -> None:
        # the user's site is handed every new current vector (apply or roll back) as a copy
        self.site.apply(self._store.vector.copy())

    def evaluate(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.site.evaluate().items()}


def join(kit: Any, site: Site, *, events: Callable[[dict[str, Any]], None] | None = None,
         max_rounds: int | None = None, new_ledger: bool = False) -> list:
    """Take part in the federation of ``kit`` (a kit directory or a loaded
    :class:`~secfed.federation.kits.EnterpriseKit`) with the user's ``site`` until it finishes.

    Returns one :class:`~secfed.participant.RoundReport` per round seen. ``new_ledger`` starts a
    fresh privacy ledger for a site that never took part (as ``secfed join --new-ledger``).

    Raises:
        ConfigError: ``site`` does not implement :class:`Site`, or its vector does not match
            the federation's length / initial hash.
        DPGuardError: an update's mechanism differs from the round's terms (it is not sent).
        LedgerError: the ledger is missing (without ``new_ledger``).
    """
    from secfed.federation.kits import EnterpriseKit
    from secfed.participant.loop import Participant

    loaded = kit if isinstance(kit, EnterpriseKit) else EnterpriseKit.load(kit)
    driven = DrivenSite(loaded.root, loaded.federation.model, site)
    participant = Participant(loaded, driven, events=events, new_ledger=new_ledger)
    try:
        return participant.run(max_rounds=max_rounds)
    finally:
        driven.flush()
        participant.close()
