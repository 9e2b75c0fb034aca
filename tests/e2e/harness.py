"""Helpers for end-to-end tests: kits, separate coordinator / join processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from secfed.config import Deadlines, DPSettings
from secfed.federation.kits import KitPaths, create_kits
from secfed.federation.plan import model_settings_for
from secfed.participant.adapter import synthetic_update

PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_federation(root: Path, *, enterprises: list[str], dim: int, schedule: tuple[str, ...],
                    rounds: int, stage: float = 20.0, train: float = 120.0,
                    applied: float = 20.0, between: float = 0.0, threshold: int | None = None,
                    min_participants: int | None = None, dp: DPSettings | None = None,
                    start: float = 600.0) -> KitPaths:
    return create_kits(
        root, name="e2e", enterprises=enterprises,
        coordinator_url=f"https://127.0.0.1:{free_port()}",
        model=model_settings_for(model_dir=None, synthetic_dim=dim), mode_schedule=schedule,
        rounds=rounds, threshold=threshold, min_participants=min_participants,
        deadlines=Deadlines(train=train, stage=stage, applied=applied, between_rounds=between,
                            start=start),
        dp=dp or DPSettings(noise_multiplier=1.0, sample_rate=0.01, local_steps=5),
    )


@dataclass
class Processes:
    kits: KitPaths
    coordinator: subprocess.Popen | None = None
    joins: dict[str, subprocess.Popen] = field(default_factory=dict)
    restarts: int = 0

    def start_coordinator(self) -> None:
        log = open(self.kits.root / f"coordinator.{self.restarts}.log", "wb")
        self.coordinator = subprocess.Popen(
            [PY, "-m", "secfed.cli.main", "aggregate", "--kit", str(self.kits.coordinator),
             "--json"], stdout=log, stderr=subprocess.STDOUT, env=ENV,
        )
        self.restarts += 1

    def start_join(self, eid: str, *extra: str) -> None:
        log = open(self.kits.root / f"{eid}.log", "ab")
        self.joins[eid] = subprocess.Popen(
            [PY, "-m", "secfed.cli.main", "join", "--kit", str(self.kits.enterprises[eid]),
             "--synthetic", "--json", "--new-ledger", *extra], stdout=log, stderr=subprocess.STDOUT, env=ENV,
        )

    def kill_coordinator(self) -> None:
        assert self.coordinator is not None
        self.coordinator.send_signal(signal.SIGKILL)
        self.coordinator.wait()

    def wait(self, timeout: float) -> dict[str, int]:
        end = time.monotonic() + timeout
        codes = {}
        for eid, p in self.joins.items():
            codes[eid] = p.wait(timeout=max(1.0, end - time.monotonic()))
        if self.coordinator is not None:
            codes["coordinator"] = self.coordinator.wait(timeout=max(1.0, end - time.monotonic()))
        return codes

    def stop(self) -> None:
        for p in [*self.joins.values(), self.coordinator]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    def log(self, name: str) -> str:
        return (self.kits.root / f"{name}.log").read_text(errors="replace")


def coordinator_db(kits: KitPaths) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{kits.coordinator / 'state.sqlite'}?mode=ro", uri=True,
                           timeout=5.0)


def wait_for(predicate, timeout: float, period: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if predicate():
                return True
        except sqlite3.Error:
            pass
        time.sleep(period)
    return False


def expected_global(rounds: list[tuple[int, tuple[str, ...]]], dim: int) -> np.ndarray:
    """Plaintext FedAvg, computed independently: sum over rounds of the survivors' mean update."""
    vec = np.zeros(dim, np.float64)
    for r, survivors in rounds:
        vec += np.mean([synthetic_update(e, r, dim).astype(np.float64) for e in survivors], axis=0)
    return vec


def adapter_of(kits: KitPaths, eid: str) -> np.ndarray:
    return np.fromfile(kits.enterprises[eid] / "adapter.f32", dtype="<f4")
