"""Ledger rollback while rounds run (issue 20, item 5), through the real coordinator service
(``secfed.coordinator.service.Coordinator``: its submit/confirm/stage handling and SQLite state),
driven in-process without HTTP: the coordinator holds every upload's ledger head to the site's
pinned identity and to a strictly increasing index, receipts every head it accepts with its own
pinned identity key, and seals each closed round's transcript in a signed chain."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from secfed.config import Deadlines, DPSettings
from secfed.coordinator.service import Coordinator
from secfed.crypto.keys import IdentityKey
from secfed.errors import InvalidSignature, ProtocolError, SecfedError
from secfed.federation.kits import CoordinatorKit, EnterpriseKit, create_kits
from secfed.federation.plan import model_settings_for
from secfed.privacy import DPSGDEvent, Ledger, LedgerHead
from secfed.privacy.receipts import GENESIS_LINK, LedgerReceipt
from secfed.protocol import ParticipantPolicy, ParticipantRound, Stage
from secfed.transport.api import AppliedConfirmation, Envelope, applied_signed_bytes

ENTERPRISES = ["org-a", "org-b", "org-c", "org-d"]  # threshold 3: one refused site leaves 3
DIM = 16
EVENT = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.01, steps=5)


@dataclass
class Fed:
    coordinator: Coordinator
    kits: dict[str, EnterpriseKit]
    ledgers: dict[str, Ledger]
    errors: dict[int, dict[str, SecfedError]] = field(default_factory=dict)

    def identity(self, eid: str) -> IdentityKey:
        return self.kits[eid].identity()


def _fed(tmp_path: Path) -> Fed:
    paths = create_kits(
        tmp_path / "fed", name="anchoring", enterprises=ENTERPRISES,
        coordinator_url="https://127.0.0.1:9", mode_schedule=("secagg",), rounds=3,
        model=model_settings_for(model_dir=None, synthetic_dim=DIM),
        deadlines=Deadlines(train=60, stage=10, applied=10),
        dp=DPSettings(noise_multiplier=1.0, sample_rate=0.01, local_steps=5),
    )
    kits = {e: EnterpriseKit.load(paths.enterprises[e]) for e in ENTERPRISES}
    ledgers = {
        e: Ledger.open(k.ledger, enterprise_id=e, identity=k.identity(),
                       budget_epsilon=k.policy.budget_epsilon, delta=k.policy.delta, create=True)
        for e, k in kits.items()
    }
    return Fed(Coordinator(CoordinatorKit.load(paths.coordinator)), kits, ledgers)


async def _round(fed: Fed, r: int, *, head_of=None, applied_of=None, charges: int = 1) -> None:
    """One round through the service; ``head_of(eid, honest_head)`` picks the head a site sends
    with its upload, ``applied_of`` the one its confirmation carries. Refused submissions are
    collected in ``fed.errors[r]`` (confirmations as ``"applied:<eid>"``); sites keep their
    receipts."""
    coord = fed.coordinator
    coord._open_round(r)
    live = coord._live
    assert live is not None
    spec = live.spec
    errors = fed.errors.setdefault(r, {})
    parties = {
        e: ParticipantRound(spec, me=e, identity=fed.identity(e), roster=coord.roster,
                            policy=ParticipantPolicy())
        for e in ENTERPRISES
    }
    sent: dict[str, bytes] = {}

    async def submit(e: str, stage: Stage, payload: bytes, head: bytes = b"") -> None:
        env = Envelope(round_number=r, stage=stage.value, ledger_head=head, payload=payload)
        try:
            await coord.submit(sender=e, envelope=env)
        except SecfedError as exc:
            errors[e] = exc

    for e in ENTERPRISES:
        await submit(e, Stage.ADVERTISE, parties[e].start())
    rng = np.random.default_rng(r)  # update values only
    while live.status == "open":
        coord._close_stage(live)
        stage = live.machine.stage
        if stage is Stage.DONE or live.status != "open":
            break
        for e, payload in live.outbox[stage.value].items():
            if e in errors:
                continue
            head = b""
            if stage is Stage.UPLOAD:
                for _ in range(charges):
                    fed.ledgers[e].charge(round_number=r, session_id=spec.digest(), event=EVENT)
                honest = fed.ledgers[e].head().to_bytes()
                head = honest if head_of is None else head_of(e, honest)
                sent[e] = head
                parties[e].set_update(rng.normal(0, 0.1, DIM).astype(np.float32), ledger_head=head)
            reply = parties[e].handle(stage, payload)
            if reply is not None:
                await submit(e, stage, reply, head)
    assert live.status == "confirming", live.abort_reason
    new_hash = hashlib.sha256(f"round {r}".encode()).hexdigest()
    for e in live.machine.result().survivors:
        sig = fed.identity(e).sign(applied_signed_bytes(federation=coord.fed.name,
                                                        round_number=r, global_hash=new_hash))
        honest = fed.ledgers[e].head().to_bytes()
        head = honest if applied_of is None else applied_of(e, honest)
        conf = AppliedConfirmation(global_hash=new_hash, signature_hex=sig.hex(),
                                   ledger_head_hex=head.hex())
        try:
            await coord.confirm(sender=e, round_number=r, confirmation=conf)
        except SecfedError as exc:
            errors[f"applied:{e}"] = exc
    coord._finish(live)
    outcome = await coord.outcome(round_number=r)
    key = coord.fed.coordinator_public_key()
    for e, blobs in outcome.receipts.items():  # what the join loop does with them
        for blob in blobs:
            receipt = LedgerReceipt.from_bytes(bytes.fromhex(blob))
            receipt.verify(key)
            fed.ledgers[e].add_receipt(receipt)


def test_coordinator_refuses_a_head_not_signed_by_the_sites_pinned_identity(tmp_path) -> None:
    fed = _fed(tmp_path)
    impostor = Ledger.open(tmp_path / "impostor.sqlite", enterprise_id="org-a",
                           identity=IdentityKey.generate(), create=True)
    impostor.charge(round_number=1, session_id=b"x" * 32, event=EVENT)

    def head_of(e: str, honest: bytes) -> bytes:
        return impostor.head().to_bytes() if e == "org-a" else honest

    asyncio.run(_round(fed, 1, head_of=head_of))
    assert isinstance(fed.errors[1].get("org-a"), InvalidSignature)
    assert set(fed.errors[1]) == {"org-a"}
    state = fed.coordinator.state
    assert state.round(1).survivors == ("org-b", "org-c", "org-d")
    assert state.receipt(1, "org-a", "upload") is None  # nothing receipted, nothing recorded
    assert all(row.sender != "org-a" for row in state.transcript(1) if row.stage == "upload")


def test_coordinator_refuses_a_head_that_does_not_move_forward(tmp_path) -> None:
    fed = _fed(tmp_path)
    first: dict[str, bytes] = {}

    def keep(e: str, honest: bytes) -> bytes:
        first[e] = honest
        return honest

    fresh_b = Ledger.open(tmp_path / "fresh-b.sqlite", enterprise_id="org-b",
                          identity=fed.identity("org-b"), create=True)

    def roll_back(e: str, honest: bytes) -> bytes:
        if e == "org-a":  # the head of its round-1 upload again: no newer entry (other round)
            return first["org-a"]
        if e == "org-b":  # a deleted-and-recreated ledger: its index goes backwards
            fresh_b.charge(round_number=2, session_id=b"y" * 32, event=EVENT)
            return fresh_b.head().to_bytes()
        if e == "org-c":  # another enterprise's (validly signed) head
            return fed.ledgers["org-d"].head().to_bytes()
        return honest

    async def both() -> None:
        await _round(fed, 1, head_of=keep, charges=2)  # every head at entry 2 after round 1
        await _round(fed, 2, head_of=roll_back)

    with pytest.raises(AssertionError):  # 3 of 4 refused: round 2 cannot reach its threshold
        asyncio.run(both())
    assert fed.errors[1] == {}
    errors = fed.errors[2]
    assert isinstance(errors["org-a"], ProtocolError) and "must move forward" in str(errors["org-a"])
    assert "entry 2 is not past entry 2 accepted in round 1" in str(errors["org-a"])
    assert isinstance(errors["org-b"], ProtocolError)
    assert "entry 1 is not past entry 2" in str(errors["org-b"])
    assert isinstance(errors["org-c"], ProtocolError) and "'org-c'" in str(errors["org-c"])
    assert "org-d" not in errors
    assert fed.coordinator.state.receipt(2, "org-d", "upload") is not None
    for e in ("org-a", "org-b", "org-c"):
        assert fed.coordinator.state.receipt(2, e, "upload") is None


def test_receipts_and_the_sealed_transcript_anchor_every_entry(tmp_path) -> None:
    fed = _fed(tmp_path)
    coord = fed.coordinator
    kept: dict[str, bytes] = {}

    def top_up(e: str, honest: bytes) -> bytes:
        kept.setdefault(e, honest)
        if e == "org-a":  # an entry written after the upload, as a distributed-DP top-up is
            fed.ledgers[e].charge(round_number=1, session_id=b"t" * 32, event=EVENT)
            return fed.ledgers[e].head().to_bytes()
        return honest

    def stale(e: str, honest: bytes) -> bytes:
        return kept[e] if e == "org-b" else honest  # round 1's head after round 2's upload

    async def run() -> None:
        await _round(fed, 1, applied_of=top_up)
        await _round(fed, 2, applied_of=stale)
        coord._seal(before=3)

    asyncio.run(run())
    assert fed.errors[1] == {}
    assert list(fed.errors[2]) == ["applied:org-b"]
    assert isinstance(fed.errors[2]["applied:org-b"], ProtocolError)
    assert "must not go back" in str(fed.errors[2]["applied:org-b"])
    key = coord.fed.coordinator_public_key()
    seals = coord.state.transcript_signatures()
    assert [s[0] for s in seals] == [1, 2]
    assert seals[0][1] == GENESIS_LINK and seals[1][1] == seals[0][2]  # chained
    for e, ledger in fed.ledgers.items():
        receipts = ledger.receipts()
        expected = [(1, "upload"), (1, "applied"), (2, "upload"), (2, "applied")]
        if e == "org-b":
            expected.remove((2, "applied"))
        assert [(rc.round_number, rc.stage) for rc in receipts] == expected
        for rc in receipts:
            rc.verify(key)  # signed by the coordinator key federation.toml pins
            head = LedgerHead.from_bytes(rc.head)
            assert head.enterprise_id == e
            assert ledger.entries()[head.index - 1].round_number == rc.round_number
        # round-2 receipts pin the transcript as sealed after round 1
        assert {rc.previous_link for rc in receipts if rc.round_number == 2} == {seals[0][2]}
        assert {rc.previous_link for rc in receipts if rc.round_number == 1} == {GENESIS_LINK}
    a = fed.ledgers["org-a"].receipts()
    # the top-up entry after round 1's upload is receipted in round 1 already
    assert LedgerHead.from_bytes(a[1].head).index == LedgerHead.from_bytes(a[0].head).index + 1
    assert fed.ledgers["org-a"].entries()[LedgerHead.from_bytes(a[1].head).index - 1
                                          ].session_id == b"t" * 32


def test_a_site_that_took_part_never_starts_a_fresh_ledger(tmp_path) -> None:
    from secfed.errors import LedgerError
    from secfed.participant import Participant
    from secfed.participant.adapter import SyntheticSite
    from secfed.participant.state import ParticipantState

    paths = create_kits(
        tmp_path / "fed", name="fresh", enterprises=ENTERPRISES[:3],
        coordinator_url="https://127.0.0.1:9", mode_schedule=("secagg",), rounds=2,
        model=model_settings_for(model_dir=None, synthetic_dim=DIM),
    )
    kit = EnterpriseKit.load(paths.enterprises["org-a"])

    def join(**kw) -> Participant:
        return Participant(kit, SyntheticSite(kit.root, "org-a", kit.federation.model), **kw)

    # a brand-new site: refused without the explicit flag, started with it
    with pytest.raises(LedgerError, match="pass --new-ledger"):
        join()
    assert not kit.ledger.exists()
    events: list[dict] = []
    first = join(new_ledger=True, events=events.append)
    assert kit.ledger.is_file() and [e["event"] for e in events] == ["ledger_created"]
    first.state.set_round(1, "done", mode="secagg")  # it took part in round 1
    first.close()
    join().close()  # its ledger is there: no flag needed
    for suffix in ("", "-wal", "-shm"):  # the ledger is lost
        p = Path(str(kit.ledger) + suffix)
        if p.exists():
            p.unlink()
    for kw in ({}, {"new_ledger": True}):  # refused, flag or not: the state shows round 1
        with pytest.raises(LedgerError, match=r"records 1 round\(s\), up to round 1"):
            join(**kw)
        assert not kit.ledger.exists()
    # a site that only ever sent a message counts as having taken part too
    kit_b = EnterpriseKit.load(paths.enterprises["org-b"])
    state = ParticipantState(kit_b.state)
    state.sent(round_number=1, stage="advertise", destination="coordinator", payload=b"x",
               protection="signed")
    state.close()
    with pytest.raises(LedgerError, match="1 outbound message"):
        Participant(kit_b, SyntheticSite(kit_b.root, "org-b", kit_b.federation.model),
                    new_ledger=True)
