"""A short real federation for audit tests, in-process and fast.

Three enterprises run real rounds through the protocol's state machines (secagg and ckks), each
charging its real privacy ledger (secfed.privacy) before its update leaves and attaching the
signed ledger head to its upload; the coordinator's transcript and each participant's outbound
log are persisted through the federation package's own state classes (the files `secfed
aggregate` and `secfed join` write). Only HTTP and local training are left out: the updates are
random vectors and the DP parameters are the ones the ledger is charged with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from secfed.config import (
    DPSettings,
    FederationConfig,
    ModelSettings,
    RosterEntry,
    federation_to_toml,
)
from secfed.coordinator.state import CoordinatorState
from secfed.crypto.keys import IdentityKey
from secfed.names import protection_of as _protection
from secfed.participant.state import ParticipantState
from secfed.privacy import DPSGDEvent, Ledger, LedgerHead
from secfed.privacy.receipts import sign_receipt
from secfed.protocol import CoordinatorRound, ParticipantPolicy, ParticipantRound, RoundSpec, Stage

ENTERPRISES = ("energy-utility", "security-operator", "city-operations")
FEDERATION = "city-safety"
VECTOR_LENGTH = 64
BUDGET = 8.0
DELTA = 1e-5
# per enterprise: (noise multiplier, sample rate, local steps) -- different on purpose
DP_PARAMS = {
    "energy-utility": (1.1, 0.02, 40),
    "security-operator": (1.3, 0.05, 30),
    "city-operations": (0.9, 0.01, 60),
}


@dataclass(frozen=True)
class FederationRun:
    """Where the run left its files."""

    root: Path
    federation_toml: Path
    transcript: Path
    ledgers: dict[str, Path]
    outbound: dict[str, Path]
    identities: dict[str, IdentityKey]
    coordinator_identity: IdentityKey
    modes: tuple[str, ...]
    dropped: dict[int, str]  # round -> enterprise that vanished before uploading


def _kit(root: Path, eid: str) -> Path:
    path = root / eid
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_federation(
    root: Path,
    *,
    modes: tuple[str, ...] = ("secagg", "secagg", "ckks"),
    dropped: dict[int, str] | None = None,
    seed: int = 7,
    probes: int = 0,
) -> FederationRun:
    """Run ``len(modes)`` rounds; ``dropped[r]`` vanishes after advertising in round r (no charge).
    ``probes`` > 0: the mask-mode rounds carry that many verified norm probes (issue 17) and
    the coordinator keeps each one's probe outcome, as `secfed aggregate` does."""
    dropped = dict(dropped or {})
    rng = np.random.default_rng(seed)  # update values only: not keys, not noise
    identities = {e: IdentityKey.generate() for e in ENTERPRISES}
    coordinator_identity = IdentityKey.generate()  # signs receipts and the transcript
    roster = {e: k.public_bytes() for e, k in identities.items()}
    cfg = FederationConfig(
        name=FEDERATION,
        coordinator_url="https://127.0.0.1:8443",
        coordinator_identity_public_key=coordinator_identity.public_bytes().hex(),
        roster=tuple(RosterEntry(id=e, identity_public_key=k.hex()) for e, k in roster.items()),
        rounds=len(modes),
        mode_schedule=modes,
        threshold=2,
        min_participants=2,
        dp=DPSettings(target_epsilon=BUDGET, delta=DELTA),
        model=ModelSettings(vector_length=VECTOR_LENGTH, initial_global_hash="00" * 32),
    )
    fed_toml = root / "federation.toml"
    fed_toml.write_text(federation_to_toml(cfg))
    coord_dir = _kit(root, "coordinator")
    coord_state = CoordinatorState(coord_dir / "state.sqlite")
    ledgers = {
        e: Ledger.open(
            _kit(root, e) / "ledger.sqlite",
            enterprise_id=e,
            identity=identities[e],
            budget_epsilon=BUDGET,
            delta=DELTA,
            create=True,
        )
        for e in ENTERPRISES
    }
    states = {e: ParticipantState(_kit(root, e) / "state.sqlite") for e in ENTERPRISES}
    ckks_secret = None
    global_hash = "00" * 32
    try:
        for r, mode in enumerate(modes, start=1):
            ckks_public = None
            if mode == "ckks":
                from secfed.crypto import ckks

                ckks_secret = ckks_secret or ckks.new_context()
                ckks_public = ckks_secret.serialize(secret=False)
            spec = RoundSpec.create(
                federation=FEDERATION,
                round_number=r,
                mode=mode,
                participants=ENTERPRISES,
                vector_length=VECTOR_LENGTH,
                threshold=0 if mode == "ckks" else 2,
                min_participants=2,
                clip_bound=8.0 if mode == "ckks" or probes else 0.0,
                global_hash=global_hash,
                probes=probes if mode != "ckks" else 0,
            )
            coord_state.open_round(
                round_number=r,
                mode=mode,
                participants=ENTERPRISES,
                threshold=spec.threshold,
                global_hash_before=global_hash,
                spec=spec.to_bytes(),
            )
            coord = CoordinatorRound(spec, roster=roster, ckks_public_context=ckks_public)
            parties = {
                e: ParticipantRound(
                    spec,
                    me=e,
                    identity=identities[e],
                    roster=roster,
                    policy=ParticipantPolicy(min_threshold_fraction=0.5),
                    ckks_context=ckks_secret if mode == "ckks" else None,
                )
                for e in ENTERPRISES
            }
            alive = set(ENTERPRISES)
            heads: dict[str, bytes] = {}

            def send(
                e: str,
                stage: Stage,
                payload: bytes,
                head: bytes | None = None,
                *,
                r: int = r,
                mode: str = mode,
                coord: CoordinatorRound = coord,
            ) -> None:
                states[e].sent(
                    round_number=r,
                    stage=stage.value,
                    destination="coordinator",
                    payload=payload,
                    protection=_protection(stage, mode),
                )
                coord.receive(e, payload)
                coord_state.record(
                    round_number=r,
                    stage=stage.value,
                    sender=e,
                    payload=payload,
                    sha256=hashlib.sha256(payload).hexdigest(),
                    ledger_head=head,
                )
                if head is not None:  # what `secfed aggregate` does: receipt, kept by the site
                    receipt = sign_receipt(
                        coordinator_identity, federation=FEDERATION, round_number=r,
                        stage="upload", head=head, message_sha256=hashlib.sha256(payload).digest(),
                        previous_link=coord_state.latest_link(),
                    )
                    coord_state.add_receipt(r, e, "upload", LedgerHead.from_bytes(head).index,
                                            receipt.to_bytes())
                    ledgers[e].add_receipt(receipt)

            for e in ENTERPRISES:
                advert = parties[e].start()
                send(e, Stage.ADVERTISE, advert)
            if r in dropped:
                alive.discard(dropped[r])
            while coord.stage not in (Stage.DONE, Stage.ABORTED):
                outgoing = coord.close_stage()
                stage = coord.stage
                for e, payload in outgoing.items():
                    if e not in alive:
                        continue
                    if stage is Stage.UPLOAD:
                        noise, q, steps = DP_PARAMS[e]
                        event = DPSGDEvent(noise_multiplier=noise, sample_rate=q, steps=steps)
                        ledgers[e].check_budget(event)
                        ledgers[e].charge(round_number=r, session_id=spec.digest(), event=event)
                        heads[e] = ledgers[e].head().to_bytes()
                        parties[e].set_update(
                            rng.normal(0, 0.1, VECTOR_LENGTH), ledger_head=heads[e]
                        )
                    reply = parties[e].handle(stage, payload)
                    if reply is not None:
                        send(e, stage, reply, heads[e] if stage is Stage.UPLOAD else None)
            result = coord.result()
            coord_state.set_survivors(r, result.survivors)
            if result.probes is not None:
                coord_state.store_probe_outcome(r, result.probes.to_json())
            global_hash = hashlib.sha256(f"{FEDERATION}/{r}".encode()).hexdigest()
            coord_state.finish_round(r, global_hash_after=global_hash)
            coord_state.seal(coordinator_identity, federation=FEDERATION, before=r + 1)
    finally:
        coord_state.close()
        for s in states.values():
            s.close()
        for led in ledgers.values():
            close = getattr(led, "close", None)
            if close is not None:
                close()
    return FederationRun(
        root=root,
        federation_toml=fed_toml,
        transcript=coord_dir / "state.sqlite",
        ledgers={e: root / e / "ledger.sqlite" for e in ENTERPRISES},
        outbound={e: root / e / "state.sqlite" for e in ENTERPRISES},
        identities=identities,
        coordinator_identity=coordinator_identity,
        modes=modes,
        dropped=dropped,
    )
