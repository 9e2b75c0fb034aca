"""The coordinator's status board, page and /metrics (issue J items 1-2), through the real
coordinator service driven in-process (the rounds of ``test_ledger_anchoring``): every number
they show equals the coordinator's SQLite state, and each enterprise's ε equals the RDP ε its
own signed ledger records."""

from __future__ import annotations

import asyncio
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from secfed.coordinator.metrics import Metrics
from secfed.coordinator.service import Coordinator
from secfed.coordinator.status import StatusBoard
from secfed.coordinator.status_page import render_page
from secfed.crypto.keys import IdentityKey
from secfed.errors import ProtocolError
from secfed.federation.kits import CoordinatorKit
from secfed.privacy import Ledger
from secfed.protocol import ParticipantPolicy, ParticipantRound, Stage
from secfed.transport.api import Envelope

from .test_ledger_anchoring import ENTERPRISES, EVENT, _fed, _round


def _metrics(board: StatusBoard) -> dict[tuple[str, tuple], float]:
    text = Metrics(board).render().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _two_rounds(tmp_path):
    """Round 1: all four sites. Round 2: org-a's upload head is an impostor's (refused), so
    org-a is dropped at the upload close and the round finishes with three."""
    fed = _fed(tmp_path)
    impostor = Ledger.open(tmp_path / "impostor.sqlite", enterprise_id="org-a",
                           identity=IdentityKey.generate(), create=True)
    impostor.charge(round_number=2, session_id=b"x" * 32, event=EVENT)

    def head_of(e: str, honest: bytes) -> bytes:
        return impostor.head().to_bytes() if e == "org-a" else honest

    async def both() -> None:
        await _round(fed, 1)
        await _round(fed, 2, head_of=head_of)

    asyncio.run(both())
    return fed


def test_board_page_and_metrics_equal_the_coordinators_state(tmp_path) -> None:
    fed = _two_rounds(tmp_path)
    coord = fed.coordinator
    board = coord.board
    snap = board.snapshot()
    state = coord.state
    rows = {r.round: r for r in state.rounds()}
    # the current round and the history, row by row against SQLite
    assert snap["round"]["number"] == 2 and snap["round"]["status"] == "done"
    assert snap["completed"] == 2 and snap["aborted"] == 0
    history = {h["round"]: h for h in snap["history"]}
    assert set(history) == set(rows) == {1, 2}
    for r, row in rows.items():
        h = history[r]
        assert (h["status"], h["mode"], h["participants"]) == (row.status, row.mode,
                                                                len(row.participants))
        assert h["survivors"] == len(row.survivors)
        assert h["bytes_in"] == sum(len(t.payload) for t in state.transcript(r))
        assert h["duration"] is not None and h["duration"] >= 0
    assert history[2]["survivors"] == 3
    # bytes out: what the HTTP side serves (this driver read the outboxes directly)
    assert history[2]["bytes_out"] == 0

    async def fetch() -> int:
        inbox = await coord.inbox(sender="org-b", round_number=2, stage="consistency", wait=0)
        total = await coord.aggregate(sender="org-b", round_number=2)
        return len(inbox) + len(total)

    served = asyncio.run(fetch())
    snap = board.snapshot()
    history = {h["round"]: h for h in snap["history"]}
    assert history[2]["bytes_out"] == served > 0
    # each enterprise: state this round, newest head and ε = its own ledger's RDP ε
    ents = {e["id"]: e for e in snap["enterprises"]}
    assert ents["org-a"]["state"] == "dropped" and "upload" in ents["org-a"]["note"]
    for e in ("org-b", "org-c", "org-d"):
        ledger = fed.ledgers[e]
        assert ents[e]["state"] == "confirmed"
        assert ents[e]["head_index"] == ledger.head().index == 2
        assert math.isclose(ents[e]["epsilon_rdp"], ledger.epsilon_spent()[1], rel_tol=1e-9)
        assert not ents[e]["epsilon_is_lower_bound"]
    # org-a's ledger holds two charges; the coordinator accepted the head of one upload only
    a = ents["org-a"]
    assert a["head_index"] == 1 and a["charged_rounds"] == 1
    assert fed.ledgers["org-a"].head().index == 2
    first = Ledger.open(tmp_path / "one.sqlite", enterprise_id="x", identity=IdentityKey.generate(),
                        create=True)
    first.charge(round_number=1, session_id=b"y" * 32, event=EVENT)
    assert math.isclose(a["epsilon_rdp"], first.epsilon_spent()[1], rel_tol=1e-9)
    # /metrics: the same numbers
    m = _metrics(board)
    assert m[("secfed_rounds_completed_total", ())] == 2
    assert m[("secfed_refusals_total", (("reason", "signature"),))] == 1
    assert m[("secfed_current_round", ())] == 2
    assert m[("secfed_enterprises", ())] == len(ENTERPRISES)
    for e in ENTERPRISES:
        assert m[("secfed_ledger_head_index", (("enterprise", e),))] == ents[e]["head_index"]
    received = sum(v for (name, _l), v in m.items() if name == "secfed_bytes_received_total")
    assert received == sum(h["bytes_in"] for h in history.values())
    sent = sum(v for (name, _l), v in m.items() if name == "secfed_bytes_sent_total")
    assert sent == sum(h["bytes_out"] for h in history.values())
    assert m[("secfed_ledger_heads_seen_total", (("stage", "upload"),))] == 4 + 3
    assert m[("secfed_stage_duration_seconds_count", (("stage", "advertise"),))] == 2
    # the page shows those numbers, and no payload byte string
    page = render_page(board)
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    for e in ("org-b", "org-c", "org-d"):
        assert f'data-value="{ents[e]["epsilon_rdp"]!r}">{ents[e]["epsilon_rdp"]:.4f}' in page
    assert 'data-field="state">dropped<' in page and "&ge; " not in page
    for r in rows:
        for t in state.transcript(r):
            assert t.payload[:24].hex() not in page


def test_a_restarted_coordinator_shows_the_same_history(tmp_path) -> None:
    fed = _two_rounds(tmp_path)
    before = fed.coordinator.board.snapshot()
    fed.coordinator.state.close()
    again = Coordinator(CoordinatorKit.load(fed.coordinator.kit.root)).board.snapshot()
    strip = ("bytes_out", "duration")  # bytes sent are counted in memory; durations to the ms
    for old, new in zip(before["history"], again["history"], strict=True):
        assert {k: v for k, v in old.items() if k not in strip} == \
            {k: v for k, v in new.items() if k not in strip}
    for old, new in zip(before["enterprises"], again["enterprises"], strict=True):
        assert (old["head_index"], old["charged_rounds"], old["epsilon_rdp"]) == \
            (new["head_index"], new["charged_rounds"], new["epsilon_rdp"])
    assert again["completed"] == 2


def test_late_and_dropped_sites_and_their_refusals(tmp_path) -> None:
    fed = _fed(tmp_path)
    coord = fed.coordinator
    coord._open_round(1)
    live = coord._live
    parties = {e: ParticipantRound(live.spec, me=e, identity=fed.identity(e), roster=coord.roster,
                                   policy=ParticipantPolicy()) for e in ENTERPRISES}
    adverts = {e: parties[e].start() for e in ENTERPRISES}

    async def send(e: str) -> None:
        await coord.submit(sender=e, envelope=Envelope(round_number=1, stage="advertise",
                                                       ledger_head=b"", payload=adverts[e]))

    async def run() -> None:
        for e in ("org-a", "org-b", "org-c"):
            await send(e)
        assert coord.board.snapshot()["enterprises"][0]["state"] == "advertised"
        coord._close_stage(live)  # the deadline passes without org-d
        with pytest.raises(ProtocolError, match="late"):
            await send("org-d")

    asyncio.run(run())
    assert live.machine.stage is Stage.SHARE
    snap = coord.board.snapshot()
    states = {e["id"]: e["state"] for e in snap["enterprises"]}
    assert states == {"org-a": "advertised", "org-b": "advertised", "org-c": "advertised",
                      "org-d": "late"}
    assert snap["round"]["stage"] == "share"
    assert snap["round"]["deadline"] == pytest.approx(live.deadline)
    assert _metrics(coord.board)[("secfed_refusals_total", (("reason", "late"),))] == 1
    assert _metrics(coord.board)[("secfed_enterprises_active", ())] == 3


def _board(ids=("a", "b", "c")) -> StatusBoard:
    return StatusBoard(federation="f", rounds_planned=3, roster=ids, target_epsilon=8.0,
                       terms_for=lambda _r: (1.0, 0.01, 5, 1e-5), clock=lambda: 100.0)


def test_excluded_policy_refusals_and_contribution_hook() -> None:
    board = _board()
    board.observe({"event": "round_opened", "round": 1, "mode": "secagg", "at": 10.0,
                   "participants": ["a", "b"], "deadline": 70.0})
    board.observe({"event": "site_refused", "round": 1, "enterprise": "b",
                   "reason": "noise_multiplier 0.01 below the site's floor 0.5"})
    board.observe({"event": "stage_closed", "round": 1, "stage": "advertise", "at": 12.0,
                   "missing": ["b"], "next": "share", "deadline": 72.0})
    board.observe({"event": "contributions", "round": 1, "shares": {"a": 1.0}})
    snap = board.snapshot()
    states = {e["id"]: e["state"] for e in snap["enterprises"]}
    assert states == {"a": "waiting", "b": "refused by policy", "c": "excluded"}
    assert {e["id"]: e["contribution"] for e in snap["enterprises"]} == \
        {"a": 1.0, "b": None, "c": None}
    assert snap["round"]["deadline"] == 72.0 and snap["round"]["stage"] == "share"
    m = _metrics(board)
    assert m[("secfed_refusals_total", (("reason", "policy"),))] == 1
    assert m[("secfed_stage_duration_seconds_sum", (("stage", "advertise"),))] == 2.0
    assert m[("secfed_enterprises_active", ())] == 1
    page = render_page(board)
    assert "refused by policy" in page and "noise_multiplier 0.01 below" in page
    assert "&ge; " not in page
    # a head past the charges the coordinator saw (a top-up, an aborted round): a lower bound
    board.observe({"event": "ledger_head", "round": 1, "enterprise": "a", "stage": "upload",
                   "index": 1})
    board.observe({"event": "ledger_head", "round": 1, "enterprise": "a", "stage": "applied",
                   "index": 2})
    a = board.snapshot()["enterprises"][0]
    assert (a["head_index"], a["charged_rounds"], a["epsilon_is_lower_bound"]) == (2, 1, True)
    assert "&ge; " in render_page(board)


def test_page_escapes_what_it_shows() -> None:
    board = _board(ids=("<b>x</b>",))
    board.observe({"event": "round_opened", "round": 1, "mode": "secagg", "at": 1.0,
                   "participants": ["<b>x</b>"], "deadline": None})
    page = render_page(board)
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
