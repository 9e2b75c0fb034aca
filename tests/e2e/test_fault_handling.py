"""Fault handling, one fast check per fix (issue 19 item 4; the fault matrix over a misbehaving
network is the slow ``test_network_faults.py``): a stalled peer costs a call no longer than its
stage's deadline, a site facing a stalled or vanished coordinator stops with a message naming
where it stopped, a stage that never opens or a federation that finished ends the wait, a
coordinator lost after the confirmation costs the receipts, not the round; on the coordinator a
long poll ends by the open stage's deadline and the process lingers until every site it heard
from was told the federation finished."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np
import pytest

from e2e.harness import make_federation
from secfed.coordinator import until_told
from secfed.coordinator.service import Coordinator
from secfed.errors import ProtocolAbort, TransportError
from secfed.federation.kits import CoordinatorKit, EnterpriseKit
from secfed.participant import Participant
from secfed.participant.adapter import SyntheticSite
from secfed.protocol.participant import ParticipantResult
from secfed.protocol.spec import Stage
from secfed.transport.api import RoundInfo
from secfed.transport.client import CoordinatorClient

ENTERPRISES = ["a-site", "b-site", "c-site"]  # secagg needs n >= 3


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("faults")
    return make_federation(root / "fed", enterprises=ENTERPRISES, dim=8, schedule=("secagg",),
                           rounds=2, stage=4.0, train=4.0, applied=4.0)


@pytest.fixture
def stalled(kits):
    """A peer at the kits' coordinator address that accepts connections and never answers (a
    TLS handshake or request to it hangs, as behind a black-holing middlebox)."""
    url = urlsplit(EnterpriseKit.load(kits.enterprises[ENTERPRISES[0]]).federation.coordinator_url)
    server = socket.create_server((url.hostname, url.port))
    server.settimeout(0.1)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield
    done.set()
    thread.join()
    for sock in [*held, server]:
        sock.close()


def _participant(kits, eid: str = ENTERPRISES[0], *, retry_for: float = 60.0) -> Participant:
    kit = EnterpriseKit.load(kits.enterprises[eid])
    return Participant(kit, SyntheticSite(kit.root, eid, kit.federation.model),
                       retry_for=retry_for, new_ledger=True)


def test_a_call_to_a_stalled_peer_ends_by_its_stage_deadline(kits, stalled) -> None:
    d = kits.enterprises[ENTERPRISES[0]]
    client = CoordinatorClient(base_url=EnterpriseKit.load(d).federation.coordinator_url,
                               cert=d / "client.pem", key=d / "client.key", ca=d / "ca.pem",
                               retry_for=60.0)
    try:
        start = time.monotonic()
        with pytest.raises(TransportError, match="before the stage's deadline"):
            client.inbox(round_number=1, stage="share", wait=20.0, until=start + 1.0)
        assert time.monotonic() - start < 2.5  # not the 10 s timeout, the 20 s poll, 60 s retries
    finally:
        client.close()


def test_a_site_facing_a_stalled_coordinator_stops_with_where_it_stopped(kits, stalled) -> None:
    # stage = 4 s: each request may take 2 s (connect/read/write), a poll 2 s; retries for 3 s
    p = _participant(kits, retry_for=3.0)
    try:
        start = time.monotonic()
        with pytest.raises(TransportError, match=r"stopped after round 0 of 2: .*must succeed"):
            p.run()
        assert time.monotonic() - start < 12.0  # one 30 s timeout + 20 s poll before
    finally:
        p.close()


class _Coordinator:
    """A coordinator that never opens the awaited stage (answers "not yet"), announcing
    ``info``; any other call fails the way a vanished coordinator does."""

    def __init__(self, info: RoundInfo | None):
        self.info = info  # None: the coordinator is gone
        self.calls = 0

    def inbox(self, *, round_number: int, stage: str, wait: float = 0.0,
              until: float | None = None) -> bytes | None:
        self.calls += 1
        if self.calls > 300:
            raise AssertionError("still asking for the stage after 300 polls")
        time.sleep(0.01)
        return None

    def round_info(self, *, after: int = 0, wait: float = 0.0,
                   until: float | None = None) -> RoundInfo:
        if self.info is None:
            raise TransportError("GET /v1/round must succeed before the stage's deadline")
        return self.info

    def outcome(self, *, round_number: int, until: float | None = None):
        raise TransportError("GET outcome must succeed before the stage's deadline")

    def ready(self) -> RoundInfo:  # the site's ready report (issue 22): lost like the rest
        raise TransportError("POST /v1/ready must succeed before the stage's deadline")

    def close(self) -> None:
        pass


def test_a_stage_that_never_opens_ends_the_wait_at_the_sites_own_cutoff(kits) -> None:
    p = _participant(kits)
    # no deadline announced (the wait used to rely on it alone): the site's own bound ends it
    p.client = _Coordinator(RoundInfo(round_number=1, status="open", stage="share"))  # type: ignore[assignment]
    try:
        start = time.monotonic()
        with pytest.raises(TransportError, match="did not open before its deadline"):
            p._await_stage(SimpleNamespace(round_number=1), Stage.UNMASK, by=start + 0.3)
        assert time.monotonic() - start < 2.0
    finally:
        p.close()


def test_a_site_that_learns_the_federation_finished_stops_waiting(kits) -> None:
    p = _participant(kits)
    p.client = _Coordinator(RoundInfo(round_number=2, status="finished", stage="done"))  # type: ignore[assignment]
    try:
        with pytest.raises(ProtocolAbort, match="federation finished before stage unmask"):
            p._await_stage(SimpleNamespace(round_number=2), Stage.UNMASK)
        assert p.client.calls == 1  # type: ignore[attr-defined]
    finally:
        p.close()


def test_a_site_told_the_federation_finished_between_rounds_says_so_and_stops(kits) -> None:
    from secfed.cli.join import describe

    events: list[dict] = []
    p = _participant(kits)
    p._events = events.append
    p.client = _Coordinator(RoundInfo(round_number=0, status="finished"))  # type: ignore[assignment]
    try:
        assert p.run() == []
    finally:
        p.close()
    said = [describe(e) for e in events if e["event"] == "federation_finished"]
    assert said == ["the federation finished (last round seen: 0); stopping"]


def test_a_coordinator_lost_after_the_confirmation_costs_the_receipts_not_the_round(kits) -> None:
    events: list[dict] = []
    p = _participant(kits, ENTERPRISES[1])
    p._events = events.append
    p.client = _Coordinator(None)  # type: ignore[assignment]
    try:
        result = ParticipantResult(np.zeros(8), tuple(ENTERPRISES))
        report = p._settle(SimpleNamespace(round_number=1, mode="secagg"), result, "ab" * 32,
                           {(b"head", "upload")}, 0.5, "", by=time.monotonic() + 1.0)
        assert report.status == "done"
        assert p.state.round_status(1) == "done"
        kinds = [e["event"] for e in events]
        assert {"settle_unknown", "receipt_missing", "peers_unchecked"} <= set(kinds), kinds
    finally:
        p.close()


def _coordinator(kits) -> Coordinator:
    return Coordinator(CoordinatorKit.load(kits.coordinator))


def test_a_long_poll_ends_by_the_open_stages_deadline(kits) -> None:
    c = _coordinator(kits)

    async def poll() -> tuple[bytes | None, float]:
        c._open_round(1)  # not driven: nothing closes the stage at its deadline
        assert c._live is not None
        c._live.deadline = time.time() + 0.2
        start = time.monotonic()
        async with asyncio.timeout(8.0):  # the poll asked for 20 s
            got = await c.inbox(sender=ENTERPRISES[0], round_number=1, stage="share", wait=20.0)
        return got, time.monotonic() - start

    try:
        got, took = asyncio.run(poll())
        assert got is None and took < 0.2 + 1.0 + 0.5, took
    finally:
        c.state.close()


def test_the_coordinator_lingers_until_every_site_it_heard_was_told_it_finished(kits) -> None:
    c = _coordinator(kits)

    async def scenario() -> tuple[bool, bool, bool]:
        c._heard.update(ENTERPRISES[:2])  # two sites sent something
        c._finished = True
        first = await until_told(c, 0.3, period=0.02)  # nobody told: gives up at the limit
        await c.round_info(after=2, wait=0.0, sender=ENTERPRISES[0])
        partly = c.told_everyone()
        waiter = asyncio.create_task(until_told(c, 10.0, period=0.02))
        await asyncio.sleep(0.1)
        await c.round_info(after=0, wait=5.0, sender=ENTERPRISES[1])  # answers at once
        return first, partly, await asyncio.wait_for(waiter, 2.0)

    try:
        first, partly, last = asyncio.run(scenario())
        assert (first, partly, last) == (False, False, True)
    finally:
        c.state.close()
