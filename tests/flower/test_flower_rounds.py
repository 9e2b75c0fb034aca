"""secfed's rounds over Flower Messages, in-process: the ServerApp workflow and the sites'
ClientApp exchange real flwr ``Message`` objects through an in-process grid (no Ray, no
SuperLink; the Ray and deployment engines run in the slow tests). Everything else is the real
thing: kits, the coordinator with its SQLite transcript, each site's participant, policy and
ledger."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from secfed.coordinator.state import CoordinatorState  # noqa: E402
from secfed.crypto.keys import IdentityKey  # noqa: E402
from secfed.errors import InvalidSignature, MessageFormatError, ProtocolError  # noqa: E402
from secfed.flower.simulate import _max_abs_error  # noqa: E402
from secfed.flower.wire import (  # noqa: E402
    STEPS,
    message_type,
    pack,
    sign_advert,
    step_of,
    unpack,
    verify_advert,
)
from secfed.transport.api import STAGES  # noqa: E402

from .localgrid import run_local  # noqa: E402


def test_one_message_type_per_stage_from_the_vocabulary():
    # every protocol stage of the transport vocabulary (appended stages included) has its own
    # Flower message type, plus the carrier's identity and outcome steps
    assert set(STAGES) <= set(STEPS)
    types = [message_type(s) for s in STEPS]
    assert len(set(types)) == len(STEPS)
    assert all(t.startswith("query.secfed_") for t in types)
    assert [step_of(t) for t in types] == list(STEPS)
    for bad in ("query.secfed_nope", "train.secfed_upload", "query"):
        with pytest.raises(MessageFormatError):
            step_of(bad)
    with pytest.raises(MessageFormatError):
        unpack(pack(x=1).__class__())  # a content without the secfed record


def test_advert_binds_enterprise_node_and_nonce():
    key, other = IdentityKey.generate(), IdentityKey.generate()
    roster = {"a": key.public_bytes(), "b": other.public_bytes()}
    nonce = b"\x01" * 32
    sig = sign_advert(key, federation="f", node_id=7, nonce=nonce, enterprise="a")
    verify_advert(roster, federation="f", node_id=7, nonce=nonce, enterprise="a", signature=sig)
    for change in ({"node_id": 8}, {"nonce": b"\x02" * 32}, {"enterprise": "b"},
                   {"federation": "g"}):
        args = {"federation": "f", "node_id": 7, "nonce": nonce, "enterprise": "a", **change}
        with pytest.raises(InvalidSignature):
            verify_advert(roster, signature=sig, **args)
    with pytest.raises(ProtocolError):
        verify_advert(roster, federation="f", node_id=7, nonce=nonce, enterprise="z",
                      signature=sig)


OUTCOMES: list[tuple[int, dict]] = []  # (node id, the outcome each node was sent)


def _record_outcomes(message, context, call_next):
    if step_of(message.metadata.message_type) == "outcome":
        OUTCOMES.append((context.node_id, json.loads(str(unpack(message.content)["outcome"]))))
    return call_next(message, context)


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """3 sites, a secagg round then a ckks round, over Flower messages."""
    root = tmp_path_factory.mktemp("flower")
    events: list = []
    OUTCOMES.clear()
    kits, summary = run_local(root, enterprises=3, dim=256, schedule=("secagg", "ckks"),
                              rounds=2, events=events, mods=[_record_outcomes])
    return kits, summary, events


def test_each_node_is_sent_its_own_receipts_and_every_confirmation(two_rounds):
    # a site keeps only its own receipts: sending each node every site's made the outcome step
    # n^2 bytes (issue 18); the confirmations, which each site checks, all go to everyone
    _kits, summary, _ = two_rounds
    assert len(OUTCOMES) == 6  # 3 nodes x 2 rounds
    for node, outcome in OUTCOMES:
        me = summary.nodes[node]
        assert set(outcome["receipts"]) == {me} and outcome["receipts"][me]
        assert set(outcome["confirmations"]) == set(summary.nodes.values())


def test_rounds_complete_with_exact_sums(two_rounds):
    kits, summary, _ = two_rounds
    ids = sorted(kits.enterprises)
    assert [r["status"] for r in summary.rounds] == ["done", "done"]
    assert [r["mode"] for r in summary.rounds] == ["secagg", "ckks"]
    for r in summary.rounds:
        assert r["survivors"] == ids
        assert {e: rep["status"] for e, rep in r["reports"].items()} == {e: "done" for e in ids}
    assert sorted(summary.nodes.values()) == ids  # every node mapped through its signed advert
    # the coordinator's own threads' CPU, measured apart from the engine's (bench/flower_scale)
    assert summary.coordinator_cpu_s is not None and 0 < summary.coordinator_cpu_s < 600
    error, survivors = _max_abs_error(kits, "ckks", 256)
    assert survivors == [3, 3]
    assert error <= 1e-5


def test_each_site_charged_its_ledger_and_kept_receipts(two_rounds):
    kits, _, _ = two_rounds
    from secfed.privacy.ledger import read_ledger, read_receipts

    for kit in kits.enterprises.values():
        assert [e.round_number for e in read_ledger(kit / "ledger.sqlite")] == [1, 2]
        kept = {(r.round_number, r.stage) for r in read_receipts(kit / "ledger.sqlite")}
        assert kept == {(1, "upload"), (1, "applied"), (2, "upload"), (2, "applied")}
    state = CoordinatorState(kits.coordinator / "state.sqlite")
    try:
        for r in (1, 2):
            receipts = state.receipts(r)
            assert sorted(receipts) == sorted(kits.enterprises)  # an upload head from each
            stages = {rec.stage for rec in state.transcript(r)}
            assert {"advertise", "upload"} <= stages
    finally:
        state.close()


def test_secfed_audit_accepts_a_flower_run(two_rounds, tmp_path):
    kits, _, _ = two_rounds
    args = [sys.executable, "-m", "secfed.cli.main", "audit", "--out", str(tmp_path / "report"),
            "--json", "--transcript", str(kits.coordinator / "state.sqlite"),
            "--federation", str(kits.coordinator / "federation.toml")]
    for kit in kits.enterprises.values():
        args += ["--ledger", str(kit / "ledger.sqlite"), "--outbound", str(kit / "state.sqlite")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["verdict"] == "pass"
    assert {c["status"] for c in doc["checks"]} == {"pass"}
    for ent in doc["enterprises"]:
        assert ent["rounds"] == [1, 2] and ent["identity_pinned"]
        uploads = {(m["round_number"], m["protection"]) for m in ent["outbound"]["messages"]
                   if m["stage"] == "upload"}
        assert uploads == {(1, "masked"), (2, "encrypted")}


def test_secaggplus_site_dropped_after_upload_stays_in_the_sum(tmp_path):
    # the stage after the upload closes as soon as every reachable node answered; the dropped
    # site's upload is in the sum (it uploaded), and the sum is exact
    kits, summary = run_local(tmp_path, enterprises=6, dim=512, schedule=("secagg+",), rounds=2,
                              dropped={5})
    ids = sorted(kits.enterprises)
    assert [r["status"] for r in summary.rounds] == ["done", "done"]
    assert summary.rounds[0]["survivors"] == ids
    assert summary.rounds[0]["gone"] == [ids[5]] and ids[5] not in summary.rounds[0]["reports"]
    assert summary.rounds[1]["survivors"] == ids[:5]  # gone for the rest of the run
    error, survivors = _max_abs_error(kits, "secagg+", 512)
    assert survivors == [6, 5] and error <= 1e-5


def test_secaggplus_sites_are_sent_and_check_their_neighbourhoods_confirmations(tmp_path,
                                                                                monkeypatch):
    # issue 18: a secagg+ site checks k + 1 confirmations, not n, and is sent only those; at
    # n = 10 (k = 8) every site has a non-neighbour, whose confirmation it is not sent
    from secfed.participant.loop import Participant

    checked: dict[str, tuple[frozenset, int]] = {}
    real = Participant.check_peers

    def spy(self, round_number, **kw):
        n = real(self, round_number, **kw)  # raises on a missing, forged or disagreeing one
        checked[self.me] = (kw.get("peers"), n)
        return n

    monkeypatch.setattr(Participant, "check_peers", spy)
    OUTCOMES.clear()
    kits, summary = run_local(tmp_path, enterprises=10, dim=64, schedule=("secagg+",), rounds=1,
                              mods=[_record_outcomes])
    ids = sorted(kits.enterprises)
    assert [r["status"] for r in summary.rounds] == ["done"]
    assert sorted(checked) == ids
    for node, outcome in OUTCOMES:
        me = summary.nodes[node]
        peers, agreeing = checked[me]
        assert me in peers and len(peers) == 9 < len(ids)
        assert set(outcome["confirmations"]) == peers and agreeing == len(peers)


def test_a_node_cannot_claim_another_sites_identity(tmp_path):
    # node 0 rewrites its advert to claim site 1: the signature does not verify, so it is not
    # mapped; site 1's real node is
    def impersonate(message, context, call_next):
        reply = call_next(message, context)
        if int(context.node_config["partition-id"]) == 0 and message.metadata.message_type.endswith("_identity"):
            fields = unpack(reply.content)
            advert = json.loads(bytes(fields["payload"]))
            advert["enterprise"] = "enterprise-0001"
            reply.content = pack(kind="advert", payload=json.dumps(advert).encode())
        return reply

    events: list = []
    kits, summary = run_local(tmp_path, enterprises=3, dim=64, schedule=("secagg",), rounds=1,
                              mods=[impersonate], events=events)
    assert sorted(summary.nodes.values()) == ["enterprise-0001", "enterprise-0002"]
    assert len(summary.refused_adverts) == 1 and "InvalidSignature" in summary.refused_adverts[0]
    # the unmapped site never took part: the round ran (and aborted or finished) without it
    assert "enterprise-0000" not in summary.rounds[0]["reports"]
    assert np.isfinite(summary.round_s[0])


def test_deployment_relay_to_the_sites_own_process(tmp_path):
    # deployment nodes name their kit; the ClientApp relays each message over the kit's Unix
    # socket to the site's long-running participant (secfed flower site), where its secrets live
    kits, summary = run_local(tmp_path, enterprises=3, dim=128, schedule=("secagg+",), rounds=2,
                              agents=True)
    assert [r["status"] for r in summary.rounds] == ["done", "done"]
    error, survivors = _max_abs_error(kits, "secagg+", 128)
    assert survivors == [3, 3] and error <= 1e-5
    for kit in kits.enterprises.values():
        assert not (kit / "flower-agent.sock").exists()  # removed when the federation finished


def test_flwr_run_config_names_the_kits(tmp_path):
    # the example app's ClientApp is built without kits: flwr run's run config names the kits
    # directory and each virtual node takes the kit of its partition-id
    kits, summary = run_local(tmp_path, enterprises=3, dim=64, schedule=("secagg",), rounds=1,
                              by_run_config=True)
    assert summary.rounds[0]["status"] == "done"
    assert summary.rounds[0]["survivors"] == sorted(kits.enterprises)


class _FakeGrid:
    """push/pull like Flower's InMemoryGrid: a reply for each pushed message, ``per_pull`` at a
    time; records how many were outstanding when each push happened."""

    def __init__(self, per_pull: int, silent: frozenset[int] = frozenset()):
        self.per_pull, self.silent = per_pull, silent
        self.stored: dict[str, object] = {}
        self.outstanding_max = 0

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.stored) + len(ids)}-{m.metadata.dst_node_id}"
            ids.append(mid)
            self.stored[mid] = m
        self.outstanding_max = max(self.outstanding_max, sum(1 for _ in self._open()))
        return ids

    def _open(self):
        return [i for i, m in self.stored.items() if m is not None]

    def pull_messages(self, ids):
        from types import SimpleNamespace

        out = []
        for mid in sorted(ids)[: self.per_pull]:
            m = self.stored.get(mid)
            if m is None or m.metadata.dst_node_id in self.silent:
                continue
            self.stored[mid] = None
            out.append(SimpleNamespace(
                metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=m.metadata.dst_node_id),
                has_content=lambda: False))
        return out


def _msgs(n):
    from types import SimpleNamespace

    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=i), content=pack(x=i))
            for i in range(n)]


def test_simulation_grid_keeps_at_most_a_window_in_flight_and_returns_every_reply():
    # Flower's simulation engine scans every stored message for every node every 0.1 s: n
    # messages at once make each step O(n^2) in the ServerApp (issue 18); at most W are stored
    from secfed.flower.simulate import CountingGrid

    fake = _FakeGrid(per_pull=3)
    grid = CountingGrid(fake, window=5)
    replies = grid.send_and_receive(_msgs(40), timeout=30)
    assert sorted(r.metadata.src_node_id for r in replies) == list(range(40))
    assert fake.outstanding_max <= 5 and grid.in_flight_max == 5
    assert set(grid.sent) == set(range(40))


def test_simulation_grid_window_honours_the_step_timeout():
    from secfed.flower.simulate import CountingGrid

    fake = _FakeGrid(per_pull=10, silent=frozenset({7}))  # node 7 never answers
    grid = CountingGrid(fake, window=4)
    replies = grid.send_and_receive(_msgs(12), timeout=0.5)
    got = {r.metadata.src_node_id for r in replies}
    assert 7 not in got and got <= set(range(12)) and len(got) >= 3
