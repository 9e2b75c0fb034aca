"""The participant's coordinator calls, answered by Flower messages instead of HTTPS.

:class:`secfed.participant.loop.Participant` pulls: it asks for the round, for a stage's input,
and posts each stage's envelope. A Flower ClientApp is pushed: it is handed one message and must
answer it. :class:`FlowerBridge` joins the two: the participant runs unchanged in its own thread
(its kit, site policy, ledger charged before the update leaves, signed receipts), every call it
makes on its "client" lands here, and :meth:`FlowerBridge.deliver` -- called by the ClientApp's
message handler -- hands it the message's input and waits for its answer to that step: the
envelope it posts for the stage, its signed confirmation of the new global hash (``done``), or,
for a site that refused or left the round, its round report.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from secfed.errors import ProtocolAbort, ProtocolError, TransportError
from secfed.flower.wire import OUTCOME
from secfed.transport.api import (
    AppliedConfirmation,
    Envelope,
    RoundInfo,
    RoundOutcome,
    RoundRefusal,
    SubmitAck,
)

__all__ = ["FlowerBridge", "Answer"]

APPLIED = "applied"


@dataclass(frozen=True)
class Answer:
    """A site's answer to one step: ``kind`` is ``envelope`` (Envelope bytes), ``confirmation``
    (AppliedConfirmation JSON), ``report`` (its round report, JSON) or ``error``."""

    kind: str
    payload: bytes = b""


class FlowerBridge:
    """The :class:`~secfed.transport.client.CoordinatorClient` calls a participant makes,
    answered from delivered Flower messages (thread-safe; one bridge per site)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._info: RoundInfo | None = None
        self._inbox: dict[tuple[int, str], bytes] = {}
        self._outbox: dict[tuple[int, str], Answer] = {}
        self._outcomes: dict[int, RoundOutcome] = {}
        self._settled: set[int] = set()  # rounds whose outcome arrived, not yet seen settled
        self._reports: dict[int, bytes] = {}
        self._failure: str | None = None
        self._closed = False

    # ------------------------------------------------------------------ ClientApp side

    def deliver(self, *, round_number: int, step: str, payload: bytes = b"",
                info: RoundInfo | None = None, outcome: RoundOutcome | None = None,
                timeout: float) -> Answer:
        """Hand the participant one step's input; wait (up to ``timeout``) for its answer."""
        key = (round_number, APPLIED if step == "done" else step)
        with self._cond:
            if info is not None:
                self._info = info
            if outcome is not None:
                self._outcomes[round_number] = outcome
                self._settled.add(round_number)
            if step not in (OUTCOME, "advertise"):
                self._inbox[(round_number, step)] = payload
            self._cond.notify_all()
            end = time.monotonic() + timeout
            while True:
                if step != OUTCOME and key in self._outbox:
                    return self._outbox.pop(key)
                if round_number in self._reports:
                    return Answer("report", self._reports[round_number])
                if self._failure is not None:
                    return Answer("error", self._failure.encode())
                left = end - time.monotonic()
                if left <= 0:
                    return Answer("error", f"no answer to {step} within {timeout:.0f} s".encode())
                self._cond.wait(left)

    def set_stage_deadline(self, stage: str, deadline: float | None) -> None:
        with self._cond:
            if self._info is not None:
                self._info = self._info.model_copy(
                    update={"stage": stage, "stage_deadline_unix": deadline})

    def report(self, round_number: int, report: bytes) -> None:
        with self._cond:
            self._reports[round_number] = report
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        """The participant thread ended with an error: every waiting step answers it."""
        with self._cond:
            self._failure = reason
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ participant side

    def _wait(self, ready: Callable[[], bool], wait: float) -> bool:
        end = time.monotonic() + wait
        while not ready():
            if self._closed:
                raise TransportError("the Flower node stopped (site session closed)")
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._cond.wait(left)
        return True

    # ``until`` (the participant's bound on a stage's calls) is not needed here: nothing
    # crosses a network, and the Flower ServerApp paces the stages with the same deadlines.

    def round_info(self, *, after: int = 0, wait: float = 0.0,
                   until: float | None = None) -> RoundInfo:
        """The newest delivered round after ``after``; round ``after`` itself once, when its
        outcome arrived (the participant's "round settled" wait)."""
        with self._cond:
            def ready() -> bool:
                info = self._info
                return info is not None and (
                    info.round_number > after or info.status == "finished"
                    or after in self._settled)

            if self._wait(ready, wait):
                self._settled.discard(after)
            return self._info or RoundInfo(round_number=0, status="waiting")

    def _aborted(self, round_number: int) -> None:
        info = self._info
        if info is not None and info.round_number == round_number and info.status == "aborted":
            raise ProtocolAbort(f"round {round_number} was aborted: {info.abort_reason}")

    def inbox(self, *, round_number: int, stage: str, wait: float = 0.0,
              until: float | None = None) -> bytes | None:
        with self._cond:
            key = (round_number, stage)

            def ready() -> bool:
                info = self._info
                return key in self._inbox or (
                    info is not None and info.round_number == round_number
                    and info.status == "aborted")

            if not self._wait(ready, wait):
                return None
            if key not in self._inbox:
                self._aborted(round_number)
            return self._inbox.pop(key)

    def _post(self, round_number: int, step: str, answer: Answer) -> None:
        with self._cond:
            self._outbox[(round_number, step)] = answer
            self._cond.notify_all()

    def submit(self, envelope: Envelope, *, until: float | None = None) -> SubmitAck:
        data = envelope.to_bytes()
        self._post(envelope.round_number, envelope.stage, Answer("envelope", data))
        return SubmitAck(accepted=True, round_number=envelope.round_number, stage=envelope.stage,
                         sha256=envelope.payload_sha256())

    def exchange(self, envelope: Envelope, *, next_stage: str, wait: float = 0.0,
                 until: float | None = None) -> bytes | None:
        self.submit(envelope)
        return self.inbox(round_number=envelope.round_number, stage=next_stage, wait=wait)

    def confirm(self, *, round_number: int, confirmation: AppliedConfirmation,
                until: float | None = None) -> SubmitAck:
        body = confirmation.model_dump_json().encode()
        self._post(round_number, APPLIED, Answer("confirmation", body))
        return SubmitAck(accepted=True, round_number=round_number, stage="done",
                         sha256=hashlib.sha256(body).hexdigest())

    def refuse(self, *, round_number: int, refusal: RoundRefusal) -> SubmitAck:
        """Over Flower a refusing site answers the step with its round report (the workflow
        closes the stage once every node answered), so the refusal itself goes nowhere."""
        return SubmitAck(accepted=True, round_number=round_number, stage="refusal",
                         sha256=hashlib.sha256(refusal.model_dump_json().encode()).hexdigest())

    def ready(self) -> RoundInfo:
        """Flower's workflow starts once every node has connected and proved its identity."""
        with self._cond:
            return self._info or RoundInfo(round_number=0, status="waiting")

    def outcome(self, *, round_number: int, until: float | None = None) -> RoundOutcome:
        with self._cond:
            if not self._wait(lambda: round_number in self._outcomes, 0.0):
                raise ProtocolError(f"round {round_number}'s outcome was not delivered to this node")
            return self._outcomes[round_number]

    def aggregate(self, *, round_number: int) -> bytes:
        raise ProtocolError(
            f"round {round_number}'s aggregate is not available over Flower (no catch-up): "
            "a site that missed a round rejoins through the HTTPS transport")

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}
