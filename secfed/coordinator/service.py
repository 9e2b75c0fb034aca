"""The coordinator: drives :class:`secfed.protocol.coordinator.CoordinatorRound` over HTTPS.

One asyncio task (:meth:`Coordinator.run`) opens rounds, closes each stage when every expected
participant has been heard or at the stage deadline (the protocol decides whether the survivors
still reach the quorum or the round aborts), then collects the survivors' signed confirmations of
the new global adapter hash. The HTTP handlers call :meth:`submit`, :meth:`inbox`,
:meth:`round_info`, :meth:`confirm`, :meth:`outcome`.

Ledger anchoring: every upload's ledger head is held to the site's pinned identity and must move
strictly forward from the last head this coordinator accepted from that site (a rolled-back or
fresh ledger is refused); each accepted head -- with the upload, and again with the signed
confirmation that ends the round -- gets a receipt signed with the coordinator's own identity
key (``identity.key``, pinned in ``federation.toml``), which the site keeps in its ledger. When a
round can no longer change (the next one opens, or the federation ends) its transcript is sealed
with a chained signed link (:mod:`secfed.privacy.receipts`); receipts carry the previous link.

Every accepted message is committed to SQLite before it is acknowledged. After a crash the
round in flight is rebuilt by replaying the accepted messages stage by stage (closing each stage
that had been closed, so the per-recipient payloads are regenerated identically); if that fails
the round is aborted cleanly and the next one starts.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from secfed.config import FederationConfig, RoundTerms
from secfed.coordinator.state import CoordinatorState
from secfed.coordinator.status import StatusBoard, refusal_kind
from secfed.crypto.keys import constant_time_equal, verify_signature
from secfed.errors import (
    ConfigError,
    InvalidSignature,
    ProtocolAbort,
    ProtocolError,
    SecfedError,
)
from secfed.federation.kits import CoordinatorKit
from secfed.privacy.ledger import LedgerHead
from secfed.privacy.receipts import sign_receipt
from secfed.protocol.coordinator import CoordinatorRound
from secfed.protocol.spec import RoundSpec, Stage
from secfed.transport.api import (
    AppliedConfirmation,
    Envelope,
    RoundInfo,
    RoundOutcome,
    RoundRefusal,
    SubmitAck,
    applied_signed_bytes,
    refusal_signed_bytes,
)

__all__ = ["Coordinator", "EventSink"]

EventSink = Callable[[dict[str, Any]], None]
RESTART_GRACE_S = 30.0  # after a restart, give participants this long to re-send before closing
TICK_S = 0.05  # deadline check period of the driver loop
INLINE_BYTES = 64 * 1024  # messages up to this size are handled on the event loop
POLL_PAST_DEADLINE_S = 1.0  # a long poll ends at most this long after the open stage's deadline


@dataclass
class _Live:
    """The round in flight (memory)."""

    spec: RoundSpec
    machine: CoordinatorRound
    status: str = "open"  # open | confirming | done | aborted
    outbox: dict[str, dict[str, bytes]] = field(default_factory=dict)  # stage -> recipient -> bytes
    deadline: float = 0.0
    abort_reason: str | None = None
    heads: dict[str, bytes] = field(default_factory=dict)  # sender -> upload head it signed
    refused: dict[str, str] = field(default_factory=dict)  # sender -> reason of its refusal
    # Survivors that answered the stage whose close released the sum: the confirmations the
    # round waits for (None after a restart: every survivor, as before).
    confirmers: frozenset[str] | None = None


def noise_multiplier_for(fed: FederationConfig) -> float:
    """sigma from the settings, or calibrated once for the planned horizon (DESIGN.md)."""
    if fed.dp.noise_multiplier is not None:
        return fed.dp.noise_multiplier
    try:
        from secfed.privacy import calibrate_noise
    except ImportError:
        raise ConfigError("dp.noise_multiplier must be set (no calibration available)") from None
    return float(
        calibrate_noise(
            target_epsilon=fed.dp.target_epsilon, delta=fed.dp.delta,
            sample_rate=fed.dp.sample_rate, steps=fed.rounds * fed.dp.local_steps,
            accountant="rdp",
        )
    )


class Coordinator:
    """Runs the federation's rounds from a coordinator kit.

    Args:
        kit: the coordinator's startup kit.
        events: receives one dict per event (round opened, stage closed, ...).
        durable: fsync every commit (survives power loss, not only a killed process).
        wait_for_ready: open the federation's first round only once every roster site has
            reported ready (``POST /v1/ready``: model loaded, features computed) or
            ``deadlines.start`` has passed (``secfed aggregate`` turns it on), so no site spends
            budget on a round it could not have finished; the stage deadlines count from the
            round's opening.
    """

    def __init__(self, kit: CoordinatorKit, *, events: EventSink | None = None,
                 durable: bool = False, wait_for_ready: bool = False):
        self.kit = kit
        self.fed = kit.federation
        self.roster = {e.id: e.public_key_bytes() for e in self.fed.roster}
        self.identity = kit.identity()  # signs ledger receipts and the transcript
        self.state = CoordinatorState(kit.state, durable=durable)
        self._link = self.state.latest_link()  # newest sealed round's link (receipts carry it)
        self._events = events or (lambda _e: None)
        self._ckks_public = kit.ckks_public.read_bytes() if kit.ckks_public.is_file() else None
        self._sigma = noise_multiplier_for(self.fed)
        self._live: _Live | None = None
        self._finished = False
        self._lock = asyncio.Lock()
        # Two wake-up channels: participants' long polls wait for what the driver changes (a
        # round opened, a stage closed); the driver waits for arrivals (messages, confirmations).
        # One shared condition woke every waiting long poll on every message (N^2 wake-ups).
        self._changed = asyncio.Condition()
        self._arrived = asyncio.Condition()
        self._stopping = False  # set by stop(): every wait returns at once
        # Sites heard from, and those told the federation finished: the process lingers after
        # the last round until every site it heard from was told (bounded by the caller).
        self._heard: set[str] = set()
        self._told: set[str] = set()
        self._wait_for_ready = wait_for_ready
        self._ready: set[str] = set()  # roster sites that reported ready (memory: re-sent)
        self._global_hash = self.fed.model.initial_global_hash
        dp = self.fed.dp
        # What the status page and /metrics show (numbers and states only, never a payload).
        self.board = StatusBoard(
            federation=self.fed.name, rounds_planned=self.fed.rounds,
            roster=self.fed.enterprise_ids(), target_epsilon=dp.target_epsilon,
            terms_for=lambda _r: (self._sigma, dp.sample_rate, dp.local_steps, dp.delta),
        )
        self.board.load(self.state.rounds(), self.state.heads(), self.state.bytes_received())

    # ------------------------------------------------------------------ events

    def emit(self, kind: str, /, **fields: Any) -> None:
        event = {"event": kind, "at": round(time.time(), 3), **fields}
        self.board.observe(event)
        self._events(event)

    async def _notify(self, condition: asyncio.Condition | None = None) -> None:
        """Wake the long polls (default) or, with ``self._arrived``, the driver."""
        condition = condition or self._changed
        async with condition:
            condition.notify_all()

    async def _wait_change(self, predicate: Callable[[], bool], wait: float,
                           condition: asyncio.Condition | None = None) -> bool:
        condition = condition or self._changed
        end = time.monotonic() + wait
        async with condition:
            while not predicate():
                left = end - time.monotonic()
                if left <= 0 or (self._stopping and condition is self._changed):
                    return predicate()  # (the driver keeps its own pace until cancelled)
                try:
                    async with asyncio.timeout(left):  # no extra task per wait (wait_for)
                        await condition.wait()
                except TimeoutError:
                    return predicate()
        return True

    async def stop(self) -> None:
        """End every long poll now (they answer with what they have) so a stopping server
        need not wait up to a poll's 60 s or cancel requests mid-answer."""
        self._stopping = True
        await self._notify()

    # ------------------------------------------------------------------ round building

    def terms(self, round_number: int) -> RoundTerms:
        # threshold and min_participants are the spec's: the Shamir threshold actually used
        # (per neighbourhood in secagg+, none in ckks), which sites check their floor against.
        spec = self._spec(round_number)
        dp = self.fed.dp
        return RoundTerms.of(
            dp.sgd_terms(round_number, self.fed.rounds, noise_multiplier=self._sigma),
            round_number=round_number, mode=spec.mode, participants=spec.participants,
            threshold=spec.threshold, min_participants=spec.min_participants,
            delta=dp.delta, distributed_dp=dp.distributed,
        )

    def _spec(self, round_number: int) -> RoundSpec:
        mode = self.fed.mode_for_round(round_number)
        m = self.fed.model
        return RoundSpec.create(
            federation=self.fed.name, round_number=round_number, mode=mode,
            participants=self.fed.enterprise_ids(), vector_length=m.vector_length,
            threshold=self.fed.threshold if mode == "secagg" else None,
            neighbours=(self.fed.neighbours or None) if mode == "secagg+" else None,
            min_participants=self.fed.min_participants if mode != "secagg+" else None,
            scale_bits=m.scale_bits, ring_bits=m.ring_bits, clip_bound=m.clip_bound,
            global_hash=self._global_hash, **self.fed.probe_settings(mode),
        )

    def _machine(self, spec: RoundSpec, heads: dict[str, bytes] | None = None) -> CoordinatorRound:
        """The round's protocol machine; ``heads`` collects each upload's checked ledger head."""
        r = spec.round_number

        def head_check(sender: str, head_bytes: bytes) -> None:
            head = self._verified_head(sender, head_bytes, r)
            floor = self.state.head_floor(sender, before_round=r)
            if floor is not None and head.index <= floor[0]:
                raise ProtocolError(
                    f"ledger head of {sender!r} must move forward: entry {head.index} is not past "
                    f"entry {floor[0]} accepted in round {floor[1]} (a rolled-back or fresh "
                    "ledger is refused)"
                )
            if heads is not None:
                heads[sender] = bytes(head_bytes)

        return CoordinatorRound(
            spec, roster=self.roster,
            ckks_public_context=self._ckks_public if spec.mode == "ckks" else None,
            head_check=head_check,
        )

    def _verified_head(self, sender: str, head_bytes: bytes, round_number: int) -> LedgerHead:
        """The ledger head ``sender`` handed over, signed under its pinned identity.

        Raises:
            MessageFormatError: not a ledger head.
            ProtocolError: a head of another enterprise, or of an empty ledger (no charge).
            InvalidSignature: not signed by ``sender``'s pinned identity key.
        """
        head = LedgerHead.from_bytes(head_bytes)
        if head.enterprise_id != sender:
            raise ProtocolError(
                f"ledger head must be {sender!r}'s own (got {head.enterprise_id!r})")
        if head.index < 1:
            raise ProtocolError(
                f"ledger head must name a charge for round {round_number} (got the empty ledger)")
        head.verify(self.roster[sender])
        return head

    def _receipt(self, round_number: int, sender: str, stage: str, head: bytes,
                 message: bytes) -> bytes:
        return sign_receipt(
            self.identity, federation=self.fed.name, round_number=round_number, stage=stage,
            head=head, message_sha256=hashlib.sha256(message).digest(),
            previous_link=self._link,
        ).to_bytes()

    def _seal(self, before: int) -> None:
        """Sign every finished round below ``before`` not signed yet, in order (chained)."""
        self._link = self.state.seal(self.identity, federation=self.fed.name, before=before)

    def _deadline_for(self, stage: Stage) -> float:
        # Participants advertise and share keys as soon as they accept the round and train
        # meanwhile, so the upload stage is the one that waits for local training.
        d = self.fed.deadlines
        if stage in (Stage.ADVERTISE, Stage.UPLOAD):
            return time.time() + d.train
        if stage is Stage.DONE:
            return time.time() + d.applied
        return time.time() + d.stage

    def _open_round(self, round_number: int) -> None:
        spec = self._spec(round_number)
        heads: dict[str, bytes] = {}
        live = _Live(spec, self._machine(spec, heads), heads=heads)
        live.deadline = self._deadline_for(Stage.ADVERTISE)
        with self.state.transaction():  # a round is never on disk without its first stage
            self._seal(before=round_number)  # earlier rounds can no longer change
            self.state.open_round(
                round_number=round_number, mode=spec.mode, participants=spec.participants,
                threshold=spec.threshold, global_hash_before=spec.global_hash,
                spec=spec.to_bytes(),
            )
            self.state.open_stage(round_number, Stage.ADVERTISE.value, live.deadline)
        self._live = live
        self.emit("round_opened", round=round_number, mode=spec.mode,
                  participants=list(spec.participants), threshold=spec.threshold,
                  global_hash=spec.global_hash, deadline=live.deadline)

    def _recover(self) -> int:
        """Rebuild the state after a restart; returns the next round number to open."""
        rows = self.state.rounds()
        done = [r for r in rows if r.status == "done" and r.global_hash_after]
        if done:
            self._global_hash = done[-1].global_hash_after or self._global_hash
        open_rows = [r for r in rows if r.status == "open"]
        for row in open_rows[:-1]:
            self.state.abort_round(row.round, "superseded after restart")
        if not open_rows:
            return (rows[-1].round + 1) if rows else 1
        row = open_rows[-1]
        try:
            self._live = self._replay(row.round, RoundSpec.from_bytes(row.spec))
            self.emit("round_resumed", round=row.round, stage=self._live.machine.stage.value,
                      messages=len(self.state.transcript(row.round)),
                      deadline=self._live.deadline, states=self._resumed_states(row.round))
            return row.round
        except SecfedError as exc:
            reason = f"could not be rebuilt after restart: {type(exc).__name__}: {exc}"
            self.state.abort_round(row.round, reason)
            self.emit("round_aborted", round=row.round, reason=reason)
            return row.round + 1

    def _resumed_states(self, round_number: int) -> dict[str, str]:
        """Each site's furthest step in a round rebuilt after a restart (for the status page)."""
        states: dict[str, str] = {}
        for rec in self.state.transcript(round_number):
            if rec.stage in ("advertise", "upload"):
                states[rec.sender] = "uploaded" if rec.stage == "upload" else states.get(
                    rec.sender, "advertised")
        for sender in self.state.confirmations(round_number):
            states[sender] = "confirmed"
        return states

    def _replay(self, round_number: int, spec: RoundSpec) -> _Live:
        heads: dict[str, bytes] = {}
        live = _Live(spec, self._machine(spec, heads), heads=heads)
        records = self.state.transcript(round_number)
        stages = self.state.stages(round_number)
        machine = live.machine
        live.refused = {s: why for s, (why, _detail) in self.state.refusals(round_number).items()}
        if not stages:  # a state file from before rounds and first stages were one commit
            live.deadline = max(self._deadline_for(Stage.ADVERTISE), time.time() + RESTART_GRACE_S)
            self.state.open_stage(round_number, Stage.ADVERTISE.value, live.deadline)
            return live
        for srow in stages:
            if srow.stage == Stage.DONE.value:
                live.status = "confirming"
                live.deadline = max(srow.deadline, time.time() + RESTART_GRACE_S)
                break
            if machine.stage.value != srow.stage:
                raise ProtocolError(
                    f"replayed stage must be {srow.stage} (got {machine.stage.value})"
                )
            for rec in records:
                if rec.stage == srow.stage:
                    machine.receive(rec.sender, rec.payload)
            if srow.closed_at is None:
                live.deadline = max(srow.deadline, time.time() + RESTART_GRACE_S)
                self.state.extend_stage(round_number, srow.stage, live.deadline)
                break
            out = machine.close_stage()
            live.outbox[machine.stage.value] = out
        if machine.stage is Stage.DONE:
            live.status = "confirming"
        return live

    # ------------------------------------------------------------------ driver

    async def run(self) -> None:
        """Open and drive every round of the federation, then mark it finished."""
        async with self._lock:
            first = self._recover()
        self.emit("coordinator_started", federation=self.fed.name, rounds=self.fed.rounds,
                  next_round=first)
        await self._notify()
        r = first
        if r == 1 and self._live is None and self._wait_for_ready:
            await self._await_ready()
        while r <= self.fed.rounds:
            if self._live is None or self._live.spec.round_number != r:
                async with self._lock:
                    self._open_round(r)
                await self._notify()
            await self._drive()
            r += 1
            if r <= self.fed.rounds and self.fed.deadlines.between_rounds:
                await asyncio.sleep(self.fed.deadlines.between_rounds)
        async with self._lock:
            with self.state.transaction():
                self._seal(before=self.fed.rounds + 1)
        self._finished = True
        self.emit("federation_finished", rounds=self.fed.rounds, global_hash=self._global_hash)
        await self._notify()

    async def _await_ready(self) -> None:
        """Hold round 1 until every roster site is ready or ``deadlines.start`` has passed."""
        deadline = time.time() + self.fed.deadlines.start
        roster = set(self.roster)
        self.emit("awaiting_sites", deadline=deadline, roster=sorted(roster),
                  ready=sorted(self._ready))
        await self._wait_change(lambda: roster <= self._ready or self._stopping,
                                max(0.0, deadline - time.time()), self._arrived)
        self.emit("sites_ready", ready=sorted(self._ready & roster),
                  missing=sorted(roster - self._ready),
                  reason="all ready" if roster <= self._ready else "start deadline passed")

    async def ready(self, *, sender: str) -> RoundInfo:
        """A site reports it can train now (model loaded, features computed); idempotent."""
        if sender not in self.roster:
            raise ProtocolError(f"{sender!r} is not on the roster")
        self._heard.add(sender)
        if sender not in self._ready:
            self._ready.add(sender)
            self.emit("site_ready", enterprise=sender)
            await self._notify(self._arrived)
        return self._info()

    async def _drive(self) -> None:
        live = self._live
        assert live is not None
        machine = live.machine
        while live.status == "open":
            await self._wait_change(
                lambda: self._answered(live) or time.time() >= live.deadline,
                max(0.0, live.deadline - time.time()) + TICK_S, self._arrived,
            )
            if not (self._answered(live) or time.time() >= live.deadline):
                continue
            async with self._lock:
                # sums, unmasking and probe products: heavy
                if machine.stage in (Stage.UPLOAD, Stage.PROBE, Stage.UNMASK, Stage.CONTRIBUTE):
                    await asyncio.to_thread(self._close_stage, live)
                else:
                    self._close_stage(live)
            await self._notify()
            if live.status == "open" and machine.stage is Stage.PROBE:
                # the probe seed exists: the uploads' products run while the sites compute
                # their reports, not after the last one
                await asyncio.to_thread(machine.prepare_probes)
            if live.status == "open" and machine.stage is Stage.CONTRIBUTE:
                # the sum is out: the coordinator's own part of the shares runs while the
                # sites apply it and send their reports (with their confirmations), not after
                await asyncio.to_thread(machine.prepare_contributions)
        if live.status == "confirming":
            await self._wait_change(
                lambda: self._all_confirmed(live) or time.time() >= live.deadline,
                max(0.0, live.deadline - time.time()) + TICK_S, self._arrived,
            )
            async with self._lock:
                self._finish(live)
            await self._notify()

    @staticmethod
    def _answered(live: _Live) -> bool:
        """Every participant the open stage waits for has sent its message or refused the
        round (signed): the stage closes now rather than at its deadline."""
        machine = live.machine
        return machine.complete() or set(machine.expected()) <= set(live.refused)

    def _close_stage(self, live: _Live) -> None:
        machine = live.machine
        closing = machine.stage
        r = live.spec.round_number
        answered = machine.received()
        n = len(answered)
        late = sorted(machine.expected())
        try:
            out = machine.close_stage()
        except ProtocolAbort as exc:
            with self.state.transaction():
                self.state.close_stage(r, closing.value, n)
                self.state.abort_round(r, str(exc))
            live.status, live.abort_reason = "aborted", str(exc)
            self.emit("round_aborted", round=r, stage=closing.value, reason=str(exc))
            return
        deadline = self._deadline_for(machine.stage)
        with self.state.transaction():  # one commit for the whole stage transition
            self.state.close_stage(r, closing.value, n)
            self.state.open_stage(r, machine.stage.value, deadline)
            if machine.stage in (Stage.CONTRIBUTE, Stage.DONE) and out:
                # probed rounds send the sum with the contribute stage, and nothing at done
                self.state.store_aggregate(r, next(iter(out.values())))
            if machine.stage is Stage.DONE:
                self.state.set_survivors(r, machine.result().survivors)
                probes = machine.result().probes
                if probes is not None:
                    self.state.store_probe_outcome(r, probes.to_json())
        live.outbox[machine.stage.value] = out
        live.deadline = deadline
        if machine.stage in (Stage.CONTRIBUTE, Stage.DONE) and live.confirmers is None:
            # the sum goes out now: a survivor silent at this stage (it went away after its
            # upload) is not waited for at the confirmation stage; one that confirms anyway,
            # later, is still recorded
            live.confirmers = frozenset(answered) & frozenset(machine.result().survivors)
        self.emit("stage_closed", round=r, stage=closing.value, received=n, missing=late,
                  next=machine.stage.value, deadline=deadline)
        if machine.stage is Stage.DONE:
            live.status = "confirming"
            self.emit("aggregated", round=r, mode=live.spec.mode,
                      survivors=list(machine.result().survivors))

    def _all_confirmed(self, live: _Live) -> bool:
        """Every survivor still taking part (:attr:`_Live.confirmers`) has confirmed."""
        waited = live.confirmers or frozenset(live.machine.result().survivors)
        return waited <= set(self.state.confirmations(live.spec.round_number))

    def _finish(self, live: _Live) -> None:
        confirmations = self.state.confirmations(live.spec.round_number)
        counts = Counter(h for h, _sig in confirmations.values())
        agreed = counts.most_common(1)[0][0] if counts else None
        if len(counts) > 1:
            self.emit("hash_disagreement", round=live.spec.round_number, hashes=dict(counts))
        if agreed is None:
            reason = "no survivor confirmed a new global hash before the deadline"
            self.state.abort_round(live.spec.round_number, reason)
            live.status, live.abort_reason = "aborted", reason
            self.emit("round_aborted", round=live.spec.round_number, stage="done", reason=reason)
            return
        self.state.finish_round(live.spec.round_number, global_hash_after=agreed)
        self._global_hash = agreed
        live.status = "done"
        self.emit("round_done", round=live.spec.round_number, global_hash=agreed,
                  confirmed=sorted(confirmations))

    # ------------------------------------------------------------------ service (HTTP side)

    def _current(self, round_number: int) -> _Live:
        live = self._live
        if live is None or round_number > live.spec.round_number:
            raise ProtocolError(f"round {round_number} is not open yet")
        if round_number < live.spec.round_number:
            row = self.state.round(round_number)
            status = row.status if row else "unknown"
            raise ProtocolAbort(
                f"round_number must be the current round {live.spec.round_number} "
                f"(got {round_number}, {status}): a message for an earlier round is refused"
            )
        return live

    def _info(self) -> RoundInfo:
        live = self._live
        if live is None:
            return RoundInfo(round_number=0, status="finished" if self._finished else "waiting")
        status = {"open": "open", "confirming": "open", "done": "done", "aborted": "aborted"}[
            live.status
        ]
        if self._finished:
            status = "finished"
        return RoundInfo(
            round_number=live.spec.round_number, status=status,  # type: ignore[arg-type]
            stage=live.machine.stage.value, spec_hex=live.spec.to_bytes().hex(),
            terms=self.terms(live.spec.round_number), stage_deadline_unix=live.deadline,
            abort_reason=live.abort_reason,
        )

    def _poll_for(self, wait: float) -> float:
        """A long poll ends by the open stage's deadline (plus :data:`POLL_PAST_DEADLINE_S`):
        the site then hears what the deadline did, and a poll from a peer that went away holds
        no task past the stage it was waiting on."""
        live = self._live
        if live is None or live.status not in ("open", "confirming") or self._finished:
            return wait
        return min(wait, max(0.0, live.deadline - time.time()) + POLL_PAST_DEADLINE_S)

    def told_everyone(self) -> bool:
        """Whether every site this coordinator heard from has been told the federation
        finished (``round_info`` answered ``finished`` to it)."""
        return self._finished and self._heard <= self._told

    async def round_info(self, *, after: int, wait: float, sender: str | None = None) -> RoundInfo:
        def ready() -> bool:
            return self._finished or (
                self._live is not None and self._live.spec.round_number > after
            )

        if sender is not None:
            self._heard.add(sender)
        await self._wait_change(ready, self._poll_for(wait))
        info = self._info()
        if sender is not None and info.status == "finished":
            self._told.add(sender)
        return info

    async def inbox(self, *, sender: str, round_number: int, stage: str, wait: float) -> bytes | None:
        def ready() -> bool:
            live = self._live
            if live is None or live.spec.round_number < round_number:
                return False
            if live.spec.round_number > round_number or live.status == "aborted":
                return True
            return stage in live.outbox

        self._heard.add(sender)
        await self._wait_change(ready, self._poll_for(wait))
        if not ready():
            return None
        live = self._current(round_number)
        if live.status == "aborted" and stage not in live.outbox:
            raise ProtocolAbort(f"round {round_number} was aborted: {live.abort_reason}")
        box = live.outbox[stage]
        if sender not in box:
            raise ProtocolAbort(
                f"stage {stage} of round {round_number} has no message for {sender!r}: "
                "not a survivor of the previous stage"
            )
        self.board.count_sent(round_number, stage, len(box[sender]))
        return box[sender]

    async def submit(self, *, sender: str, envelope: Envelope) -> SubmitAck:
        self._heard.add(sender)
        try:
            ack = await self._submit(sender=sender, envelope=envelope)
        except SecfedError as exc:
            # Counted and shown by kind; the message names a class and a rule, never a value.
            self.emit("message_refused", round=envelope.round_number, stage=envelope.stage,
                      sender=sender, error=type(exc).__name__,
                      kind=refusal_kind(type(exc).__name__, str(exc)))
            raise
        if envelope.stage == Stage.UPLOAD.value and not ack.duplicate:
            live = self._live
            head = live.heads.get(sender) if live is not None else None
            if head is not None:
                self.emit("ledger_head", round=envelope.round_number, enterprise=sender,
                          stage="upload", index=LedgerHead.from_bytes(head).index)
        return ack

    async def _submit(self, *, sender: str, envelope: Envelope) -> SubmitAck:
        async with self._lock:
            live = self._current(envelope.round_number)
            digest = envelope.payload_sha256()
            ack = SubmitAck(accepted=True, round_number=envelope.round_number,
                            stage=envelope.stage, sha256=digest)
            prior = self.state.accepted_sha(envelope.round_number, envelope.stage, sender)
            if prior is not None:
                if constant_time_equal(prior.encode(), digest.encode()):
                    return ack.model_copy(update={"duplicate": True})
                raise ProtocolError(
                    f"{sender!r} already sent a different {envelope.stage} message in round "
                    f"{envelope.round_number}"
                )
            if live.status != "open" or live.machine.stage.value != envelope.stage:
                raise ProtocolError(
                    f"stage must be the open stage {live.machine.stage.value} "
                    f"(got {envelope.stage}): late or early message refused"
                )
            record = functools.partial(self._record, live, sender, envelope, digest)
            if len(envelope.payload) <= INLINE_BYTES:  # control-sized: a thread hop costs more
                live.machine.receive(sender, envelope.payload)
                record()  # committed before the ack
            else:  # vectors: off the event loop so other uploads keep streaming in
                await asyncio.to_thread(live.machine.receive, sender, envelope.payload)
                await asyncio.to_thread(record)
        self.emit("message", round=envelope.round_number, stage=envelope.stage, sender=sender,
                  bytes=len(envelope.payload))
        await self._notify(self._arrived)
        return ack

    def _record(self, live: _Live, sender: str, envelope: Envelope, digest: str) -> None:
        """Commit an accepted message; an upload's signed ledger head (the one its signature
        covers, checked by ``head_check``) with the coordinator's receipt, in the same commit."""
        r = envelope.round_number
        head = live.heads.get(sender) if envelope.stage == Stage.UPLOAD.value else None
        with self.state.transaction():
            self.state.record(round_number=r, stage=envelope.stage, sender=sender,
                              payload=envelope.payload, sha256=digest, ledger_head=head)
            if head is not None:
                self.state.add_receipt(r, sender, "upload", LedgerHead.from_bytes(head).index,
                                       self._receipt(r, sender, "upload", head, envelope.payload))

    async def confirm(
        self, *, sender: str, round_number: int, confirmation: AppliedConfirmation
    ) -> SubmitAck:
        self._heard.add(sender)
        try:
            return await self._confirm(sender=sender, round_number=round_number,
                                       confirmation=confirmation)
        except SecfedError as exc:
            self.emit("message_refused", round=round_number, stage="done", sender=sender,
                      error=type(exc).__name__, kind=refusal_kind(type(exc).__name__, str(exc)))
            raise

    async def _confirm(
        self, *, sender: str, round_number: int, confirmation: AppliedConfirmation
    ) -> SubmitAck:
        async with self._lock:
            retried = self._recorded_confirmation(sender, round_number, confirmation)
            if retried is not None:
                return retried
            live = self._current(round_number)
            if live.status == "aborted":  # e.g. no confirmation came by the deadline: too late
                raise ProtocolAbort(
                    f"round {round_number} was aborted ({live.abort_reason}): a confirmation "
                    "after the abort is refused; the federation goes on from the round's "
                    f"starting hash {live.spec.global_hash[:12]}... (sites roll back to it)")
            # In a probed round the sum goes out with the contribute stage: a survivor applies
            # it and confirms while the coordinator still collects contribution reports.
            if live.status not in ("confirming", "done") and live.machine.stage is not Stage.CONTRIBUTE:
                raise ProtocolError(f"round {round_number} has no aggregate to confirm yet")
            if sender not in live.machine.result().survivors:
                raise ProtocolError(f"{sender!r} is not a survivor of round {round_number}")
            message = applied_signed_bytes(
                federation=self.fed.name, round_number=round_number,
                global_hash=confirmation.global_hash,
            )
            try:
                verify_signature(self.roster[sender], bytes.fromhex(confirmation.signature_hex),
                                 message)
            except InvalidSignature:
                raise InvalidSignature() from None
            prior = self.state.confirmations(round_number).get(sender)
            if prior is not None and prior[0] != confirmation.global_hash:
                raise ProtocolError(f"{sender!r} already confirmed another hash for this round")
            head_bytes = bytes.fromhex(confirmation.ledger_head_hex)
            head = None
            if head_bytes and self.state.receipt(round_number, sender, "applied") is None:
                # The head after the round (an entry written after the upload -- a distributed-DP
                # top-up -- is anchored in this round, not only by the next upload).
                head = self._verified_head(sender, head_bytes, round_number)
                uploaded = self.state.receipt(round_number, sender, "upload")
                if uploaded is not None and head.index < uploaded[0]:
                    raise ProtocolError(
                        f"ledger head of {sender!r} must not go back after its upload (entry "
                        f"{head.index} < {uploaded[0]})"
                    )
            with self.state.transaction():
                self.state.confirm(round_number, sender, confirmation.global_hash,
                                   bytes.fromhex(confirmation.signature_hex))
                if head is not None:
                    self.state.add_receipt(
                        round_number, sender, "applied", head.index,
                        self._receipt(round_number, sender, "applied", head_bytes, message))
        if prior is None:
            self.emit("confirmed", round=round_number, sender=sender)
        if head is not None:
            self.emit("ledger_head", round=round_number, enterprise=sender, stage="applied",
                      index=head.index)
        if confirmation.contribution_hex:
            await self._carried_report(sender, round_number, confirmation.contribution_hex)
        await self._notify(self._arrived)
        return SubmitAck(accepted=True, duplicate=prior is not None, round_number=round_number,
                         stage="done", sha256=hashlib.sha256(message).hexdigest())

    async def _carried_report(self, sender: str, round_number: int, report_hex: str) -> None:
        """A probed round's contribution report carried on ``sender``'s confirmation: taken
        exactly as a contribute-stage message (same checks, same transcript row; a retried
        confirmation's copy is a duplicate). A refused report (late: the stage closed at its
        deadline; malformed) costs the site its share that round, never its confirmation,
        which is recorded already: the event ``message_refused`` says why."""
        envelope = Envelope(round_number=round_number, stage=Stage.CONTRIBUTE.value,
                            ledger_head=b"", payload=bytes.fromhex(report_hex))
        try:
            await self._submit(sender=sender, envelope=envelope)
        except SecfedError as exc:
            self.emit("message_refused", round=round_number, stage=envelope.stage, sender=sender,
                      error=type(exc).__name__, kind=refusal_kind(type(exc).__name__, str(exc)))

    def _recorded_confirmation(self, sender: str, round_number: int,
                               confirmation: AppliedConfirmation) -> SubmitAck | None:
        """The acknowledgement of a confirmation of an earlier round that is already recorded
        byte for byte (same hash, same deterministic Ed25519 signature): a site whose answer was
        lost retries, and the retry may arrive after the next round opened -- refusing it told
        the site its done round had aborted. Anything else: None (the usual checks decide)."""
        live = self._live
        if live is None or round_number >= live.spec.round_number:
            return None
        prior = self.state.confirmations(round_number).get(sender)
        if prior is None or prior != (confirmation.global_hash,
                                      bytes.fromhex(confirmation.signature_hex)):
            return None
        message = applied_signed_bytes(federation=self.fed.name, round_number=round_number,
                                       global_hash=confirmation.global_hash)
        return SubmitAck(accepted=True, duplicate=True, round_number=round_number,
                         stage="done", sha256=hashlib.sha256(message).hexdigest())

    async def refuse(self, *, sender: str, round_number: int,
                     refusal: RoundRefusal) -> SubmitAck:
        """Record a site's signed refusal of the open round: shown on the status page, counted
        by reason in the metrics, and the stage waiting for the site closes without waiting out
        its deadline once everyone else has answered.

        Raises:
            InvalidSignature: not signed by ``sender``'s pinned identity key.
            ProtocolError: a round not open, a spec other than the announced one, or a sender
                that is not a participant of the round.
        """
        try:
            return await self._refuse(sender=sender, round_number=round_number, refusal=refusal)
        except SecfedError as exc:
            self.emit("message_refused", round=round_number, stage="refusal", sender=sender,
                      error=type(exc).__name__, kind=refusal_kind(type(exc).__name__, str(exc)))
            raise

    async def _refuse(self, *, sender: str, round_number: int,
                      refusal: RoundRefusal) -> SubmitAck:
        if sender not in self.roster:
            raise ProtocolError(f"{sender!r} is not on the roster")
        message = refusal_signed_bytes(
            federation=self.fed.name, round_number=round_number,
            spec_sha256=refusal.spec_sha256, reason=refusal.reason, detail=refusal.detail)
        try:  # before anything else: an unsigned or forged refusal changes nothing
            verify_signature(self.roster[sender], bytes.fromhex(refusal.signature_hex), message)
        except InvalidSignature:
            raise InvalidSignature() from None
        async with self._lock:
            live = self._current(round_number)
            announced = hashlib.sha256(live.spec.to_bytes()).hexdigest()
            if not constant_time_equal(announced.encode(), refusal.spec_sha256.encode()):
                raise ProtocolError(
                    f"refusal must name the spec announced for round {round_number} "
                    f"(got spec_sha256 {refusal.spec_sha256[:12]}...)")
            if sender not in live.spec.participants:
                raise ProtocolError(f"{sender!r} is not a participant of round {round_number}")
            if live.status != "open":
                raise ProtocolError(f"round {round_number} is past its stages: refusal too late")
            duplicate = sender in live.refused
            if not duplicate:
                with self.state.transaction():
                    self.state.refuse(round_number, sender, reason=refusal.reason,
                                      detail=refusal.detail, spec_sha256=refusal.spec_sha256,
                                      signature=bytes.fromhex(refusal.signature_hex))
                live.refused[sender] = refusal.reason
        if not duplicate:
            self.emit("site_refused", round=round_number, enterprise=sender,
                      kind=refusal.reason, reason=refusal.detail)
            await self._notify(self._arrived)
        return SubmitAck(accepted=True, duplicate=duplicate, round_number=round_number,
                         stage="refusal", sha256=hashlib.sha256(message).hexdigest())

    async def aggregate(self, *, sender: str, round_number: int) -> bytes:
        """The final protocol message of a finished round, for a participant catching up."""
        row = self.state.round(round_number)
        if row is None or row.status != "done":
            raise ProtocolError(f"round {round_number} must be done to fetch its aggregate")
        if sender not in row.participants:
            raise ProtocolError(f"{sender!r} was not a participant of round {round_number}")
        payload = self.state.aggregate(round_number)
        if payload is None:
            raise ProtocolError(f"round {round_number} has no stored aggregate")
        self.board.count_sent(round_number, "aggregate", len(payload))
        return payload

    async def outcome(self, *, round_number: int) -> RoundOutcome:
        row = self.state.round(round_number)
        if row is None:
            raise ProtocolError(f"round {round_number} is not open yet")
        status = row.status
        confirmations = {
            s: AppliedConfirmation(global_hash=h, signature_hex=sig.hex())
            for s, (h, sig) in self.state.confirmations(round_number).items()
        }
        return RoundOutcome(
            round_number=round_number, status=status, mode=row.mode,  # type: ignore[arg-type]
            survivors=row.survivors or (), global_hash_before=row.global_hash_before,
            global_hash_after=row.global_hash_after, confirmations=confirmations,
            abort_reason=row.abort_reason,
            receipts={s: [b.hex() for b in blobs]
                      for s, blobs in self.state.receipts(round_number).items()},
        )
