"""The ``secfed join`` loop: one enterprise taking part in every round it safely can.

Per round: fetch the spec -> check it against the site's own policy, the pinned roster, its
current global adapter hash and its remaining budget (before any secret exists) -> advertise
keys and, in background threads, answer the share stage and charge the ledger for the round's
mechanism (committed, and joined before the update exists) while the model trains with DP ->
check that training ran the charged (sigma, q, steps) -> protect (protocol; with
``[dp.distributed]`` the noise hook clips the whole update and adds this site's Skellam share
first) -> upload with the signed ledger head -> answer
the later stages (each reply posted together with the long poll for the next stage's input) ->
decode the sum, apply sum / survivors (FedAvg; the adapter it replaces is kept) -> sign and
send the new global hash (the adapter's fsync'd write runs meanwhile and is waited for before
the round counts as done) ->
check the peers' signed hashes -> keep the coordinator's signed receipts of the upload's and the
confirmation's ledger heads in the ledger. Every outbound message is recorded in the site's own
SQLite ``outbound`` table. A missing ledger is never replaced silently (``new_ledger``).

A round the coordinator aborts after this site applied its sum (the confirmations lost or late)
is rolled back to the kept adapter once the coordinator's outcome says so (the next round's
check, or the federation's end): the federation goes on from the hash it recorded.

A participant restarted mid-round cannot continue that round (its ephemeral secrets lived only in
memory, by design): the round counts as lost for it -- its charge stays in the ledger -- and it
joins the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from secfed.config import Deadlines, RoundTerms
from secfed.crypto.keys import verify_signature
from secfed.errors import (
    ConfigError,
    DPGuardError,
    EncodingError,
    InvalidSignature,
    LedgerError,
    PrivacyError,
    ProtocolAbort,
    ProtocolError,
    SecfedError,
    TransportError,
)
from secfed.federation.kits import EnterpriseKit
from secfed.names import Mode, Protection, protection_of
from secfed.participant.adapter import LocalSite, TrainOutcome
from secfed.participant.ledger import open_site_ledger
from secfed.participant.noise import distributed_hook
from secfed.participant.pinning import (
    PINNED_SPEC_FIELDS,
    check_pinned,
    pinned_noise_multiplier,
    pinned_spec,
)
from secfed.participant.state import ParticipantState
from secfed.privacy.accounting import load_accountant
from secfed.privacy.distributed import DistributedDP
from secfed.privacy.events import DistributedDPEvent
from secfed.privacy.receipts import LedgerReceipt
from secfed.protocol.participant import ParticipantResult, ParticipantRound
from secfed.protocol.spec import ParticipantPolicy, RoundSpec, Stage
from secfed.transport.api import (
    MAX_REFUSAL_DETAIL,
    AppliedConfirmation,
    Envelope,
    RoundInfo,
    RoundRefusal,
    applied_signed_bytes,
    refusal_signed_bytes,
)
from secfed.transport.client import CoordinatorClient, CoordinatorUnreachable

__all__ = ["Participant", "RoundReport"]

POLL_S = 20.0  # longest long poll; the server answers as soon as something changes
SETUP_POLL_S = 2.0  # long-poll length of the key set-up thread (it checks for a stop between)
STAGE_SLACK_S = 30.0  # how long past the announced deadline to keep asking for a stage
# Past a stage's deadline: the coordinator's time to close it and answer, and to come back from
# a restart (it then extends the open stage by 30 s for the sites to re-send: RESTART_GRACE_S).
STAGE_GRACE_S = 30.0
REQUEST_TIMEOUT_S = (2.0, 10.0)  # bounds of one request's connect/read/write timeout


def request_timeouts(deadlines: Deadlines) -> tuple[float, float]:
    """(one request's connect/read/write timeout, long-poll length) from the federation's stage
    deadline: a stalled connection costs a site at most a quarter of a stage (between 2 and
    10 s) before it retries on a fresh one, and a long poll at most half a stage (<= 20 s)."""
    low, high = REQUEST_TIMEOUT_S
    return min(high, max(low, deadlines.stage / 4)), min(POLL_S, max(1.0, deadlines.stage / 2))


class StageClock:
    """When each stage's input reached this site (:func:`time.monotonic`), and from it the
    latest time the next stage's input can come: a stage opens no later than its input is out,
    so it closes by then plus its deadline (as the coordinator sets it), plus
    :data:`STAGE_GRACE_S` for the close. Every call of the stage is bounded by that instant."""

    def __init__(self, deadlines: Deadlines):
        self._deadlines = deadlines
        self._at: dict[Stage, float] = {}

    def arrived(self, stage: Stage, at: float | None = None) -> None:
        self._at[stage] = time.monotonic() if at is None else at

    def length(self, stage: Stage) -> float:
        """The stage's deadline, counted from its opening (the coordinator's rule)."""
        d = self._deadlines
        if stage in (Stage.ADVERTISE, Stage.UPLOAD):
            return d.train
        return d.applied if stage is Stage.DONE else d.stage

    def cutoff(self, stage: Stage) -> float:
        """The instant the input after ``stage`` must have arrived by."""
        return self._at.get(stage, time.monotonic()) + self.length(stage) + STAGE_GRACE_S


@dataclass(frozen=True)
class RoundReport:
    round_number: int
    status: str
    mode: str
    survivors: tuple[str, ...] = ()
    epsilon: float | None = None
    metrics: dict[str, float] | None = None
    detail: str = ""


class Participant:
    """One enterprise's loop over the federation's rounds.

    Args:
        kit: the enterprise's startup kit.
        site: its local model (or a stand-in).
        events: receives one dict per event.
        new_ledger: start a fresh privacy ledger if the kit has none (``--new-ledger``) -- only
            for a site that never took part: one whose state records any round or outbound
            message refuses to run without its ledger, flag or not.

    Raises:
        LedgerError: the ledger is missing and ``new_ledger`` is False, or it is missing while
            this site's state shows it took part before (a fresh ledger would reset its budget).
    """

    def __init__(self, kit: EnterpriseKit, site: LocalSite, *,
                 events: Callable[[dict[str, Any]], None] | None = None,
                 retry_for: float = 180.0, new_ledger: bool = False):
        self.kit = kit
        self.me = kit.enterprise_id
        self.fed = kit.federation
        self.site = site
        self.identity = kit.identity()
        self.roster = {e.id: e.public_key_bytes() for e in self.fed.roster}
        self._events = events or (lambda _e: None)
        self.state = ParticipantState(kit.state)
        create = False
        if not kit.ledger.is_file():
            took_part = self.state.took_part()
            if took_part:
                self.state.close()
                raise LedgerError(
                    f"ledger {kit.ledger} is missing but this site's state records {took_part}: "
                    "refusing to run (a fresh ledger would reset the privacy budget); restore the "
                    "ledger from backup"
                )
            if not new_ledger:
                self.state.close()
                raise LedgerError(
                    f"ledger {kit.ledger} does not exist: a site starts a fresh ledger only on "
                    "request -- pass --new-ledger if this site has never taken part"
                )
            create = True
        self.ledger = open_site_ledger(
            kit.ledger, enterprise_id=self.me, identity=self.identity,
            budget_epsilon=kit.policy.budget_epsilon, delta=kit.policy.delta, create=create,
        )
        if create:
            self.emit("ledger_created", path=str(kit.ledger),
                      warning="a NEW privacy ledger was started (--new-ledger)")
        timeout, self._poll = request_timeouts(self.fed.deadlines)
        self.client = CoordinatorClient(
            base_url=self.fed.coordinator_url, cert=kit.cert, key=kit.key, ca=kit.ca,
            timeout=timeout, retry_for=retry_for,
            on_retry=lambda m: self.emit("retry", detail=m),
        )
        self._ckks: Any = None
        self._sigma: float | None = None
        # a probed round's contribution report, sent on the round's applied confirmation
        self._contribution: dict[int, bytes] = {}

    def emit(self, kind: str, **fields: Any) -> None:
        self._events({"event": kind, "enterprise": self.me, "at": round(time.time(), 3), **fields})

    def close(self) -> None:
        self.client.close()
        self.state.close()

    # ------------------------------------------------------------------ loop

    def run(self, *, max_rounds: int | None = None) -> list[RoundReport]:
        """Take part in rounds until the federation is finished (or ``max_rounds`` were seen).

        Raises:
            CoordinatorUnreachable: the coordinator stayed unreachable for ``retry_for``
                seconds (with backoff); names the last round this site saw.
            TransportError: the coordinator refused this site (TLS, allow-list).
        """
        reports: list[RoundReport] = []
        after = self.state.last_round()
        # The PRV accountant's import (Opacus, torch: seconds, minutes for many sites on one
        # host) before "ready", not inside round 1's charge, where it outlasted the deadline.
        load_accountant()
        info = self._report_ready(after)
        finished = False
        while (max_rounds is None or len(reports) < max_rounds) and after < self.fed.rounds:
            if info is None or info.round_number <= after:
                try:
                    info = self.client.round_info(after=after, wait=self._poll)
                except CoordinatorUnreachable as exc:
                    raise self._stopped(after, exc) from None
            received = time.monotonic()
            if info.round_number <= after:
                if info.status == "finished":
                    self.emit("federation_finished", round=after)
                    finished = True
                    break
                if info.round_number == 0:  # a restarted coordinator forgot who was ready
                    self._report_ready(after)
                info = None
                continue
            after = info.round_number
            report = self._round(info, received)
            reports.append(report)
            self.emit("round_report", round=report.round_number, status=report.status,
                      mode=report.mode, survivors=list(report.survivors), epsilon=report.epsilon,
                      metrics=report.metrics, detail=report.detail)
            if info.status == "finished":
                finished = True
                break
            info = None
        if finished or after >= self.fed.rounds:
            self._settle_last()
        return reports

    def _settle_last(self) -> None:
        """At the federation's end no next round announces the hash the last one left: once
        the coordinator says the federation finished, ask whether this site's last applied
        round was aborted after all (its confirmations lost or late) and roll it back if so.
        Nothing to ask when that round is ``done`` here (the coordinator acknowledged this
        site's confirmation, so it recorded the round) or was caught up (only done rounds are);
        the questions end by :data:`STAGE_GRACE_S` (the coordinator may have left)."""
        kept = self.site.previous()
        if kept is None or self.state.round_status(kept[2]) in ("done", "caught-up"):
            return
        by = time.monotonic() + STAGE_GRACE_S
        try:
            self.client.round_info(after=self.fed.rounds, wait=self._poll, until=by)
        except TransportError as exc:
            self.emit("rollback_unchecked", round=kept[2], reason=f"{type(exc).__name__}: {exc}")
            return
        self._roll_back_if_aborted(by=by)

    def _roll_back_if_aborted(self, by: float | None = None) -> bool:
        """Undo this site's last applied round if the coordinator aborted it after the sum went
        out (no survivor's confirmation reached it by the deadline: lost or late): the
        coordinator never recorded the new hash, so the federation goes on from the hash before
        it, and a site left ahead would refuse every later round.

        Only ever back to the adapter this site kept before that apply, and only when the
        coordinator's outcome of that very round says ``aborted`` and names exactly that
        adapter's hash as the round's starting point; a round the coordinator calls done is
        never undone (a site behind it catches up instead). The round's ledger charge stays:
        its update left the site. Returns whether it rolled back (event ``rolled_back``, state
        ``rolled-back``). The question ends by ``by`` (monotonic; default: the client's retries).
        """
        kept = self.site.previous()
        if kept is None:
            return False
        before, _, r = kept
        try:
            out = self.client.outcome(round_number=r, until=by)
        except (ProtocolError, TransportError) as exc:
            self.emit("rollback_unchecked", round=r, reason=f"{type(exc).__name__}: {exc}")
            return False
        if out.status != "aborted" or out.global_hash_before != before:
            return False
        undone = self.site.global_hash()
        restored = self.site.roll_back()
        reason = out.abort_reason or "aborted"
        self.state.set_round(
            r, "rolled-back", global_hash_after=restored,
            detail=f"the coordinator aborted round {r} after this site applied its sum "
                   f"({reason}): adapter {undone[:12]}... undone, back to {restored[:12]}...; "
                   "the round's ledger charge stays")
        self.emit("rolled_back", round=r, global_hash=restored, undone=undone, reason=reason)
        return True

    def _stopped(self, after: int, exc: CoordinatorUnreachable) -> CoordinatorUnreachable:
        return CoordinatorUnreachable(
            f"this site stopped after round {after} of {self.fed.rounds}: {exc} (run "
            "join again to catch up if the federation goes on)")

    def _report_ready(self, after: int) -> RoundInfo | None:
        """Tell the coordinator this site can train now (its model and data are loaded before
        the loop starts), so round 1 need not open before it; the round info it answers with.
        A coordinator that does not take the report is simply not told (None)."""
        try:
            info = self.client.ready()
        except CoordinatorUnreachable as exc:
            raise self._stopped(after, exc) from None
        except (ProtocolError, TransportError, ConfigError) as exc:
            self.emit("ready_not_delivered", reason=f"{type(exc).__name__}: {exc}")
            return None
        self.emit("ready", round=info.round_number)
        return info

    def _round(self, info: RoundInfo, received: float | None = None) -> RoundReport:
        """Check and take part in the round ``info`` announces (it reached this site at
        ``received``, :func:`time.monotonic`; default now)."""
        if received is None:
            received = time.monotonic()
        r = info.round_number
        mode = info.terms.mode if info.terms else "?"
        if self.state.round_status(r) is not None:
            self.state.set_round(r, "lost", detail="restarted mid-round; secrets were not kept")
            return RoundReport(r, "lost", mode, detail="restarted mid-round")
        if info.status != "open" or info.stage != Stage.ADVERTISE.value:
            return RoundReport(r, "missed", mode, detail=f"joined at stage {info.stage}")
        try:
            spec, terms, hook = self._check(info)
        except (ConfigError, EncodingError, PrivacyError, ProtocolAbort) as exc:
            why = getattr(exc, REFUSAL_ATTR, "config")
            self.state.set_round(r, "refused", mode=mode, detail=str(exc))
            self.emit("round_refused", round=r, reason=str(exc), why=why)
            self._tell_refusal(info, why, str(exc))
            return RoundReport(r, "refused", mode, detail=str(exc))
        try:
            return self._take_part(spec, terms, hook, received)
        except (ProtocolAbort, ProtocolError, TransportError) as exc:
            self.state.set_round(r, "aborted", detail=str(exc))
            self.emit("round_aborted", round=r, reason=str(exc))
            self._release_unsent(r)
            return RoundReport(r, "aborted", spec.mode, epsilon=self.ledger.epsilon(),
                               detail=str(exc))

    def _release_unsent(self, round_number: int) -> None:
        """After an aborted round: if this site's update never left it (no upload in its
        outbound log, whose rows are written before a message is sent), withdraw the round's
        charge with a signed release entry; ``secfed audit`` re-verifies it against the
        coordinator's transcript. An upload that may have left keeps its charge."""
        if self.state.has_sent(round_number, Stage.UPLOAD.value):
            return
        if self.ledger.release_round(round_number) is None:
            return
        self.emit("charge_released", round=round_number, epsilon=self.ledger.epsilon(),
                  detail="the round aborted before this site's update left it")

    def _check(self, info: RoundInfo) -> tuple[RoundSpec, RoundTerms, DistributedDP | None]:
        """Every check that can refuse the round, before training and before any secret;
        returns the spec, the terms and the round's distributed-DP noise hook (or None).

        Raises:
            ConfigError, EncodingError, PrivacyError, ProtocolAbort: the round is refused; the
                error carries the reason (one of ``REFUSAL_REASONS``) as ``refusal_reason``.
        """
        with _refusing("pinned"):
            spec, terms = self._announced(info)
            # Everything federation.toml pins (scheduled mode, roster, k, t, min_participants,
            # clip, ring, scale, the DP terms) must be exactly what the coordinator announced.
            check_pinned(self.fed, spec, terms, noise_multiplier=self._pinned_sigma())
        with _refusing("policy"):
            self.kit.policy.check_round(terms, roster=self.fed.enterprise_ids(),
                                        schedule=self.fed.mode_schedule)
            self._policy(spec).check(spec, me=self.me, roster=self.roster)
            hook = distributed_hook(federation=self.fed, policy=self.kit.policy, spec=spec,
                                    terms=terms)
        with _refusing("global_hash"):
            mine = self.site.global_hash()
            if spec.global_hash != mine:
                self._roll_back_if_aborted()  # a round aborted after this site applied it
                self._catch_up(before=spec.round_number)
                mine = self.site.global_hash()
            if spec.global_hash != mine:
                raise ProtocolAbort(
                    f"global_hash must be this site's adapter hash {mine[:12]}... "
                    f"(got {spec.global_hash[:12]}...)", stage="advertise",
                )
        with _refusing("config"):
            if spec.mode == Mode.CKKS and self._ckks_context() is None:
                raise ConfigError("mode ckks needs ckks_secret.ctx in the kit (missing)")
        with _refusing("budget"):
            eps_after = self.ledger.check_round(
                terms.dp_sgd, distributed=hook.planned_event(spec) if hook else None)
            self.kit.policy.check_budget(spent_epsilon=self.ledger.epsilon(),
                                         round_epsilon_after=eps_after)
        return spec, terms, hook

    def _announced(self, info: RoundInfo) -> tuple[RoundSpec, RoundTerms]:
        """The round's spec and terms as announced, consistent with each other and this
        federation's name and vector length.

        Raises:
            ConfigError: missing or inconsistent spec/terms.
        """
        if info.spec_hex is None or info.terms is None:
            raise ConfigError("round info must carry spec and terms (got none)")
        spec = RoundSpec.from_bytes(bytes.fromhex(info.spec_hex))
        terms = info.terms
        if spec.round_number != info.round_number or terms.round_number != spec.round_number:
            raise ConfigError(f"round_number must agree in info/spec/terms (got {spec.round_number})")
        if spec.mode != terms.mode or spec.participants != terms.participants:
            raise ConfigError("spec and terms must agree on mode and participants")
        if spec.federation != self.fed.name:
            raise ConfigError(f"federation must be {self.fed.name!r} (got {spec.federation!r})")
        if spec.vector_length != self.fed.model.vector_length:
            raise ConfigError(
                f"vector_length must be {self.fed.model.vector_length} (got {spec.vector_length})"
            )
        return spec, terms

    def _tell_refusal(self, info: RoundInfo, reason: str, detail: str) -> None:
        """Send the coordinator this site's signed refusal (it records it and stops waiting
        for this site). Best effort: a coordinator that cannot take it waits out its deadline,
        as before; the refusal stays in this site's state either way."""
        if info.spec_hex is None:
            return
        r = info.round_number
        spec_sha256 = hashlib.sha256(bytes.fromhex(info.spec_hex)).hexdigest()
        detail = detail[:MAX_REFUSAL_DETAIL]
        signature = self.identity.sign(refusal_signed_bytes(
            federation=self.fed.name, round_number=r, spec_sha256=spec_sha256, reason=reason,
            detail=detail))
        refusal = RoundRefusal(reason=reason, detail=detail,  # type: ignore[arg-type]
                               spec_sha256=spec_sha256, signature_hex=signature.hex())
        self.state.sent(round_number=r, stage="refusal", destination="coordinator",
                        payload=refusal.model_dump_json().encode(),
                        protection=Protection.SIGNED.value)
        try:
            self.client.refuse(round_number=r, refusal=refusal)
        except (ProtocolError, TransportError, ConfigError) as exc:
            self.emit("refusal_not_delivered", round=r, reason=f"{type(exc).__name__}: {exc}")

    def _policy(self, spec: RoundSpec) -> ParticipantPolicy:
        """The protocol-level policy: the site's floors plus every value federation.toml pins
        for this round (the state machine re-checks them in ``start()``, before any secret)."""
        p = self.kit.policy
        pinned = pinned_spec(self.fed, spec.round_number)
        return ParticipantPolicy(
            allowed_modes=p.modes(self.fed.mode_schedule), min_participants=p.min_participants,
            min_threshold=p.min_threshold,
            # the federation's k (its explicit choice, or the protocol default for n)
            min_neighbours=pinned.neighbours if pinned.mode == "secagg+" else None,
            federation=self.fed.name, last_round=self.state.last_round(),
            pinned={name: getattr(pinned, name) for name in PINNED_SPEC_FIELDS},
        )

    def _pinned_sigma(self) -> float:
        """σ federation.toml pins (or its calibration for the horizon; computed once)."""
        if self._sigma is None:
            self._sigma = pinned_noise_multiplier(self.fed)
        return self._sigma

    def _ckks_context(self) -> Any:
        if self._ckks is None and self.kit.ckks_secret.is_file():
            from secfed.crypto import ckks

            self._ckks = ckks.load_context(self.kit.ckks_secret.read_bytes(), expect_secret=True)
        return self._ckks

    def _send(self, spec: RoundSpec, stage: Stage, payload: bytes, ledger_head: bytes = b"",
              *, then: Stage | None = None, stop: threading.Event | None = None,
              by: float | None = None) -> bytes | None:
        """Record and post one stage message. With ``then``: post it and long-poll that
        stage's input in the same round trip, returning the input (waiting past one poll).
        Every call ends by ``by`` (:meth:`StageClock.cutoff`; TransportError past it)."""
        envelope = Envelope(round_number=spec.round_number, stage=stage.value,
                            ledger_head=ledger_head, payload=payload)
        self.state.sent(round_number=spec.round_number, stage=stage.value,
                        destination="coordinator", payload=payload,
                        protection=protection_of(stage, spec.mode).value)
        if then is None:
            self.client.submit(envelope, until=by)
            return None
        wait = self._poll if stop is None else SETUP_POLL_S
        data = self.client.exchange(envelope, next_stage=then.value, wait=wait, until=by)
        return data if data is not None else self._await_stage(spec, then, stop=stop, by=by)

    def _await_stage(self, spec: RoundSpec, stage: Stage,
                     stop: threading.Event | None = None, by: float | None = None) -> bytes:
        """This site's input for ``stage``, long-polled until ``by``.

        Raises:
            ProtocolAbort: the round ended (aborted, superseded, the federation finished) or
                the key set-up was stopped.
            TransportError: the stage did not open by ``by`` (or its announced deadline).
        """
        r = spec.round_number
        while True:
            if stop is not None and stop.is_set():
                raise ProtocolAbort(f"round {r}: local training failed")
            wait = self._poll if stop is None else SETUP_POLL_S
            data = self.client.inbox(round_number=r, stage=stage.value, wait=wait, until=by)
            if data is not None:
                return data
            info = self.client.round_info(after=0, wait=0, until=by)
            if info.status == "finished":
                raise ProtocolAbort(f"the federation finished before stage {stage.value} of "
                                    f"round {r} opened for this site")
            if info.round_number != r or info.status == "aborted":
                raise ProtocolAbort(f"round {r} ended before stage {stage.value}")
            late = by is not None and time.monotonic() >= by
            if late or (info.stage_deadline_unix
                        and time.time() > info.stage_deadline_unix + STAGE_SLACK_S):
                raise TransportError(f"stage {stage.value} did not open before its deadline")

    def _clip(self, spec: RoundSpec, delta: np.ndarray) -> np.ndarray:
        """Scale the update into the round's L2 clip bound (the bound the sum is checked with)."""
        norm = float(np.linalg.norm(delta.astype(np.float64)))
        if spec.clip_bound > 0 and norm > spec.clip_bound:
            self.emit("update_clipped", round=spec.round_number, norm=norm, bound=spec.clip_bound)
            return (delta * (spec.clip_bound / norm)).astype(np.float32)
        return delta

    def _take_part(self, spec: RoundSpec, terms: RoundTerms,
                   hook: DistributedDP | None, received: float) -> RoundReport:
        """One accepted round (announced to this site at ``received``, monotonic): advertise
        keys and answer the share stage while the model trains and the charge is committed;
        protect and upload the update; answer the later stages; apply the sum; confirm; keep
        the receipts and check the peers. Every call is bounded by its stage's deadline."""
        planned = hook.planned_event(spec) if hook is not None else None
        clock = StageClock(self.fed.deadlines)
        clock.arrived(Stage.ADVERTISE, received)
        machine = self._enter(spec, hook, clock)
        setup = _Background(self._setup_stages, machine, clock)
        outcome, head = self._train_charged(spec, terms, planned, setup)
        payload = setup.result()  # key set-up failed -> abort, nothing sent
        machine.set_update(self._clip(spec, outcome.delta), ledger_head=head)
        self.emit("update_ready", round=spec.round_number)
        self.drive(machine, payload, until=_finished, ledger_head=head, clock=clock)
        result = machine.result()
        detail = ""
        if hook is not None and planned is not None:
            detail = self._account_survivors(spec, hook, planned, result.survivors)
        epsilon = self.ledger.epsilon()
        by = clock.cutoff(Stage.DONE)
        new_hash, final_head = self._apply_and_confirm(spec, result, by)
        return self._settle(spec, result, new_hash, {(head, "upload"), (final_head, "applied")},
                            epsilon, detail, by, peers=machine.neighbourhood)

    def _enter(self, spec: RoundSpec, hook: DistributedDP | None,
               clock: StageClock) -> ParticipantRound:
        """The round's state machine, started: its signed keys are advertised."""
        r = spec.round_number
        policy = self._policy(spec)  # before this round is recorded (replay floor = last round)
        machine = ParticipantRound(
            spec, me=self.me, identity=self.identity, roster=self.roster,
            policy=policy,
            ckks_context=self._ckks_context() if spec.mode == Mode.CKKS else None,
            noise_hook=hook,
        )
        # Key set-up needs no data: advertise now and answer the share stage while the model
        # trains, so only the data-dependent stages follow the update (ephemeral keys only).
        # "keys" marks the round as entered: a restart from here on counts it as lost.
        self.state.set_round(r, "keys", mode=spec.mode)
        self.emit("protocol_started", round=r)
        self._send(spec, Stage.ADVERTISE, machine.start(), by=clock.cutoff(Stage.ADVERTISE))
        return machine

    def _train_charged(self, spec: RoundSpec, terms: RoundTerms,
                       planned: DistributedDPEvent | None,
                       setup: _Background) -> tuple[TrainOutcome, bytes]:
        """Train with DP while the round's charge is committed; the update and the signed
        ledger head. On any failure the key set-up is stopped (nothing is sent).

        Raises:
            DPGuardError: training ran another (sigma, q, steps) than the ledger charged.
        """
        # The charge for the mechanism the round's terms fix (q, sigma, steps) is composed and
        # committed beside training (the budget was already checked above) and joined before the
        # update exists: it is on disk before anything about the data can leave, and its PRV
        # composition stays off the critical path. A failure later over-reports, never
        # under-reports. With distributed DP a second entry covers the guaranteed noise shares.
        r = spec.round_number
        charge = _Background(self._charge, spec, terms, planned, name="secfed-ledger-charge")
        self.emit("training", round=r, mode=spec.mode)
        try:
            outcome = self.site.train(terms)
        except BaseException:
            setup.stop.set()
            charge.wait()  # the ledger is not left mid-write; the error that matters is this one
            raise
        self.emit("trained", round=r)
        try:
            head = charge.result()
        except BaseException:
            setup.stop.set()
            raise
        charged = (terms.noise_multiplier, terms.sample_rate, terms.local_steps)
        ran = (outcome.noise_multiplier, outcome.sample_rate, outcome.steps)
        if ran != charged:
            setup.stop.set()
            raise DPGuardError(
                f"training ran (sigma, q, steps) = {ran} but the ledger charged {charged}: "
                "the update is not sent"
            )
        return outcome, head

    def drive(self, machine: ParticipantRound, payload: bytes, *,
              until: Callable[[ParticipantRound], bool], ledger_head: bytes = b"",
              stop: threading.Event | None = None,
              clock: StageClock | None = None) -> bytes | None:
        """Answer stages until ``until(machine)``: hand the machine its input, record and post
        its reply together with the long poll for the next stage's input (or only wait for
        that input). Returns the input the machine waits for next; None once the round is done.

        ``ledger_head`` goes with the upload; ``stop`` (the key set-up thread) ends the waits
        when training failed; ``clock`` (when each input arrived; default: ``payload`` now)
        bounds every call by its stage's deadline and records the arrivals.

        Raises:
            ProtocolAbort: the machine refused a message, or the round ended meanwhile.
            TransportError: a stage did not open before its deadline.
        """
        spec = machine.spec
        if clock is None:
            clock = StageClock(self.fed.deadlines)
            if machine.stage is not None:
                clock.arrived(machine.stage)
        while not until(machine):
            stage = machine.stage
            assert stage is not None
            by = clock.cutoff(stage)
            reply = machine.handle(stage, payload)
            self.emit("stage", round=spec.round_number, stage=stage.value)
            if machine.done:
                if reply is not None:  # a probed round's contribution report, after the sum:
                    # recorded now, sent on the applied confirmation (one round trip, not two)
                    self.state.sent(round_number=spec.round_number, stage=stage.value,
                                    destination="coordinator", payload=reply,
                                    protection=protection_of(stage, spec.mode).value)
                    self._contribution[spec.round_number] = reply
                return None
            then = machine.stage
            assert then is not None
            if reply is None:
                payload = self._await_stage(spec, then, stop=stop, by=by)
                clock.arrived(then)
                continue
            answer = self._send(spec, stage, reply, then=then, stop=stop, by=by,
                                ledger_head=ledger_head if stage is Stage.UPLOAD else b"")
            assert answer is not None
            payload = answer
            clock.arrived(then)
        return payload

    def _apply_and_confirm(self, spec: RoundSpec, result: ParticipantResult,
                           by: float | None = None) -> tuple[str, bytes]:
        """FedAvg the sum into the global adapter, sign and send its hash (by ``by``); the new
        hash and the ledger head the confirmation carried."""
        r = spec.round_number
        # The hook wrote g * (grid + noise) with g = 2^scale_bits * grid_step, so the sum decodes
        # at the round's scale like any masked sum: FedAvg = sum / survivors.
        new_global = (
            self.site.global_vector().astype(np.float64) + result.aggregate / len(result.survivors)
        ).astype(np.float32)
        new_hash = self.site.apply(new_global, r)
        self.emit("applied", round=r, global_hash=new_hash)
        signature = self.identity.sign(
            applied_signed_bytes(federation=self.fed.name, round_number=r, global_hash=new_hash)
        )
        # The head after the round (it covers an entry written after the upload, e.g. a
        # distributed-DP top-up): the coordinator receipts it in this round.
        final_head = self.ledger.head_bytes()
        confirmation = AppliedConfirmation(
            global_hash=new_hash, signature_hex=signature.hex(), ledger_head_hex=final_head.hex(),
            contribution_hex=self._contribution.pop(r, b"").hex())
        self.state.sent(round_number=r, stage="applied", destination="coordinator",
                        payload=confirmation.model_dump_json().encode(),
                        protection=Protection.SIGNED.value)
        try:
            self.client.confirm(round_number=r, confirmation=confirmation, until=by)
        finally:
            self.site.flush()  # the adapter's durable write ran meanwhile; on disk before "done"
        return new_hash, final_head

    def _settle(self, spec: RoundSpec, result: ParticipantResult, new_hash: str,
                heads: set[tuple[bytes, str]], epsilon: float, detail: str,
                by: float | None = None, *, peers: frozenset[str] | None = None) -> RoundReport:
        """After the confirmation: keep the receipts of ``heads``, check the signed hashes of
        ``peers`` (secagg+: this site and its neighbours; ``None``: everyone), evaluate, record
        the round as done. The sum is applied and confirmed by now:
        a coordinator that does not answer by ``by`` costs the receipts and the peer check
        (events ``receipt_missing`` / ``peers_unchecked``), not the round."""
        r = spec.round_number
        try:
            self.client.round_info(after=r, wait=self._poll, until=by)  # once r is settled
        except TransportError as exc:
            self.emit("settle_unknown", round=r, reason=str(exc))
        self._keep_receipts(r, sent=heads, by=by)
        try:
            self.emit("peers_agree", round=r, signatures=self.check_peers(r, by=by, peers=peers))
        except ProtocolAbort as exc:
            self.emit("peers_disagree", round=r, reason=str(exc))
        except TransportError as exc:
            self.emit("peers_unchecked", round=r, reason=str(exc))
        metrics = self.site.evaluate()
        self.state.set_round(
            r, "done", survivors=result.survivors, global_hash_after=new_hash,
            accuracy=metrics.get("accuracy"), **({"detail": detail} if detail else {}),
        )
        return RoundReport(r, "done", spec.mode, result.survivors, epsilon, metrics, detail)

    def _keep_receipts(self, round_number: int, *, sent: set[tuple[bytes, str]],
                       by: float | None = None) -> int:
        """Keep the coordinator's signed receipts of this round's ledger heads in the ledger.

        A receipt is kept only if it verifies under the coordinator key ``federation.toml``
        pins and names this federation, this round and a head this site handed over; anything
        else is reported (event ``receipt_refused``) and dropped. A missing receipt is reported
        (``receipt_missing``): the head is still in the coordinator's signed transcript.
        Returns the number kept.
        """
        try:
            out = self.client.outcome(round_number=round_number, until=by)
        except (ProtocolError, TransportError) as exc:
            self.emit("receipt_missing", round=round_number, reason=str(exc))
            return 0
        key = self.fed.coordinator_public_key()
        kept: set[str] = set()
        for blob in out.receipts.get(self.me, []):
            try:
                receipt = LedgerReceipt.from_bytes(bytes.fromhex(blob))
                receipt.verify(key)
                if (receipt.federation != self.fed.name or receipt.round_number != round_number
                        or (receipt.head, receipt.stage) not in sent):
                    raise ProtocolError("receipt names another federation, round or head")
                self.ledger.keep_receipt(receipt)
            except (SecfedError, ValueError) as exc:
                self.emit("receipt_refused", round=round_number,
                          reason=f"{type(exc).__name__}: {exc}")
                continue
            kept.add(receipt.stage)
        missing = sorted({stage for _, stage in sent} - kept)
        if missing:
            self.emit("receipt_missing", round=round_number, stages=missing)
        return len(kept)

    def _account_survivors(self, spec: RoundSpec, hook: DistributedDP, planned: DistributedDPEvent,
                           survivors: tuple[str, ...]) -> str:
        """After the sum: the distributed-DP release for the shares that reached it.

        The ledger keeps the planned (guaranteed-shares) entry: it is append-only and composes
        every entry, so an exact follow-up could only add ε. The protocol never completes with
        fewer survivors than the guarantee; should it, a top-up entry charges the exact release
        as well (over-reports, never under-reports). Returns the round's detail (JSON).
        """
        if not hook.releases:
            raise ProtocolAbort(f"round {spec.round_number}: the noise hook never ran")
        exact = hook.exact_event(len(survivors))  # less the site's assumed colluders
        if exact.shares < planned.shares:
            self.ledger.charge_event(round_number=spec.round_number,
                                     session_id=spec.digest(), event=exact)
        eps_exact = self.ledger.exact_epsilon(planned=planned, exact=exact)
        facts = {"distributed_dp": {"planned_shares": planned.shares, "survivors": len(survivors),
                                    "assumed_colluders": hook.colluders,
                                    "share_variance": exact.variance / exact.shares,
                                    "grid_step": hook.releases[-1].grid_step,
                                    "clipped": hook.releases[-1].clipped,
                                    "epsilon_ledger": self.ledger.epsilon(),
                                    "epsilon_survivors": eps_exact}}
        self.emit("distributed_dp", round=spec.round_number, **facts["distributed_dp"])
        return json.dumps(facts, sort_keys=True)

    def _charge(self, spec: RoundSpec, terms: RoundTerms, planned: DistributedDPEvent | None,
                stop: threading.Event) -> bytes:
        """Commit the round's charge(s) (runs beside training); the signed ledger head."""
        r = spec.round_number
        head = self.ledger.charge_round(round_number=r, session_id=spec.digest(),
                                        dp=terms.dp_sgd, distributed=planned)
        epsilon = self.ledger.epsilon()
        self.state.set_round(r, "charged", mode=spec.mode, epsilon_prv=epsilon)
        self.emit("charged", round=r, epsilon=epsilon,
                  distributed_dp=planned.to_dict() if planned is not None else None)
        return head

    def _setup_stages(self, machine: ParticipantRound, clock: StageClock,
                      stop: threading.Event) -> bytes:
        """Answer the stages before the upload (key roster -> [secagg+: graph coin reveal ->
        coin roster ->] shares); return the upload stage's input (the forwarded shares, or the
        key roster in ckks mode)."""
        stage = machine.stage
        assert stage is not None
        payload = self._await_stage(machine.spec, stage, stop=stop,
                                    by=clock.cutoff(Stage.ADVERTISE))
        clock.arrived(stage)
        upload = self.drive(machine, payload, until=_at_upload, stop=stop, clock=clock)
        assert upload is not None
        return upload

    def _catch_up(self, *, before: int) -> None:
        """Apply the rounds this site missed (a dropout, a restart) from their stored aggregates.

        Each missed round is applied only if it starts from this site's current hash and the
        result matches the hash its survivors signed (:meth:`check_peers`). The rounds after
        the last one this site finished or caught up are asked first (one question each, not
        one per round of the federation's history); all of them only if that applied none.
        """
        synced = self.state.last_round("done", "caught-up")
        if not self._catch_up_from(synced + 1, before) and synced:
            self._catch_up_from(1, before)

    def _catch_up_from(self, first: int, before: int) -> bool:
        """Apply the done rounds ``first .. before - 1`` that continue this site's adapter, in
        order (see :meth:`_catch_up`); whether any was applied."""
        applied = False
        for k in range(first, before):
            out = self.client.outcome(round_number=k)
            if out.status != "done" or out.global_hash_before != self.site.global_hash():
                continue
            payload = self.client.aggregate(round_number=k)
            total, count = self._decode_aggregate(payload, mode=out.mode, round_number=k)
            new_global = (
                self.site.global_vector().astype(np.float64) + total / count
            ).astype(np.float32)
            self.check_peers(k, expected_hash=self.site.hash_of(new_global))
            self.site.apply(new_global, k)
            self.site.flush()
            self.state.set_round(k, "caught-up", global_hash_after=self.site.global_hash())
            self.emit("caught_up", round=k, survivors=count)
            applied = True
        return applied

    def _decode_aggregate(self, payload: bytes, *, mode: str, round_number: int
                          ) -> tuple[np.ndarray, int]:
        """Decode a missed round's stored aggregate (catch-up), checked as far as this site can
        without the round's keys: CKKS sums are rebuilt from the members' signed uploads
        (each signature verified before its ciphertexts are parsed, then rounded to the grid);
        masked sums must respect ``survivors x clip_bound`` (without distributed DP, whose noise
        bound needs the round's spec). :meth:`check_peers` then compares the result with the
        hash the round's survivors signed."""
        from secfed.protocol.participant import (
            SumShape,
            check_sum_norm,
            decode_aggregate,
            sum_norm_bound,
        )

        model = self.fed.model
        length = model.vector_length
        shape = SumShape(round_number, mode, length, model.scale_bits)
        try:
            result = decode_aggregate(
                shape, payload, roster=self.roster,
                ckks_context=self._ckks_context() if mode == Mode.CKKS else None,
            )
        except ProtocolAbort:
            raise
        except SecfedError as exc:  # a forged signature or bad ciphertext: refuse the round
            raise ProtocolAbort(
                f"aggregate of round {round_number}: {type(exc).__name__}: {exc}") from exc
        total, members = result.aggregate, len(result.survivors)
        bound = sum_norm_bound(members=members, clip_bound=model.clip_bound,
                               vector_length=length, scale_bits=model.scale_bits)
        if mode == Mode.CKKS:
            bound += length**0.5 * 2.0**-model.scale_bits  # the decrypted sum's rounding
            check_sum_norm(total, bound=bound, what=f"round {round_number} catch-up")
        elif self.fed.dp.distributed is None:
            check_sum_norm(total, bound=bound, what=f"round {round_number} catch-up")
        return total, members

    def check_peers(self, round_number: int, *, expected_hash: str | None = None,
                    by: float | None = None, peers: frozenset[str] | None = None) -> int:
        """Verify the signed confirmations of round ``round_number``'s new global hash.

        With ``peers`` (a secagg+ round this site took part in: itself and its k neighbours,
        :attr:`~secfed.protocol.participant.ParticipantRound.neighbourhood`) only their
        confirmations are verified -- k + 1 signatures per site, not n; any other the outcome
        lists is neither verified nor counted. Without it (secagg, ckks, catch-up) every listed
        confirmation is. Either way each verified one must be signed by its sender's pinned
        identity key over this federation, this round and this site's own hash.

        Returns the number of agreeing signatures. Raises ProtocolAbort on a disagreeing or
        badly signed confirmation, or when none of the parties checked confirmed.
        """
        out = self.client.outcome(round_number=round_number, until=by)
        shown = (out.confirmations if peers is None
                 else {p: c for p, c in out.confirmations.items() if p in peers})
        if not shown:
            whose = "" if peers is None else " from this site's neighbourhood"
            raise ProtocolAbort(f"round {round_number} has no signed confirmation{whose}")
        mine = expected_hash or self.site.global_hash()
        agree = 0
        for peer, conf in shown.items():
            try:
                verify_signature(
                    self.roster[peer], bytes.fromhex(conf.signature_hex),
                    applied_signed_bytes(federation=self.fed.name, round_number=round_number,
                                         global_hash=conf.global_hash),
                )
            except (InvalidSignature, KeyError):
                raise ProtocolAbort(f"confirmation of {peer!r} does not verify") from None
            if conf.global_hash != mine:
                raise ProtocolAbort(
                    f"peer {peer!r} reports global hash {conf.global_hash[:12]}... "
                    f"(this site has {mine[:12]}...)"
                )
            agree += 1
        return agree


REFUSAL_ATTR = "refusal_reason"  # why a refusing error refused (set by _refusing)


@contextlib.contextmanager
def _refusing(reason: str) -> Iterator[None]:
    """Tag a refusing error of the block with ``reason`` (one of ``REFUSAL_REASONS``: what the
    site's signed refusal tells the coordinator) and let it go on unchanged."""
    try:
        yield
    except (ConfigError, EncodingError, PrivacyError, ProtocolAbort) as exc:
        if not hasattr(exc, REFUSAL_ATTR):
            setattr(exc, REFUSAL_ATTR, reason)
        raise


class _Background:
    """Run ``fn(*args, stop)`` in a daemon thread; :meth:`result` joins and re-raises."""

    def __init__(self, fn: Callable[..., bytes], *args: Any, name: str = "secfed-key-setup"):
        self.stop = threading.Event()
        self._value: bytes | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True,
                                        name=name)
        self._thread.start()

    def wait(self) -> None:
        """Join without re-raising (used when another error is already on its way out)."""
        self._thread.join()

    def _run(self, fn: Callable[..., bytes], args: tuple[Any, ...]) -> None:
        try:
            self._value = fn(*args, self.stop)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def result(self) -> bytes:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def _finished(machine: ParticipantRound) -> bool:
    return machine.done


def _at_upload(machine: ParticipantRound) -> bool:
    return machine.stage is Stage.UPLOAD
