"""Refusals that are seen and a first round that waits for its sites (issue 22, items 5a and 6),
through the real coordinator service driven in-process (no HTTP; the routes only call these
methods): a site's signed refusal is recorded, shown and counted by reason, a forged or unsigned
one changes nothing, and the stage waiting for a refusing site closes once everyone else has
answered -- read from the coordinator's own stage rows, not from a wall clock. Round 1 opens
only when every roster site reported ready (or the start deadline passed), and its stage
deadlines count from its opening."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from secfed.config import Deadlines, DPSettings
from secfed.coordinator.service import Coordinator
from secfed.crypto.keys import IdentityKey
from secfed.errors import InvalidSignature, ProtocolError
from secfed.federation.kits import CoordinatorKit, EnterpriseKit, create_kits
from secfed.federation.plan import model_settings_for
from secfed.protocol import ParticipantPolicy, ParticipantRound
from secfed.transport.api import Envelope, RoundRefusal, refusal_signed_bytes

from .test_status import _metrics

ENTERPRISES = ["org-a", "org-b", "org-c", "org-d"]  # threshold 3: one refusal leaves 3
TRAIN_S = 60.0


def _kits(tmp_path: Path, *, start: float = 600.0):
    paths = create_kits(
        tmp_path / "fed", name="refusals", enterprises=ENTERPRISES,
        coordinator_url="https://127.0.0.1:9", mode_schedule=("secagg",), rounds=2,
        model=model_settings_for(model_dir=None, synthetic_dim=16),
        deadlines=Deadlines(train=TRAIN_S, stage=10, applied=10, start=start),
        dp=DPSettings(noise_multiplier=1.0, sample_rate=0.01, local_steps=5),
    )
    return paths, {e: EnterpriseKit.load(paths.enterprises[e]) for e in ENTERPRISES}


def _refusal(coord: Coordinator, identity: IdentityKey, *, reason: str = "budget",
             detail: str = "epsilon after this round must be <= budget 8.0",
             spec_sha256: str | None = None) -> RoundRefusal:
    live = coord._live
    assert live is not None
    sha = spec_sha256 or hashlib.sha256(live.spec.to_bytes()).hexdigest()
    sig = identity.sign(refusal_signed_bytes(
        federation=coord.fed.name, round_number=live.spec.round_number, spec_sha256=sha,
        reason=reason, detail=detail))
    return RoundRefusal(reason=reason, detail=detail, spec_sha256=sha,
                        signature_hex=sig.hex())


def test_signed_refusal_is_recorded_and_ends_the_stage_early(tmp_path) -> None:
    paths, kits = _kits(tmp_path)
    coord = Coordinator(CoordinatorKit.load(paths.coordinator))
    coord._open_round(1)
    live = coord._live
    assert live is not None
    parties = {e: ParticipantRound(live.spec, me=e, identity=kits[e].identity(),
                                   roster=coord.roster, policy=ParticipantPolicy())
               for e in ENTERPRISES[:3]}

    async def run() -> None:
        driver = asyncio.create_task(coord._drive())
        for e, party in parties.items():
            await coord.submit(sender=e, envelope=Envelope(
                round_number=1, stage="advertise", ledger_head=b"", payload=party.start()))
        # forged (another key), unsigned (a zero signature) and for another spec: refused,
        # recorded nowhere, and the stage keeps waiting for org-d
        with pytest.raises(InvalidSignature):
            await coord.refuse(sender="org-d", round_number=1,
                               refusal=_refusal(coord, IdentityKey.generate()))
        unsigned = _refusal(coord, kits["org-d"].identity()).model_copy(
            update={"signature_hex": "00" * 64})
        with pytest.raises(InvalidSignature):
            await coord.refuse(sender="org-d", round_number=1, refusal=unsigned)
        with pytest.raises(ProtocolError, match="spec announced"):
            await coord.refuse(sender="org-d", round_number=1, refusal=_refusal(
                coord, kits["org-d"].identity(), spec_sha256="ab" * 32))
        # signed by org-d's key but claimed by org-c: org-c's key does not verify it
        with pytest.raises(InvalidSignature):
            await coord.refuse(sender="org-c", round_number=1,
                               refusal=_refusal(coord, kits["org-d"].identity()))
        await asyncio.sleep(0.3)
        assert live.machine.stage.value == "advertise" and coord.state.refusals(1) == {}
        ack = await coord.refuse(sender="org-d", round_number=1,
                                 refusal=_refusal(coord, kits["org-d"].identity()))
        assert ack.accepted and not ack.duplicate
        for _ in range(200):  # the driver closes the stage on the refusal's notification
            if live.machine.stage.value != "advertise":
                break
            await asyncio.sleep(0.01)
        again = await coord.refuse(sender="org-d", round_number=1,
                                   refusal=_refusal(coord, kits["org-d"].identity()))
        assert again.duplicate
        driver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await driver

    asyncio.run(run())
    assert live.machine.stage.value == "share"  # three advertised: the round goes on
    stages = {s.stage: s for s in coord.state.stages(1)}
    advertise = stages["advertise"]
    assert advertise.deadline - advertise.opened_at == pytest.approx(TRAIN_S, abs=0.5)
    assert advertise.closed_at is not None
    assert advertise.closed_at - advertise.opened_at < TRAIN_S / 4, advertise
    assert coord.state.refusals(1) == {"org-d": ("budget",
                                                 "epsilon after this round must be <= budget 8.0")}
    snap = coord.board.snapshot()
    ent = {e["id"]: e for e in snap["enterprises"]}
    assert ent["org-d"]["state"] == "refused by policy"
    assert "budget 8.0" in ent["org-d"]["note"]
    m = _metrics(coord.board)
    assert m[("secfed_site_refusals_total", (("reason", "budget"),))] == 1
    assert m[("secfed_refusals_total", (("reason", "policy"),))] == 1
    assert m[("secfed_refusals_total", (("reason", "signature"),))] == 3


def test_round_one_waits_for_every_site_to_be_ready(tmp_path) -> None:
    paths, _kits_ = _kits(tmp_path)
    coord = Coordinator(CoordinatorKit.load(paths.coordinator), wait_for_ready=True)
    events: list[dict] = []
    coord._events = events.append

    async def run() -> None:
        driver = asyncio.create_task(coord.run())
        for e in ENTERPRISES[:3]:
            info = await coord.ready(sender=e)
            assert info.round_number == 0 and info.status == "waiting"
        await asyncio.sleep(0.5)
        assert coord._live is None and coord.state.rounds() == []  # org-d is not ready yet
        assert coord.board.snapshot()["start"]["ready"] == 3
        with pytest.raises(ProtocolError, match="roster"):
            await coord.ready(sender="mallory")
        await coord.ready(sender="org-d")
        await _until_round_opens(coord, driver, tries=200)

    asyncio.run(run())
    kinds = [e["event"] for e in events]
    assert kinds.index("sites_ready") < kinds.index("round_opened")
    assert next(e for e in events if e["event"] == "sites_ready")["reason"] == "all ready"
    ready_at = max(e["at"] for e in events if e["event"] == "site_ready")
    (row,) = coord.state.rounds()
    assert row.round == 1 and row.opened_at >= ready_at - 0.01
    advertise = coord.state.stages(1)[0]
    # the stage deadline counts from the round's opening, not from the coordinator's start
    assert advertise.opened_at >= ready_at - 0.01
    assert advertise.deadline - advertise.opened_at == pytest.approx(TRAIN_S, abs=0.5)


async def _until_round_opens(coord: Coordinator, driver: asyncio.Task, *, tries: int) -> None:
    """Poll (every 10 ms, ``tries`` times) until the coordinator opened a round; then stop its
    driver."""
    for _ in range(tries):
        if coord._live is not None:
            break
        await asyncio.sleep(0.01)
    driver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await driver


def test_round_one_opens_at_the_start_deadline_without_every_site(tmp_path) -> None:
    paths, _kits_ = _kits(tmp_path, start=0.3)
    coord = Coordinator(CoordinatorKit.load(paths.coordinator), wait_for_ready=True)
    events: list[dict] = []
    coord._events = events.append

    async def run() -> None:
        driver = asyncio.create_task(coord.run())
        await coord.ready(sender="org-a")
        await _until_round_opens(coord, driver, tries=300)

    asyncio.run(run())
    started = next(e for e in events if e["event"] == "awaiting_sites")
    opened = next(e for e in events if e["event"] == "sites_ready")
    assert opened["reason"] == "start deadline passed"
    assert opened["ready"] == ["org-a"] and opened["missing"] == ["org-b", "org-c", "org-d"]
    assert coord.state.rounds()[0].opened_at >= started["deadline"] - 0.05
