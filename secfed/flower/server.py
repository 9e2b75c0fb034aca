"""The coordinator as a Flower ServerApp workflow.

:class:`SecfedWorkflow` runs secfed's own coordinator (:class:`secfed.coordinator.service.
Coordinator`: the protocol state machine, the per-stage deadlines, the SQLite transcript with
crash replay, the signed ledger receipts and transcript seals) on an event loop thread, and
carries its stages over Flower Messages instead of HTTPS -- the :class:`~secfed.transport.api.
FederationService` calls the HTTPS server would make (``round_info``, ``inbox``, ``submit``,
``confirm``, ``outcome``) are made here for each node:

1. ``identity``: every node signs a fresh nonce and its Flower node id with its enterprise's
   pinned identity key; only verified adverts map a node to a roster id (one node per id).
2. per round, per stage (``advertise``, then whatever stage the coordinator opens next): one
   message per mapped node carrying its stage input; each reply's Envelope is submitted as that
   enterprise. Nodes that did not answer within the step's timeout (or answered an error) are
   gone: the stage is closed at once instead of at its deadline (the protocol decides whether
   the survivors still suffice), and they get no more messages in this run.
3. ``done``: the aggregate; the reply is the site's signed confirmation of the new global hash.
4. ``outcome``: the round's outcome with the coordinator's signed receipts, answered with the
   site's round report.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from secfed.coordinator.service import Coordinator, EventSink
from secfed.errors import ProtocolAbort, ProtocolError, SecfedError, TransportError
from secfed.federation.kits import CoordinatorKit
from secfed.flower.wire import (
    IDENTITY,
    NONCE_BYTES,
    OUTCOME,
    message_type,
    pack,
    unpack,
    verify_advert,
)
from secfed.transport.api import AppliedConfirmation, Envelope, RoundInfo, RoundOutcome

__all__ = ["SecfedWorkflow", "RunSummary", "FlowerCoordinator", "make_server_app", "outcome_for"]

T = TypeVar("T")
NODE_WAIT_S = 120.0  # how long to wait for the roster's nodes to connect


class FlowerCoordinator(Coordinator):
    """The coordinator, plus the one thing Flower adds: it knows when every reachable node has
    answered a step, so the open stage can close now rather than at its deadline."""

    async def settle(self, round_number: int, stage: str, wait: float) -> RoundInfo:
        """End the open ``stage`` of ``round_number`` (its missing senders are gone) and wait
        until the driver has closed it; the round's info after that."""
        live = self._live
        if live is None or live.spec.round_number != round_number:
            return self._info()
        confirming = stage == "done"

        def closed() -> bool:
            if confirming:
                return live.status in ("done", "aborted")
            return live.status != "open" or live.machine.stage.value != stage

        if not closed():
            live.deadline = min(live.deadline, time.time())
            await self._notify(self._arrived)
        if not await self._wait_change(closed, wait):
            raise TransportError(f"stage {stage} of round {round_number} must close within {wait} s")
        async with self._lock:  # the driver holds it until the transition is committed
            pass
        if live is self._live:
            return self._info()
        status = "aborted" if live.status == "aborted" else "done"
        return RoundInfo(round_number=round_number, status=status, stage=live.machine.stage.value,
                         abort_reason=live.abort_reason)


    async def neighbourhoods(self, round_number: int) -> dict[str, frozenset[str]]:
        """secagg+: each member's neighbourhood (itself and its neighbours) in ``round_number``,
        the confirmations its site checks; empty in other modes or once the round is gone."""
        live = self._live
        if live is None or live.spec.round_number != round_number:
            return {}
        got = {p: live.machine.neighbourhood(p) for p in live.spec.participants}
        return {p: near for p, near in got.items() if near is not None}


@dataclass
class RunSummary:
    """What a run measured: seconds per round, the node -> enterprise map, and per round each
    site's report and the survivors."""

    round_s: list[float] = field(default_factory=list)
    nodes: dict[int, str] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    refused_adverts: list[str] = field(default_factory=list)
    # CPU seconds of secfed's own coordinator threads (this workflow's, the coordinator's event
    # loop and its worker threads), without the engine's threads in the same process
    coordinator_cpu_s: float | None = None


def _threads_cpu(name: str) -> float | None:
    """CPU seconds so far of the thread ``name`` and of the asyncio worker threads (where its
    ``asyncio.to_thread`` calls run); None where per-thread clocks are not available."""
    total = 0.0
    for t in threading.enumerate():
        if t.ident is None or not (t.name == name or t.name.startswith("asyncio_")):
            continue
        try:
            total += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (AttributeError, OSError):
            return None
    return total


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="secfed-flower-coordinator")
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class SecfedWorkflow:
    """Run a secfed federation's rounds over a Flower ``Grid``.

    Args:
        coordinator_kit: the coordinator's startup kit (its ``state.sqlite`` is the transcript).
        events: receives the coordinator's events and this workflow's (``flower_*``).
        step_timeout: seconds a step waits for the nodes' answers (default: the federation's
            deadline for that stage).
    """

    def __init__(self, coordinator_kit: str | Path, *, events: EventSink | None = None,
                 step_timeout: float | None = None, durable: bool = False):
        self.kit = CoordinatorKit.load(coordinator_kit)
        self.fed = self.kit.federation
        self._events = events or (lambda _e: None)
        self._step_timeout = step_timeout
        self._durable = durable
        self.node_of: dict[str, int] = {}
        self.gone: set[str] = set()

    def emit(self, kind: str, **fields: Any) -> None:
        self._events({"event": kind, "at": round(time.time(), 3), **fields})

    def _timeout(self, step: str) -> float:
        if self._step_timeout is not None:
            return self._step_timeout
        d = self.fed.deadlines
        return {"advertise": d.train, "upload": d.train, "done": d.applied}.get(step, d.stage)

    # ------------------------------------------------------------------ messages

    def _exchange(self, grid: Any, step: str, fields: dict[str, dict[str, Any]]
                  ) -> dict[str, tuple[str, bytes]]:
        """Send ``step`` to each enterprise's node; {enterprise: (kind, payload)} answered."""
        from flwr.app import Message

        eid_of = {n: e for e, n in self.node_of.items()}
        messages = [Message(pack(**f), dst_node_id=self.node_of[e], message_type=message_type(step))
                    for e, f in fields.items()]
        answers: dict[str, tuple[str, bytes]] = {}
        for reply in grid.send_and_receive(messages, timeout=self._timeout(step)):
            eid = eid_of.get(reply.metadata.src_node_id)
            if eid is None:
                continue
            if reply.has_error():
                answers[eid] = ("error", reply.error.reason.encode())
                continue
            try:
                got = unpack(reply.content)
                answers[eid] = (str(got["kind"]), bytes(got.get("payload", b"")))
            except (SecfedError, KeyError) as exc:
                answers[eid] = ("error", str(exc).encode())
        for eid in fields:
            if eid not in answers:
                answers[eid] = ("error", f"no answer to {step} within the timeout".encode())
        return answers

    def _map_nodes(self, grid: Any, summary: RunSummary) -> None:
        """Map Flower node ids to roster ids from signed adverts over fresh nonces."""
        from flwr.app import Message

        want = len(self.fed.roster)
        end = time.monotonic() + NODE_WAIT_S
        nodes = list(grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < end:
            time.sleep(0.5)
            nodes = list(grid.get_node_ids())
        nonces = {n: secrets.token_bytes(NONCE_BYTES) for n in nodes}
        messages = [Message(pack(nonce=nonces[n]), dst_node_id=n, message_type=message_type(IDENTITY))
                    for n in nodes]
        roster = {e.id: e.public_key_bytes() for e in self.fed.roster}
        for reply in grid.send_and_receive(messages, timeout=self._timeout("advertise")):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise ProtocolError(f"node answered an error: {reply.error.reason}")
                got = unpack(reply.content)
                if got.get("kind") != "advert":
                    raise ProtocolError(f"node answered {got.get('kind')}: {bytes(got.get('payload', b''))[:200]!r}")
                advert = json.loads(bytes(got["payload"]))
                eid = str(advert["enterprise"])
                verify_advert(roster, federation=self.fed.name, node_id=node, nonce=nonces[node],
                              enterprise=eid, signature=bytes.fromhex(advert["signature"]))
                if eid in self.node_of:
                    raise ProtocolError(f"enterprise {eid!r} is already node {self.node_of[eid]}")
            except (SecfedError, KeyError, ValueError) as exc:
                summary.refused_adverts.append(f"node {node}: {type(exc).__name__}: {exc}")
                self.emit("flower_advert_refused", node=node, reason=str(exc))
                continue
            self.node_of[eid] = node
            summary.nodes[node] = eid
        self.emit("flower_nodes_mapped", mapped=len(self.node_of), nodes=len(nodes),
                  refused=len(summary.refused_adverts))
        if not self.node_of:
            raise ProtocolError("no Flower node proved a roster identity")

    # ------------------------------------------------------------------ rounds

    def __call__(self, grid: Any, context: Any = None) -> RunSummary:
        """Run every round of the federation; the run's summary.

        Raises:
            ProtocolError: no node proved a roster identity.
        """
        summary = RunSummary()
        cpu0 = time.thread_time()
        self._map_nodes(grid, summary)
        loop = _LoopThread()
        coordinator = FlowerCoordinator(self.kit, events=self._events, durable=self._durable)
        driver = asyncio.run_coroutine_threadsafe(coordinator.run(), loop.loop)
        try:
            for r in range(1, self.fed.rounds + 1):
                if driver.done():
                    driver.result()  # re-raise the coordinator's error
                    break
                info = loop.call(coordinator.round_info(after=r - 1, wait=NODE_WAIT_S))
                if info.round_number < r or info.status == "finished":
                    break  # recovered past this round
                if info.round_number > r:
                    continue
                started = time.perf_counter()
                summary.rounds.append(self._round(grid, loop, coordinator, info))
                summary.round_s.append(time.perf_counter() - started)
            driver.result(timeout=self._timeout("done") + NODE_WAIT_S)
        finally:
            if not driver.done():
                driver.cancel()
            own = _threads_cpu(loop.thread.name)
            summary.coordinator_cpu_s = None if own is None else own + time.thread_time() - cpu0
            loop.stop()
            coordinator.state.close()
        return summary

    def _round(self, grid: Any, loop: _LoopThread, coordinator: FlowerCoordinator,
               info: RoundInfo) -> dict[str, Any]:
        r = info.round_number
        stage = "advertise"
        shown = info.model_dump_json()  # once, not once per node: it lists every participant
        fields = {e: {"round": r, "info": shown} for e in self.node_of if e not in self.gone}
        near: dict[str, frozenset[str]] = {}
        while True:
            if stage == "done":  # the graph is fixed; read before the round can be replaced
                near = loop.call(coordinator.neighbourhoods(r))
            answers = self._exchange(grid, stage, fields)
            for eid, (kind, payload) in answers.items():
                self._accept(loop, coordinator, eid, r, stage, kind, payload)
            info = loop.call(coordinator.settle(r, stage, self._timeout(stage) + NODE_WAIT_S))
            if stage == "done" or info.status != "open" or info.round_number != r:
                break
            stage = str(info.stage)
            fields = {}
            for eid in self.node_of:
                if eid in self.gone:
                    continue
                try:
                    payload = loop.call(coordinator.inbox(sender=eid, round_number=r, stage=stage,
                                                          wait=0.0))
                except ProtocolAbort:  # not a survivor of the previous stage
                    continue
                if payload is not None:
                    fields[eid] = {"round": r, "payload": payload,
                                   "deadline": info.stage_deadline_unix or 0.0}
        return self._close_round(grid, loop, coordinator, r, near)

    def _accept(self, loop: _LoopThread, coordinator: FlowerCoordinator, eid: str, r: int,
                stage: str, kind: str, payload: bytes) -> None:
        """Hand one node's answer to the coordinator as that enterprise."""
        try:
            if kind == "envelope":
                envelope = Envelope.from_bytes(payload)
                loop.call(coordinator.submit(sender=eid, envelope=envelope))
            elif kind == "confirmation" and stage == "done":
                confirmation = AppliedConfirmation.model_validate_json(payload)
                loop.call(coordinator.confirm(sender=eid, round_number=r, confirmation=confirmation))
            elif kind == "report":
                self.emit("flower_node_left_round", round=r, stage=stage, enterprise=eid,
                          report=json.loads(payload))
            else:
                self.gone.add(eid)
                self.emit("flower_node_gone", round=r, stage=stage, enterprise=eid,
                          reason=payload[:300].decode(errors="replace"))
        except (SecfedError, ValueError) as exc:
            self.emit("flower_message_refused", round=r, stage=stage, enterprise=eid,
                      reason=f"{type(exc).__name__}: {exc}")

    def _close_round(self, grid: Any, loop: _LoopThread, coordinator: FlowerCoordinator,
                     r: int, near: dict[str, frozenset[str]]) -> dict[str, Any]:
        """Send the round's outcome (receipts) to every node still here; collect reports.
        ``near``: secagg+ neighbourhoods, whose confirmations each site is sent."""
        outcome = loop.call(coordinator.outcome(round_number=r))
        last = r >= self.fed.rounds
        status = "aborted" if outcome.status == "aborted" else ("finished" if last else "done")
        settled = RoundInfo(round_number=r, status=status, abort_reason=outcome.abort_reason)  # type: ignore[arg-type]
        shown = settled.model_dump_json()
        # Each node gets its own receipts only (a site keeps its own; the others' would make
        # the step n^2 bytes), and the signed confirmations it checks: in secagg+ its
        # neighbourhood's (k + 1), otherwise every survivor's.
        fields = {e: {"round": r, "outcome": outcome_for(outcome, e, near.get(e)), "info": shown}
                  for e in self.node_of if e not in self.gone}
        reports: dict[str, Any] = {}
        for eid, (kind, payload) in self._exchange(grid, OUTCOME, fields).items():
            if kind == "report":
                reports[eid] = json.loads(payload)
            else:
                self.gone.add(eid)
                reports[eid] = {"status": "gone", "detail": payload[:300].decode(errors="replace")}
        self.emit("flower_round_closed", round=r, status=outcome.status,
                  survivors=len(outcome.survivors))
        return {"round": r, "status": outcome.status, "mode": outcome.mode,
                "survivors": list(outcome.survivors), "reports": reports,
                "gone": sorted(self.gone)}


def outcome_for(outcome: RoundOutcome, enterprise: str,
                neighbourhood: frozenset[str] | None = None) -> str:
    """``outcome`` as ``enterprise``'s node gets it (JSON): its own receipts, not every site's,
    and, given its secagg+ ``neighbourhood``, only the confirmations of that neighbourhood (the
    ones its site checks, :meth:`secfed.participant.loop.Participant.check_peers`)."""
    update: dict[str, Any] = {
        "receipts": {enterprise: outcome.receipts[enterprise]} if enterprise in outcome.receipts else {}}
    if neighbourhood is not None:
        update["confirmations"] = {p: c for p, c in outcome.confirmations.items() if p in neighbourhood}
    return outcome.model_copy(update=update).model_dump_json()


def make_server_app(coordinator_kit: str | Path | None = None, **options: Any) -> Any:
    """A Flower ``ServerApp`` whose main runs :class:`SecfedWorkflow`. Without
    ``coordinator_kit`` the run config's ``coordinator-kit`` names it."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        kit = coordinator_kit or context.run_config.get("coordinator-kit")
        if not kit:
            raise SystemExit("secfed: error: run config must set coordinator-kit")
        if "events" not in options:  # into Flower's log: `flwr run --stream` / `flwr log`
            from logging import INFO

            from flwr.common.logger import log

            options["events"] = lambda e: log(INFO, "secfed %s", json.dumps(e, default=str))
        SecfedWorkflow(str(kit), **options)(grid, context)

    return app
