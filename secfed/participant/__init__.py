"""The enterprise side of a federation: the ``secfed join`` loop.

Front door: :func:`run_participant` (what ``secfed join`` calls).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from secfed import progress
from secfed.federation.kits import EnterpriseKit
from secfed.names import FEATURE_SCOPES
from secfed.participant.adapter import ModelSite, SyntheticSite
from secfed.participant.loop import Participant, RoundReport

__all__ = ["Participant", "RoundReport", "run_participant"]


def run_participant(
    kit_dir: str | Path,
    *,
    model_dir: Path | None = None,
    data_dir: Path | None = None,
    test_dir: Path | None = None,
    synthetic: bool = False,
    synthetic_train_s: float = 0.0,
    events: Callable[[dict[str, Any]], None] | None = None,
    max_rounds: int | None = None,
    new_ledger: bool = False,
) -> list[RoundReport]:
    """Join the federation of the kit at ``kit_dir`` and take part until it is finished.

    ``new_ledger`` starts a fresh privacy ledger when the kit has none (never for a site whose
    state shows it took part before); without it a missing ledger is refused (LedgerError).
    """
    kit = EnterpriseKit.load(kit_dir)
    if synthetic:
        site: Any = SyntheticSite(kit.root, kit.enterprise_id, kit.federation.model,
                                  train_seconds=synthetic_train_s)
    else:
        if model_dir is None or data_dir is None:
            from secfed.errors import ConfigError

            raise ConfigError("--model and --data must both be given (or --synthetic)")
        # minutes at the demo's scale with frozen towers (features computed once): say so
        with progress.task(f"{kit.enterprise_id}: loading the model and data"
                           + (", computing tower features" if kit.federation.model.trainable
                              in FEATURE_SCOPES else "")):
            site = ModelSite(kit.root, kit.enterprise_id, kit.federation.model,
                             model_dir=model_dir, data_dir=data_dir, test_dir=test_dir)
        progress.step(f"{kit.enterprise_id}: ready; taking part in rounds at "
                      f"{kit.federation.coordinator_url}")
    participant = Participant(kit, site, events=events, new_ledger=new_ledger)
    try:
        return participant.run(max_rounds=max_rounds)
    finally:
        participant.close()
