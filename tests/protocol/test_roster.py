"""The committed SecAgg+ key roster (issue 18): each party gets the roster's Merkle commitment
and only its neighbours' adverts, each checked against the commitment the session id binds."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import secfed.protocol.participant as participant_module
from secfed.crypto.keys import IdentityKey, X25519KeyPair
from secfed.errors import ProtocolAbort, ProtocolError
from secfed.protocol import ParticipantPolicy, ParticipantRound, RoundSpec, Stage
from secfed.protocol.messages import (
    AdvertiseKeys,
    CoinReveal,
    NeighbourRoster,
    RosterCommitment,
    decode_message,
)
from secfed.protocol.roster import (
    commit_roster,
    members_bitmap,
    members_from_bitmap,
    merkle_paths,
    merkle_root,
    verify_inclusion,
)
from secfed.protocol.spec import graph_seed, neighbour_graph

from .harness import make_harness, make_updates, plain_sum
from .test_attacks import Colluder

ME = "org-0"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 64, 100])
def test_every_audit_path_verifies_and_nothing_else_does(n: int) -> None:
    leaves = [os.urandom(32) for _ in range(n)]
    root, paths = merkle_paths(leaves)
    assert root == merkle_root(leaves)
    for i, (leaf, path) in enumerate(zip(leaves, paths)):
        assert len(path) <= math.ceil(math.log2(n)) if n > 1 else path == ()
        assert verify_inclusion(leaf, i, n, path, root)
        assert not verify_inclusion(os.urandom(32), i, n, path, root)  # another leaf
        assert not verify_inclusion(leaf, i, n, path, os.urandom(32))  # another root
        if n > 1:
            assert not verify_inclusion(leaf, (i + 1) % n, n, path, root)  # another position
            assert not verify_inclusion(leaf, i, n, path[:-1], root)  # a cut path
            assert not verify_inclusion(leaf, i, n, (os.urandom(32), *path[1:]), root)


def test_bitmap_round_trip_and_refusals() -> None:
    parts = [f"p{i}" for i in range(11)]
    members = ("p0", "p3", "p10")
    bitmap = members_bitmap(parts, members)
    assert len(bitmap) == 2 and members_from_bitmap(parts, bitmap) == members
    with pytest.raises(Exception, match="bitmap must be 2 bytes"):
        members_from_bitmap(parts, bitmap + b"\0")
    with pytest.raises(Exception, match="past the last participant"):
        members_from_bitmap(parts, bytes([bitmap[0], bitmap[1] | 0x01]))


def _round(n: int = 12, k: int = 4):
    """One honest party (``ME``, the real state machine) among colluders whose keys we hold."""
    ids = [f"org-{i}" for i in range(n)]
    spec = RoundSpec.create(federation="f", round_number=7, mode="secagg+", participants=ids,
                            vector_length=16, neighbours=k)
    idk = {p: IdentityKey.generate() for p in ids}
    roster = {p: key.public_bytes() for p, key in idk.items()}
    me = ParticipantRound(spec, me=ME, identity=idk[ME], roster=roster,
                          policy=ParticipantPolicy(min_neighbours=k))
    me.set_update(np.zeros(16, np.float32))
    adverts = {ME: AdvertiseKeys.from_bytes(me.start())}
    coll = {p: Colluder(spec, p, idk[p]) for p in ids if p != ME}
    adverts.update({p: c.advert for p, c in coll.items()})
    committed = commit_roster(spec, {p: adverts[p] for p in ids}, roster)
    return spec, ids, idk, roster, me, coll, adverts, committed


def _reveal(me, committed):
    reveal = CoinReveal.from_bytes(me.handle(Stage.REVEAL, committed.commitment_for(ME).to_bytes()))
    assert reveal.session_id == committed.session_id == me.session_id
    return reveal


def _coins_and_graph(spec, ids, coll, reveal):
    coins = tuple(reveal.coin if p == ME else coll[p].coin for p in ids)
    return coins, neighbour_graph(spec, graph_seed(reveal.session_id, coins))


def test_honest_neighbour_roster_is_taken_and_only_neighbours_are_verified(monkeypatch) -> None:
    spec, ids, _idk, _roster, me, coll, _adverts, committed = _round()
    reveal = _reveal(me, committed)
    coins, graph = _coins_and_graph(spec, ids, coll, reveal)
    checked: list[bytes] = []
    real = participant_module.verify_signature
    monkeypatch.setattr(participant_module, "verify_signature",
                        lambda key, sig, data: (checked.append(key), real(key, sig, data))[1])
    out = me.handle(Stage.SHARE, committed.neighbours_for(ME, coins, graph[ME]).to_bytes())
    assert out is not None and me.stage is Stage.UPLOAD
    # k signature checks (the neighbours it uses), not n - 1 (issue 18: every advert before)
    assert len(checked) == len(graph[ME]) == spec.neighbours < len(ids) - 1
    assert me._holders == graph[ME] | {ME}


def test_an_advert_not_under_the_committed_root_is_refused() -> None:
    spec, ids, idk, _roster, me, coll, _adverts, committed = _round()
    reveal = _reveal(me, committed)
    coins, graph = _coins_and_graph(spec, ids, coll, reveal)
    msg = committed.neighbours_for(ME, coins, graph[ME])
    # A colluding neighbour signs fresh keys after the roster was committed (its signature is
    # valid): the coordinator hands it to ME with the old advert's audit path.
    victim_adv, path = msg.adverts[0]
    fresh = Colluder(spec, victim_adv.sender, idk[victim_adv.sender]).advert
    fresh = AdvertiseKeys(fresh.round_number, fresh.spec_digest, fresh.sender, fresh.cipher_key,
                          fresh.mask_key, fresh.signature, victim_adv.coin_commitment)
    resigned = AdvertiseKeys(fresh.round_number, fresh.spec_digest, fresh.sender, fresh.cipher_key,
                             fresh.mask_key, idk[fresh.sender].sign(fresh.signed_bytes()),
                             fresh.coin_commitment)
    forged = NeighbourRoster(msg.round_number, msg.session_id, msg.coins,
                             ((resigned, path), *msg.adverts[1:]))
    with pytest.raises(ProtocolAbort, match="not the one under the committed roster") as info:
        me.handle(Stage.SHARE, forged.to_bytes())
    assert info.value.stage == "share" and me._held == {} and me._self_seed is None


@pytest.mark.parametrize("lie", ["missing", "extra", "wrong-commitment"])
def test_the_neighbour_set_and_commitments_are_checked(lie: str) -> None:
    spec, ids, _idk, _roster, me, coll, adverts, committed = _round()
    reveal = _reveal(me, committed)
    coins, graph = _coins_and_graph(spec, ids, coll, reveal)
    msg = committed.neighbours_for(ME, coins, graph[ME])
    if lie == "missing":  # a neighbour left out: ME would count fewer holders
        near, match = msg.adverts[1:], "exactly the adverts"
    elif lie == "extra":  # a non-neighbour's advert slipped in
        other = next(p for p in ids if p != ME and p not in graph[ME])
        near = (*msg.adverts, (adverts[other], committed.paths[other]))
        match = "exactly the adverts"
    else:  # a neighbour's advert re-signed over another commitment
        a, path = msg.adverts[0]
        c = coll[a.sender]
        bad = AdvertiseKeys(a.round_number, a.spec_digest, a.sender, a.cipher_key, a.mask_key,
                            bytes(64), os.urandom(32))
        bad = AdvertiseKeys(a.round_number, a.spec_digest, a.sender, a.cipher_key, a.mask_key,
                            c.identity.sign(bad.signed_bytes()), bad.coin_commitment)
        near, match = ((bad, path), *msg.adverts[1:]), "another coin commitment"
    with pytest.raises(ProtocolAbort, match=match):
        me.handle(Stage.SHARE, NeighbourRoster(msg.round_number, msg.session_id, msg.coins, near).to_bytes())
    assert me._held == {}


def test_own_advert_must_be_under_the_root_before_the_coin_leaves() -> None:
    spec, ids, _idk, roster, me, coll, adverts, _committed = _round()
    swapped = dict(adverts)
    a = adverts[ME]
    # the coordinator commits to other keys under ME's name (it cannot sign them; ME can see)
    swapped[ME] = AdvertiseKeys(a.round_number, a.spec_digest, ME, X25519KeyPair.generate().public_bytes(),
                                a.mask_key, a.signature, a.coin_commitment)
    evil = commit_roster(spec, {p: swapped[p] for p in ids}, roster)
    with pytest.raises(ProtocolAbort, match="own advertisement unchanged") as info:
        me.handle(Stage.REVEAL, evil.commitment_for(ME).to_bytes())
    assert info.value.stage == "reveal" and me._coin is None


def test_two_rosters_never_share_a_session_id() -> None:
    # The coordinator cannot show two parties different rosters under one session id: any
    # change to any member's advert, or to the member set, changes the id they bind to.
    spec, ids, idk, roster, _me, _coll, adverts, committed = _round()
    other = dict(adverts)
    other["org-5"] = Colluder(spec, "org-5", idk["org-5"]).advert
    assert commit_roster(spec, {p: other[p] for p in ids}, roster).session_id != committed.session_id
    fewer = {p: adverts[p] for p in ids if p != "org-7"}
    assert commit_roster(spec, fewer, roster).session_id != committed.session_id


def test_coordinator_refuses_a_reveal_bound_to_another_roster() -> None:
    h = make_harness(n=10, d=8, mode="secagg+")
    h.advertise()
    out = h.coord.close_stage()
    p = h.ids[1]
    reveal = CoinReveal.from_bytes(h.parties[p].handle(Stage.REVEAL, out[p]))
    with pytest.raises(ProtocolError, match="session_id does not match"):
        h.coord.receive(p, CoinReveal(reveal.round_number, os.urandom(32), p, reveal.coin).to_bytes())


@pytest.mark.parametrize("n", [16, 64])
def test_per_party_roster_bytes_are_logarithmic_not_linear(n: int) -> None:
    """The reveal stage's input is O(log n) (+ one bit per participant); the share stage's is
    one 32-byte coin per member + k adverts with O(log n) paths: both far below the n adverts
    (~170 bytes each) every party received before."""
    h = make_harness(n=n, d=8, mode="secagg+")
    h.advertise()
    reveal_in = h.step()
    share_in = h.step()
    k, depth = h.spec.neighbours, math.ceil(math.log2(n))
    advert_bytes = max(len(m) for st, _p, m in h.sent if st == "advertise") - 10  # without header
    for p in h.ids:
        assert isinstance(decode_message(reveal_in[p]), RosterCommitment)
        assert len(reveal_in[p]) <= 10 + 4 + n // 8 + 1 + 64 + 1 + 32 * depth
        msg = decode_message(share_in[p])
        assert isinstance(msg, NeighbourRoster) and len(msg.adverts) == k
        assert len(share_in[p]) <= 10 + 32 + 4 + 32 * n + 4 + k * (advert_bytes + 1 + 32 * depth)
        # the old per-party roster: every advert (KeyRoster) and every (id, coin) (CoinRoster)
        old = n * advert_bytes + n * (32 + 7)
        if n >= 64:  # at n = 16, k = 14: nearly everyone is a neighbour
            assert len(reveal_in[p]) + len(share_in[p]) < old
    while h.coord.stage not in (Stage.DONE, Stage.ABORTED):
        h.step()
    got = h.parties[h.ids[0]].result()
    want = plain_sum(make_updates(n, 8), range(n))
    assert np.max(np.abs(got.aggregate - want)) < 1e-4


def test_each_party_and_the_coordinator_agree_on_its_neighbourhood() -> None:
    """The confirmations a secagg+ site checks after the round (issue 18: k + 1, not n) are
    those of the same neighbourhood on both sides: the coordinator sends exactly what the site
    will check, computed from the same committed graph; secagg keeps everyone."""
    h = make_harness(n=30, d=8, mode="secagg+")
    assert all(h.parties[p].neighbourhood is None for p in h.ids)  # no graph before the coins
    h.run()
    assert h.coord.stage is Stage.DONE
    for p in h.ids:
        near = h.parties[p].neighbourhood
        assert near is not None and p in near and len(near) == h.spec.neighbours + 1 < len(h.ids)
        assert h.coord.neighbourhood(p) == near
        assert all(p in h.parties[q].neighbourhood for q in near)  # the relation is symmetric
    full = make_harness(n=5, d=8, mode="secagg")
    full.run()
    assert full.parties["org-0"].neighbourhood is None and full.coord.neighbourhood("org-0") is None
