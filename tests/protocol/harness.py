"""Shared helpers: a hand-driven round (for checks between stages) and test vectors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from secfed.crypto.keys import IdentityKey
from secfed.protocol import CoordinatorRound, ParticipantPolicy, ParticipantRound, RoundSpec, Stage


def make_updates(n: int, d: int, seed: int = 0, scale: float = 1.0) -> list[np.ndarray]:
    """Test inputs (not secrets): float32 vectors."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(d) * scale).astype(np.float32) for _ in range(n)]


def plain_sum(updates: list[np.ndarray], survivors) -> np.ndarray:
    return np.sum([updates[i].astype(np.float64) for i in survivors], axis=0)


@dataclass
class Harness:
    """n enterprises and a coordinator, driven stage by stage."""

    spec: RoundSpec
    ids: list[str]
    identities: list[IdentityKey]
    parties: dict[str, ParticipantRound]
    coord: CoordinatorRound
    sent: list[tuple[str, str, bytes]] = field(default_factory=list)

    @property
    def roster(self) -> dict[str, bytes]:
        return {p: k.public_bytes() for p, k in zip(self.ids, self.identities)}

    def advertise(self, skip=()) -> None:
        for p in self.ids:
            if p in skip:
                continue
            msg = self.parties[p].start()
            self.sent.append(("advertise", p, msg))
            self.coord.receive(p, msg)

    def step(self, skip=()) -> dict[str, bytes]:
        """Close the coordinator's stage, deliver, feed replies back; returns the payloads."""
        out = self.coord.close_stage()
        stage = self.coord.stage
        for p, payload in out.items():
            if p in skip:
                continue
            reply = self.parties[p].handle(stage, payload)
            if reply is not None:
                self.sent.append((stage.value, p, reply))
                self.coord.receive(p, reply)
        return out

    def run(self) -> None:
        self.advertise()
        while self.coord.stage not in (Stage.DONE, Stage.ABORTED):
            self.step()


def make_harness(
    n: int = 5, d: int = 64, mode: str = "secagg", round_number: int = 3, seed: int = 0, **spec_kw
) -> Harness:
    ids = [f"org-{i}" for i in range(n)]
    identities = [IdentityKey.generate() for _ in ids]
    roster = {p: k.public_bytes() for p, k in zip(ids, identities)}
    spec = RoundSpec.create(
        federation="test-fed", round_number=round_number, mode=mode, participants=ids,
        vector_length=d, **spec_kw,
    )
    parties = {
        p: ParticipantRound(spec, me=p, identity=k, roster=roster, policy=ParticipantPolicy())
        for p, k in zip(ids, identities)
    }
    for p, u in zip(ids, make_updates(n, d, seed)):
        parties[p].set_update(u, ledger_head=f"head-{p}".encode())
    coord = CoordinatorRound(spec, roster=roster)
    return Harness(spec, ids, identities, parties, coord)
