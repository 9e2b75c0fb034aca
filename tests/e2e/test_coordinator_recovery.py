"""Coordinator restart edge: a round whose row was committed without its first stage (a kill
between the two commits of older versions) is resumed with a fresh deadline, not aborted at
once; new rounds commit the round and its first stage together."""

from __future__ import annotations

import time

from secfed.config import Deadlines, DPSettings
from secfed.coordinator.service import RESTART_GRACE_S, Coordinator
from secfed.federation.kits import CoordinatorKit, create_kits
from secfed.federation.plan import model_settings_for
from secfed.protocol.spec import Stage

ENTERPRISES = ["energy-utility", "security-operator", "city-ops"]


def _kit(tmp_path) -> CoordinatorKit:
    kits = create_kits(
        tmp_path, name="recovery", enterprises=ENTERPRISES,
        coordinator_url="https://127.0.0.1:9", mode_schedule=("secagg",), rounds=2,
        model=model_settings_for(model_dir=None, synthetic_dim=64),
        deadlines=Deadlines(train=60, stage=10, applied=10),
        dp=DPSettings(noise_multiplier=2.0, sample_rate=0.001, local_steps=1),
    )
    return CoordinatorKit.load(kits.coordinator)


def test_round_row_without_stage_is_resumed_not_aborted(tmp_path) -> None:
    kit = _kit(tmp_path)
    first = Coordinator(kit)
    spec = first._spec(1)
    first.state.open_round(  # the older code's first commit; killed before the stage row
        round_number=1, mode=spec.mode, participants=spec.participants,
        threshold=spec.threshold, global_hash_before=spec.global_hash, spec=spec.to_bytes())
    first.state.close()
    again = Coordinator(kit)
    assert again._recover() == 1
    live = again._live
    assert live is not None and live.status == "open"
    assert live.machine.stage is Stage.ADVERTISE
    assert live.deadline >= time.time() + RESTART_GRACE_S - 5
    assert [s.stage for s in again.state.stages(1)] == ["advertise"]
    assert again.state.round(1).status == "open"


def test_new_round_and_first_stage_are_on_disk_together(tmp_path) -> None:
    kit = _kit(tmp_path)
    coordinator = Coordinator(kit)
    coordinator._open_round(1)
    coordinator.state.close()
    again = Coordinator(kit)
    assert [s.stage for s in again.state.stages(1)] == ["advertise"]
    assert again._recover() == 1 and again._live is not None
    assert again._live.status == "open"
