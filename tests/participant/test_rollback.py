"""A site that applied a round the coordinator then aborted (its confirmations lost or late) rolls
back to the adapter it kept -- durably, once, only to that adapter, and only when the
coordinator's outcome of that very round says ``aborted`` from exactly that adapter's hash.
Unit level: the stored adapter, and the join loop's round check against an in-process
coordinator's state (the end-to-end run is ``tests/e2e/test_confirmation_stall.py``). Also the
join loop's round costs the soak showed: catch-up asks only about the rounds since the last one
the site finished, and the accountant is loaded before the site reports ready."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from e2e.harness import make_federation

from secfed.coordinator.service import Coordinator
from secfed.errors import ModelError, ProtocolAbort, TransportError
from secfed.federation.kits import CoordinatorKit, EnterpriseKit
from secfed.federation.plan import model_settings_for
from secfed.participant import Participant
from secfed.participant.adapter import SyntheticSite

DIM = 8
ENTERPRISES = ["a-site", "b-site", "c-site"]


def _site(root, dim: int = 100) -> SyntheticSite:
    return SyntheticSite(root, "a-site", model_settings_for(model_dir=None, synthetic_dim=dim))


def test_the_replaced_adapter_is_kept_durably_and_rolled_back_once(tmp_path) -> None:
    site = _site(tmp_path)
    h0 = site.global_hash()
    v1, v2 = np.full(100, 1, np.float32), np.full(100, 2, np.float32)
    h1 = site.apply(v1, 1)
    site.flush()
    assert _site(tmp_path).previous() == (h0, 0, 1)  # the initial adapter, kept on disk
    site.apply(v2, 2)
    site.flush()
    again = _site(tmp_path)  # a restarted site still has it
    assert again.previous() == (h1, 1, 2)
    assert again.roll_back() == h1
    np.testing.assert_array_equal(again.global_vector(), v1)
    back = _site(tmp_path)
    assert back.global_hash() == h1 and back._store.applied_round == 1
    assert back.previous() is None  # the undone adapter is not kept: no second roll-back
    with pytest.raises(ModelError, match="no previous adapter"):
        back.roll_back()


def test_a_kept_adapter_that_no_longer_matches_its_hash_is_not_offered(tmp_path) -> None:
    site = _site(tmp_path)
    site.apply(np.full(100, 1, np.float32), 1)
    site.apply(np.full(100, 2, np.float32), 2)
    site.flush()
    assert site.previous() is not None
    np.full(100, 9, np.float32).tofile(tmp_path / "adapter.prev.f32")
    assert site.previous() is None
    with pytest.raises(ModelError, match="no previous adapter"):
        site.roll_back()
    assert site.global_hash() == site.hash_of(np.full(100, 2, np.float32))


class _Client:
    """The join loop's client over an in-process coordinator's answers (or a lost one)."""

    def __init__(self, coordinator: Coordinator | None, me: str):
        self.c, self.me = coordinator, me
        self.outcomes: list[int] = []

    def outcome(self, *, round_number: int, until: float | None = None):
        self.outcomes.append(round_number)
        if self.c is None:
            raise TransportError("GET outcome must succeed before the stage's deadline")
        return asyncio.run(self.c.outcome(round_number=round_number))

    def aggregate(self, *, round_number: int) -> bytes:
        assert self.c is not None
        return asyncio.run(self.c.aggregate(sender=self.me, round_number=round_number))

    def close(self) -> None:
        pass


@pytest.fixture
def setting(tmp_path):
    """Round 1 ended at the coordinator with ``first`` ("aborted" or "done") and round 2 is
    open; site a-site already applied a round-1 sum (``update``) to its adapter."""
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg",), rounds=3)
    c = Coordinator(CoordinatorKit.load(kits.coordinator))
    kit = EnterpriseKit.load(kits.enterprises["a-site"])
    events: list[dict] = []
    p = Participant(kit, SyntheticSite(kit.root, "a-site", kit.federation.model),
                    events=events.append, new_ledger=True)
    update = np.linspace(-0.5, 0.5, DIM, dtype=np.float32)

    def start(first: str, *, applied: np.ndarray = update, client: bool = True):
        initial = p.site.global_hash()
        p.site.apply(applied, 1)
        p.site.flush()
        c._open_round(1)
        if first == "aborted":
            c.state.abort_round(1, "no survivor confirmed a new global hash before the deadline")
        else:  # done with the hash this site applied
            c.state.finish_round(1, global_hash_after=p.site.global_hash())
            c._global_hash = p.site.global_hash()
        c._open_round(2)
        p.client = _Client(c if client else None, "a-site")  # type: ignore[assignment]
        return initial, c._info()

    yield p, start, events
    p.close()
    c.state.close()


def test_a_round_aborted_after_the_site_applied_it_is_rolled_back(setting) -> None:
    p, start, events = setting
    initial, info = start("aborted")
    spec, _, _ = p._check(info)  # refused without the roll-back: the site was one step ahead
    assert spec.global_hash == initial == p.site.global_hash()
    np.testing.assert_array_equal(p.site.global_vector(), np.zeros(DIM, np.float32))
    assert p.state.round_status(1) == "rolled-back"
    (event,) = [e for e in events if e["event"] == "rolled_back"]
    assert event["round"] == 1 and event["global_hash"] == initial
    assert "no survivor confirmed" in event["reason"]
    assert p.site.previous() is None  # once


def test_a_round_the_coordinator_calls_done_is_never_rolled_back(setting) -> None:
    p, start, events = setting
    _, info = start("done")
    applied = p.site.global_hash()
    spec, _, _ = p._check(info)  # the next round starts from the hash this site applied
    assert spec.global_hash == applied == p.site.global_hash()
    assert p.client.outcomes == []  # no question asked: the hashes agree
    assert not [e for e in events if e["event"] == "rolled_back"]


def test_no_roll_back_to_a_hash_the_aborted_round_did_not_start_from(setting) -> None:
    p, start, events = setting
    p.site.apply(np.full(DIM, 3, np.float32), 1)  # kept: not the round's starting adapter
    p.site.flush()
    _, info = start("aborted")
    ahead = p.site.global_hash()
    with pytest.raises(ProtocolAbort, match="global_hash must be this site's adapter hash"):
        p._check(info)
    assert p.site.global_hash() == ahead and 1 in p.client.outcomes
    assert not [e for e in events if e["event"] == "rolled_back"]


def test_no_roll_back_without_the_coordinators_word(setting) -> None:
    p, start, events = setting
    _, info = start("aborted", client=False)  # the coordinator's outcome cannot be fetched
    ahead = p.site.global_hash()
    with pytest.raises(TransportError):
        p._check(info)  # (the catch-up's own question fails the same way)
    assert p.site.global_hash() == ahead
    assert [e["event"] for e in events if e["event"].startswith("roll")] == ["rollback_unchecked"]


class _History:
    """Outcomes of a long federation: round ``done_round`` is done from ``start`` (this site's
    hash), every other round aborted; counts the questions."""

    def __init__(self, done_round: int, start: str):
        self.done_round, self.start = done_round, start
        self.asked: list[int] = []

    def outcome(self, *, round_number: int, until: float | None = None):
        from secfed.transport.api import RoundOutcome

        self.asked.append(round_number)
        done = round_number == self.done_round
        return RoundOutcome(round_number=round_number, status="done" if done else "aborted",
                            mode="secagg", global_hash_before=self.start)

    def aggregate(self, *, round_number: int) -> bytes:
        return b"sum"

    def close(self) -> None:
        pass


def test_catch_up_asks_about_the_rounds_since_the_last_one_this_site_finished(tmp_path) -> None:
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg",), rounds=60)
    kit = EnterpriseKit.load(kits.enterprises["a-site"])
    p = Participant(kit, SyntheticSite(kit.root, "a-site", kit.federation.model), new_ledger=True)
    try:
        for r in range(1, 48):
            p.state.set_round(r, "done")
        history = _History(48, p.site.global_hash())
        p.client = history  # type: ignore[assignment]
        p._decode_aggregate = lambda payload, **_kw: (np.ones(DIM), 1)  # type: ignore[method-assign]
        p.check_peers = lambda k, **_kw: 1  # type: ignore[method-assign]
        p._catch_up(before=50)
        assert history.asked == [48, 49]  # not one question per round since round 1
        assert p.state.round_status(48) == "caught-up"
        np.testing.assert_array_equal(p.site.global_vector(), np.ones(DIM, np.float32))
        history.asked.clear()
        p._catch_up(before=51)  # nothing continues the adapter: every round is asked, as before
        assert history.asked == [49, 50, *range(1, 51)]
    finally:
        p.close()


def test_the_accountant_is_loaded_before_the_site_reports_ready(tmp_path) -> None:
    """Its import (Opacus, torch) inside round 1's charge outlasted the train deadline when 20
    sites shared a host (the soak's first rounds aborted): it is paid before "ready"."""
    from secfed.privacy import accounting
    from secfed.transport.api import RoundInfo

    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg",), rounds=1)
    kit = EnterpriseKit.load(kits.enterprises["a-site"])
    p = Participant(kit, SyntheticSite(kit.root, "a-site", kit.federation.model), new_ledger=True)
    loaded: list[int] = []

    class _Finished:
        def ready(self) -> RoundInfo:
            loaded.append(accounting._fft_friendly_prv_class.cache_info().currsize)
            return RoundInfo(round_number=0, status="finished")

        def round_info(self, **_kw) -> RoundInfo:
            return RoundInfo(round_number=0, status="finished")

        def close(self) -> None:
            pass

    p.client = _Finished()  # type: ignore[assignment]
    accounting._fft_friendly_prv_class.cache_clear()
    try:
        assert p.run() == []
        assert loaded == [1]
    finally:
        p.close()
