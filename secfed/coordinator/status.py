"""What an operator sees of a running coordinator: the status board behind the status page
and ``/metrics`` (``secfed aggregate --status-listen``).

:class:`StatusBoard` is fed the coordinator's own events (the dicts :meth:`Coordinator.emit`
produces) and a few counters the HTTP side reports (bytes sent); it keeps, in memory, only
numbers, names and states -- never a message payload, key, share or update value -- so nothing
the page or the metrics show can leak one. Updating it costs O(1) per event and rendering
O(enterprises + rounds shown), so a scrape does not touch SQLite.

Per enterprise and round, the board tracks one state (:data:`ENTERPRISE_STATES`):

* ``waiting``: a participant of the round not heard from in it yet;
* ``ready``: before round 1, the site reported its model and data loaded (round 1 opens once
  every roster site is ready or ``deadlines.start`` passed);
* ``advertised`` / ``uploaded`` / ``confirmed``: its key advert, its upload, its signed
  confirmation of the new global hash were accepted;
* ``dropped``: a stage closed without its message (the round goes on without it);
* ``late``: a message of it arrived after its stage closed and was refused;
* ``refused by policy``: the site declined the round under its own policy (event
  ``site_refused``, from the site's signed refusal: its reason and the rule it names);
* ``excluded``: a roster member that is not a participant of this round.

ε per enterprise is what the coordinator can attest from the ledger heads it accepted: each
accepted upload head stands for one DP-SGD charge under the round's public terms, composed with
the RDP accountant (the one the sites' budget gate uses). A site's ledger can hold more entries
than that (a charge for a round that aborted before its upload, a distributed-DP top-up): the
head index shows it and the figure is then marked as a lower bound. The site's own budget lives
in its ``site.toml``; the board shows the federation's target ε beside it.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secfed.privacy.accounting import event_rdp
from secfed.privacy.analysis import rdp_to_epsilon
from secfed.privacy.events import DPSGDEvent

__all__ = ["StatusBoard", "ENTERPRISE_STATES", "abort_kind", "refusal_kind", "REFRESH_S"]

ENTERPRISE_STATES = ("waiting", "ready", "advertised", "uploaded", "confirmed", "dropped", "late",
                     "refused by policy", "excluded")
REFRESH_S = 1  # the page reloads itself this often: a change shows within REFRESH_S + a render
HISTORY_SHOWN = 50  # rounds listed on the page (all are counted in the metrics)
# Rounds kept in memory: those shown, plus a few so a late event (bytes, contributions) of a
# recent round still lands; older views are dropped, so the board does not grow with rounds.
ROUNDS_KEPT = HISTORY_SHOWN + 4
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0)
# A state an enterprise keeps for the rest of the round once reached (later events don't undo it).
_STICKY = frozenset({"refused by policy", "excluded"})

TermsFor = Callable[[int], tuple[float, float, int, float]]  # round -> (sigma, q, steps, delta)


def abort_kind(reason: str) -> str:
    """A small fixed label for an abort reason (metrics labels must not be free text)."""
    text = reason.lower()
    for needle, kind in (("below the threshold", "quorum"), ("graph coin", "reveal"),
                         ("confirmed", "unconfirmed"), ("restart", "restart"),
                         ("shares", "unmask"), ("refused", "policy")):
        if needle in text:
            return kind
    return "other"


def refusal_kind(error: str, message: str) -> str:
    """A small fixed label for a refused message: its error class and, for protocol errors,
    whether it came too late, twice or with a ledger head that breaks the rules."""
    text = message.lower()
    if "late or early" in text or "earlier round" in text or "was aborted" in text:
        return "late"
    if "already sent" in text or "already confirmed" in text:
        return "duplicate"
    if "ledger head" in text:
        return "ledger_head"
    return {"InvalidSignature": "signature", "MessageFormatError": "format"}.get(error, "protocol")


@dataclass
class RoundView:
    """One round as the board knows it."""

    round: int
    mode: str
    participants: tuple[str, ...]
    status: str = "open"  # open | done | aborted
    opened_at: float = 0.0
    closed_at: float | None = None
    survivors: tuple[str, ...] | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    abort_reason: str | None = None
    contributions: dict[str, float] | None = None  # issue I: contribution shares, when reported

    @property
    def duration(self) -> float | None:
        return None if self.closed_at is None else max(0.0, self.closed_at - self.opened_at)


@dataclass
class EnterpriseView:
    """One enterprise: its state this round and what its accepted ledger heads attest."""

    id: str
    state: str = "waiting"
    note: str = ""  # the last refusal's reason (a class and rule, never a value)
    head_index: int = 0  # newest accepted ledger-head index (0: none seen)
    charged_rounds: set[int] = field(default_factory=set)  # rounds with an accepted upload head
    epsilon: float = 0.0
    # The RDP curve of the charges so far (RDP composes by addition) and the δ of the newest
    # charged round: ε is recomputed from these, in memory that does not grow with rounds.
    rdp: np.ndarray | None = None
    delta_round: int = 0
    delta: float = 1e-5

    @property
    def epsilon_is_lower_bound(self) -> bool:
        return self.head_index > len(self.charged_rounds)


class StatusBoard:
    """In-memory view of a coordinator for the status page and the metrics.

    Args:
        federation: the federation's name.
        rounds_planned: how many rounds the federation runs.
        roster: every enterprise id, in roster order.
        target_epsilon: the federation's target ε (shown beside each enterprise's).
        terms_for: the public DP terms of a round: (σ, sample rate, local steps, δ).
        clock: wall clock (tests pass their own).
    """

    def __init__(self, *, federation: str, rounds_planned: int, roster: Iterable[str],
                 target_epsilon: float, terms_for: TermsFor,
                 clock: Callable[[], float] = time.time):
        self.federation = federation
        self.rounds_planned = rounds_planned
        self.target_epsilon = target_epsilon
        self._terms_for = terms_for
        self._clock = clock
        self.enterprises = {e: EnterpriseView(e) for e in roster}
        self.rounds: dict[int, RoundView] = {}
        self._order: deque[int] = deque()
        self.current: int | None = None
        self.stage: str | None = None
        self.stage_opened_at: float | None = None
        self.deadline: float | None = None
        self.finished = False
        self.start_deadline: float | None = None  # round 1 opens by then (awaiting sites)
        self.started_at = clock()
        # metrics (cumulative over this process, plus history loaded at start)
        self.completed = 0
        self.aborted: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.site_refusals: Counter[str] = Counter()  # signed policy refusals, by reason
        self.bytes_in: Counter[str] = Counter()  # per stage
        self.bytes_out: Counter[str] = Counter()
        self.heads_seen: Counter[str] = Counter()  # per stage (upload | applied)
        self.stage_hist: dict[str, list[int]] = {}  # stage -> counts per bucket (+Inf last)
        self.stage_sum: Counter[str] = Counter()
        self.events_seen = 0

    # ------------------------------------------------------------------ feeding

    def load(self, rounds: Iterable[Any], heads: Iterable[tuple[int, str, str, int]],
             bytes_in: dict[int, int]) -> None:
        """History from the coordinator's state file (a restart): round rows, accepted ledger
        heads as (round, enterprise, stage, index) and the bytes received per round."""
        for row in rounds:
            view = RoundView(row.round, row.mode, tuple(row.participants), status=row.status,
                             opened_at=row.opened_at, closed_at=row.closed_at,
                             survivors=row.survivors, bytes_in=bytes_in.get(row.round, 0),
                             abort_reason=row.abort_reason)
            self._add_round(view)
            if row.status == "done":
                self.completed += 1
            elif row.status == "aborted":
                self.aborted[abort_kind(row.abort_reason or "")] += 1
        for r, eid, stage, index in heads:
            self._head(r, eid, stage, index)

    def observe(self, event: dict[str, Any]) -> None:
        """Apply one coordinator event (unknown kinds are counted and otherwise ignored)."""
        self.events_seen += 1
        handler = getattr(self, "_on_" + str(event.get("event")), None)
        if handler is not None:
            handler(event)

    def count_sent(self, round_number: int, stage: str, n: int) -> None:
        """Bytes the coordinator sent to a site (an inbox, an aggregate)."""
        self.bytes_out[stage] += n
        view = self.rounds.get(round_number)
        if view is not None:
            view.bytes_out += n

    def _add_round(self, view: RoundView) -> None:
        if view.round not in self.rounds:
            self._order.append(view.round)
        self.rounds[view.round] = view
        while len(self._order) > ROUNDS_KEPT:
            self.rounds.pop(self._order.popleft(), None)

    def _mark(self, eid: str, state: str, note: str = "") -> None:
        ent = self.enterprises.get(eid)
        if ent is None or ent.state in _STICKY:
            return
        ent.state = state
        if note:
            ent.note = note

    def _stage_timing(self, stage: str | None, now: float) -> None:
        if stage is None or self.stage_opened_at is None:
            return
        took = max(0.0, now - self.stage_opened_at)
        counts = self.stage_hist.setdefault(stage, [0] * (len(STAGE_BUCKETS) + 1))
        for i, bound in enumerate(STAGE_BUCKETS):
            if took <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self.stage_sum[stage] += took

    def _on_coordinator_started(self, event: dict[str, Any]) -> None:
        self.started_at = float(event.get("at", self._clock()))

    def _on_awaiting_sites(self, event: dict[str, Any]) -> None:
        self.start_deadline = float(event["deadline"])
        for eid in event.get("ready") or ():
            self._on_site_ready({"enterprise": eid})

    def _on_site_ready(self, event: dict[str, Any]) -> None:
        if self.current is None:
            self._mark(str(event["enterprise"]), "ready")

    def _on_sites_ready(self, _event: dict[str, Any]) -> None:
        self.start_deadline = None

    def _on_round_opened(self, event: dict[str, Any]) -> None:
        now = float(event.get("at", self._clock()))
        participants = tuple(event["participants"])
        self._add_round(RoundView(int(event["round"]), str(event["mode"]), participants,
                                  opened_at=now))
        self._enter_round(int(event["round"]), participants, "advertise", now,
                          event.get("deadline"))

    def _on_round_resumed(self, event: dict[str, Any]) -> None:
        r = int(event["round"])
        view = self.rounds.get(r)
        participants = view.participants if view else tuple(self.enterprises)
        self._enter_round(r, participants, str(event["stage"]), float(event.get("at", 0.0)),
                          event.get("deadline"))
        for eid, state in (event.get("states") or {}).items():
            self._mark(eid, state)

    def _enter_round(self, r: int, participants: tuple[str, ...], stage: str, now: float,
                     deadline: float | None) -> None:
        self.current, self.stage, self.stage_opened_at = r, stage, now
        self.deadline = float(deadline) if deadline is not None else None
        for eid, ent in self.enterprises.items():
            ent.state = "waiting" if eid in participants else "excluded"
            ent.note = ""

    def _on_stage_closed(self, event: dict[str, Any]) -> None:
        now = float(event.get("at", self._clock()))
        self._stage_timing(str(event["stage"]), now)
        for eid in event.get("missing") or ():
            self._mark(eid, "dropped", f"missed stage {event['stage']}")
        self.stage, self.stage_opened_at = str(event["next"]), now
        deadline = event.get("deadline")
        self.deadline = float(deadline) if deadline is not None else None

    def _on_message(self, event: dict[str, Any]) -> None:
        stage, n = str(event["stage"]), int(event["bytes"])
        self.bytes_in[stage] += n
        view = self.rounds.get(int(event["round"]))
        if view is not None:
            view.bytes_in += n
        if stage == "advertise":
            self._mark(str(event["sender"]), "advertised")
        elif stage == "upload":
            self._mark(str(event["sender"]), "uploaded")

    def _on_message_refused(self, event: dict[str, Any]) -> None:
        kind = str(event["kind"])
        self.refusals[kind] += 1
        if int(event.get("round", -1)) != self.current:
            return
        eid = str(event["sender"])
        if kind == "late":
            self._mark(eid, "late", f"{event.get('stage')} message after its stage closed")
        elif eid in self.enterprises:
            self.enterprises[eid].note = f"{event.get('stage')} refused: {kind}"

    def _on_site_refused(self, event: dict[str, Any]) -> None:
        """The site declined the round under its own policy (its signed refusal)."""
        self.refusals["policy"] += 1
        self.site_refusals[str(event.get("kind") or "policy")] += 1
        if int(event.get("round", -1)) == self.current:
            self._mark(str(event["enterprise"]), "refused by policy", str(event.get("reason", "")))

    def _on_confirmed(self, event: dict[str, Any]) -> None:
        if int(event["round"]) == self.current:
            self._mark(str(event["sender"]), "confirmed")

    def _on_ledger_head(self, event: dict[str, Any]) -> None:
        self._head(int(event["round"]), str(event["enterprise"]), str(event["stage"]),
                   int(event["index"]))

    def _head(self, r: int, eid: str, stage: str, index: int) -> None:
        ent = self.enterprises.get(eid)
        if ent is None:
            return
        self.heads_seen[stage] += 1
        ent.head_index = max(ent.head_index, index)
        if stage == "upload" and r not in ent.charged_rounds:
            ent.charged_rounds.add(r)
            ent.epsilon = self._charge(ent, r)

    def _charge(self, ent: EnterpriseView, r: int) -> float:
        """Add one DP-SGD charge under round ``r``'s public terms to ``ent``'s RDP curve and
        return the RDP ε of all its charges (the same accountant, orders and conversion as
        ``compose_epsilon(..., accountant="rdp")``). A running sum instead of recomposing every
        charged round: O(1) time and memory per head instead of a cache keyed by the whole
        tuple of charged rounds, which grew quadratically over a long federation."""
        sigma, q, steps, delta = self._terms_for(r)
        curve = event_rdp(DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=steps))
        ent.rdp = curve if ent.rdp is None else ent.rdp + curve
        if r >= ent.delta_round:  # compose_epsilon is given the δ of the newest round
            ent.delta_round, ent.delta = r, delta
        return float(rdp_to_epsilon(ent.rdp, delta=ent.delta))

    def _on_aggregated(self, event: dict[str, Any]) -> None:
        view = self.rounds.get(int(event["round"]))
        if view is not None:
            view.survivors = tuple(event["survivors"])

    def _on_round_done(self, event: dict[str, Any]) -> None:
        now = float(event.get("at", self._clock()))
        self._stage_timing("done", now)
        self.completed += 1
        self._close(int(event["round"]), "done", now, None)

    def _on_round_aborted(self, event: dict[str, Any]) -> None:
        now = float(event.get("at", self._clock()))
        reason = str(event.get("reason", ""))
        self.aborted[abort_kind(reason)] += 1
        self._close(int(event["round"]), "aborted", now, reason)

    def _close(self, r: int, status: str, now: float, reason: str | None) -> None:
        view = self.rounds.get(r)
        if view is not None:
            view.status, view.closed_at, view.abort_reason = status, now, reason
        if r == self.current:
            self.stage, self.deadline, self.stage_opened_at = status, None, None

    def _on_contributions(self, event: dict[str, Any]) -> None:
        """Hook for issue I: ``{"event": "contributions", "round": r, "shares": {id: share}}``."""
        view = self.rounds.get(int(event["round"]))
        if view is not None:
            view.contributions = {str(k): float(v) for k, v in dict(event["shares"]).items()}

    def _on_federation_finished(self, _event: dict[str, Any]) -> None:
        self.finished = True

    # ------------------------------------------------------------------ reading

    def active(self) -> int:
        """Participants of the open round still in it (waiting, advertised, uploaded, confirmed)."""
        view = self.rounds.get(self.current) if self.current is not None else None
        if view is None or view.status != "open":
            return 0
        return sum(e.state in ("waiting", "advertised", "uploaded", "confirmed")
                   for e in self.enterprises.values())

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, JSON-ready (``/status.json``)."""
        current = self.rounds.get(self.current) if self.current is not None else None
        shown = list(self._order)[-HISTORY_SHOWN:]
        return {
            "federation": self.federation, "rounds_planned": self.rounds_planned,
            "finished": self.finished, "now": self._clock(),
            "round": None if current is None else {
                "number": current.round, "mode": current.mode, "status": current.status,
                "stage": self.stage, "deadline": self.deadline,
                "participants": len(current.participants)},
            "start": None if self.start_deadline is None else {
                "deadline": self.start_deadline,
                "ready": sum(e.state == "ready" for e in self.enterprises.values()),
                "roster": len(self.enterprises)},
            "target_epsilon": self.target_epsilon,
            "enterprises": [
                {"id": e.id, "state": e.state, "note": e.note, "head_index": e.head_index,
                 "charged_rounds": len(e.charged_rounds), "epsilon_rdp": e.epsilon,
                 "epsilon_is_lower_bound": e.epsilon_is_lower_bound,
                 "contribution": (current.contributions or {}).get(e.id) if current else None}
                for e in self.enterprises.values()],
            "history": [
                {"round": v.round, "mode": v.mode, "status": v.status, "duration": v.duration,
                 "participants": len(v.participants),
                 "survivors": None if v.survivors is None else len(v.survivors),
                 "bytes_in": v.bytes_in, "bytes_out": v.bytes_out,
                 "abort_reason": v.abort_reason, "contributions": v.contributions}
                for v in (self.rounds[r] for r in reversed(shown))],
            "completed": self.completed, "aborted": sum(self.aborted.values()),
        }
