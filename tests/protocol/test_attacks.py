"""Issue 20, items 1 and 4: the two attacks that recovered a victim's exact update, replayed
step by step against the state machines (``/work/shared/attacks/``), plus the exact bound of the
split-view attack the new quorum rule leaves.

* Self-counted quorum (secagg, n=4, t=3, 2 colluders; and n=10, t=7, 6 colluders): the
  coordinator forwards the victim only the colluders' shares and names survivors = colluders ∪
  {victim}; the victim used to count itself toward t and release its self-mask share.
* SecAgg+ graph grinding (n=12, k=2): colluders minted fresh signed adverts until the session-id
  seeded graph made them the victim's only neighbours.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import pytest

from secfed.crypto.aead import binding_ad, open_sealed, seal
from secfed.crypto.encoding import decode
from secfed.crypto.keys import (
    LABEL_PAIRWISE_MASK,
    LABEL_SELF_MASK,
    LABEL_SHARE_ENCRYPTION,
    IdentityKey,
    X25519KeyPair,
    agree,
    derive_key,
)
from secfed.crypto.masking import apply_masks
from secfed.crypto.shamir import Share, combine_shares, split_secret
from secfed.errors import ProtocolAbort, ProtocolError
from secfed.protocol import CoordinatorRound, ParticipantPolicy, ParticipantRound, RoundSpec, Stage
from secfed.protocol.messages import (
    SHARE_KIND_MASK_KEY,
    SHARE_KIND_SELF_MASK,
    AdvertiseKeys,
    CoinReveal,
    ConsistencyRequest,
    ConsistencySignature,
    ForwardedShares,
    KeyRoster,
    MaskedUpload,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    coin_commitment,
    consistency_signed_bytes,
    decode_message,
)
from secfed.protocol.roster import commit_roster
from secfed.protocol.spec import (
    default_neighbours,
    default_threshold,
    graph_seed,
    neighbour_graph,
    session_id,
    tolerated_colluders,
)

D = 8


# -- a colluding enterprise: honest-looking messages from keys the coordinator knows --------------


class Colluder:
    def __init__(self, spec: RoundSpec, me: str, identity: IdentityKey) -> None:
        self.spec, self.me, self.identity = spec, me, identity
        self.cipher, self.mask = X25519KeyPair.generate(), X25519KeyPair.generate()
        self.coin = secrets.token_bytes(32)
        commitment = (
            coin_commitment(spec_digest=spec.digest(), sender=me, coin=self.coin)
            if spec.mode == "secagg+" else b""
        )
        unsigned = AdvertiseKeys(spec.round_number, spec.digest(), me, self.cipher.public_bytes(),
                                 self.mask.public_bytes(), bytes(64), commitment)
        self.advert = AdvertiseKeys(spec.round_number, spec.digest(), me, self.cipher.public_bytes(),
                                    self.mask.public_bytes(), identity.sign(unsigned.signed_bytes()),
                                    commitment)

    def _key(self, other_cipher: bytes, sid: bytes) -> bytes:
        return bytes(derive_key(agree(self.cipher, other_cipher), session_id=sid, purpose=LABEL_SHARE_ENCRYPTION))

    def open_shares(self, sender: str, shares: ShareKeys, sender_cipher: bytes, sid: bytes) -> tuple[Share, Share]:
        """The victim's share pair sealed to this colluder (which it legitimately holds)."""
        ad = binding_ad(session_id=sid, round_number=self.spec.round_number, sender=sender, receiver=self.me)
        plain = open_sealed(self._key(sender_cipher, sid), dict(shares.sealed)[self.me], associated_data=ad)
        return Share.from_bytes(plain[:35]), Share.from_bytes(plain[35:])

    def fake_sealed(self, receiver: str, receiver_cipher: bytes, sid: bytes) -> bytes:
        """A well-formed sealed share pair for ``receiver`` (of a secret nobody needs)."""
        t, n = self.spec.threshold, len(self.spec.participants)
        share = split_secret(b"\0" * 32, threshold=t, n_shares=n)[self.spec.index(receiver)]
        ad = binding_ad(session_id=sid, round_number=self.spec.round_number, sender=self.me, receiver=receiver)
        return seal(self._key(receiver_cipher, sid), share.to_bytes() + share.to_bytes(), associated_data=ad)

    def sign(self, sid: bytes, survivors: tuple[str, ...]) -> bytes:
        return self.identity.sign(consistency_signed_bytes(
            session_id=sid, round_number=self.spec.round_number, survivors=survivors))


def _setup(n: int, t: int, colluders: int, mode: str = "secagg",
           policy: ParticipantPolicy | None = None, **kw):
    """Honest parties (real state machines) and colluders; returns after the share stage."""
    ids = [f"org-{i}" for i in range(n)]
    spec = RoundSpec.create(federation="f", round_number=1, mode=mode, participants=ids,
                            vector_length=D, threshold=t, **kw)
    idk = {p: IdentityKey.generate() for p in ids}
    roster = {p: k.public_bytes() for p, k in idk.items()}
    bad = ids[n - colluders:]
    honest = {p: ParticipantRound(spec, me=p, identity=idk[p], roster=roster,
                                  policy=policy or ParticipantPolicy())
              for p in ids if p not in bad}
    rng = np.random.default_rng(7)
    updates = {p: rng.standard_normal(D).astype(np.float32) for p in honest}
    for p, r in honest.items():
        r.set_update(updates[p])
    adverts = {p: AdvertiseKeys.from_bytes(r.start()) for p, r in honest.items()}
    coll = {c: Colluder(spec, c, idk[c]) for c in bad}
    adverts.update({c: k.advert for c, k in coll.items()})
    roster_msg = KeyRoster(1, tuple(adverts[p] for p in ids)).to_bytes()
    shares = {p: ShareKeys.from_bytes(r.handle(Stage.SHARE, roster_msg)) for p, r in honest.items()}
    sid = honest[ids[0]].session_id
    return spec, ids, honest, coll, adverts, shares, sid, updates


def _forward(spec, honest, coll, adverts, shares, sid, receiver, senders) -> bytes:
    items = []
    for s in senders:
        if s in coll:
            items.append((s, coll[s].fake_sealed(receiver, adverts[receiver].cipher_key, sid)))
        else:
            items.append((s, dict(shares[s].sealed)[receiver]))
    return ForwardedShares(1, sid, receiver, tuple(items)).to_bytes()


# -- item 4: the self-counted quorum ---------------------------------------------------------------


@pytest.mark.parametrize("n, t, c", [(4, 3, 2), (10, 7, 6)])
def test_self_counted_quorum_victim_refuses_before_anything_leaves(n: int, t: int, c: int) -> None:
    spec, ids, honest, coll, adverts, shares, sid, _ = _setup(n, t, c)
    victim = ids[0]
    # The colluders hold c = t - 1 shares of the victim's seeds: one short.
    held = [coll[k].open_shares(victim, shares[victim], adverts[victim].cipher_key, sid)[0] for k in coll]
    assert len(held) == t - 1
    # The coordinator forwards the victim only the colluders' shares ...
    fwd = _forward(spec, honest, coll, adverts, shares, sid, victim, sorted(coll, key=spec.index))
    with pytest.raises(ProtocolAbort, match=rf"{c} share holders besides this enterprise remain, below the threshold {t}"):
        honest[victim].handle(Stage.UPLOAD, fwd)
    # ... and the victim uploads nothing, forgets its seeds and answers nothing more: the script's
    # next steps (survivors = colluders + victim, signatures, unmask request) get no reply.
    assert honest[victim].stage is Stage.ABORTED
    assert honest[victim]._self_seed is None and honest[victim]._held == {}
    survivors = tuple(sorted((victim, *coll), key=spec.index))
    with pytest.raises(ProtocolError):
        honest[victim].handle(Stage.CONSISTENCY, ConsistencyRequest(1, sid, survivors).to_bytes())


def test_self_counted_quorum_survivor_set_of_colluders_refused() -> None:
    # The victim did see an honest party's shares, but the coordinator leaves it out of the set.
    spec, ids, honest, coll, adverts, shares, sid, _ = _setup(4, 3, 2)
    victim, h = ids[0], ids[1]
    fwd = _forward(spec, honest, coll, adverts, shares, sid, victim, [h, *coll])
    MaskedUpload.from_bytes(honest[victim].handle(Stage.UPLOAD, fwd))
    survivors = (victim, *coll)
    with pytest.raises(ProtocolAbort, match="names 2 share holders besides this enterprise, below the threshold 3"):
        honest[victim].handle(Stage.CONSISTENCY, ConsistencyRequest(1, sid, survivors).to_bytes())
    assert honest[victim]._self_seed is None


@pytest.mark.parametrize("own", [True, False])
def test_self_counted_signature_refused(own: bool) -> None:
    # Full survivor set, but only the colluders' signatures (plus, the old way, the victim's own).
    spec, ids, honest, coll, adverts, shares, sid, _ = _setup(4, 3, 2)
    victim, h = ids[0], ids[1]
    fwd = _forward(spec, honest, coll, adverts, shares, sid, victim, [h, *coll])
    honest[victim].handle(Stage.UPLOAD, fwd)
    survivors = tuple(ids)
    mine = ConsistencySignature.from_bytes(
        honest[victim].handle(Stage.CONSISTENCY, ConsistencyRequest(1, sid, survivors).to_bytes()))
    sigs = ((victim, mine.signature),) if own else ()
    sigs += tuple((k, coll[k].sign(sid, survivors)) for k in coll)
    req = UnmaskRequest(1, sid, survivors, sigs, (victim,), ()).to_bytes()
    match = "own never counts" if own else "2 valid consistency signatures from share holders besides"
    with pytest.raises(ProtocolAbort, match=match):
        honest[victim].handle(Stage.UNMASK, req)
    assert honest[victim]._held == {}


# -- the split view: the bound tolerated_colluders states is exact --------------------------------


def _split_view(n: int, t: int, c: int, h1_size: int):
    """The coordinator shows H1 (victim + h1_size-1 honest) a set with the victim, the other
    honest parties a set without it, and asks H1 for the victim's self-mask shares and the rest
    for its mask-key shares. Returns (released shares by kind, refusals, the victim's update
    as recovered or None)."""
    # t = 3 of 6 is below the default 2/3 floor (4): a site that lowered its floor to 1/2
    spec, ids, honest, coll, adverts, shares, sid, updates = _setup(
        n, t, c, policy=ParticipantPolicy(min_threshold_fraction=0.5))
    victim = ids[0]
    hon = [p for p in ids if p in honest]
    uploads = {}
    for p in hon:
        fwd = _forward(spec, honest, coll, adverts, shares, sid, p, [s for s in ids if s != p])
        uploads[p] = MaskedUpload.from_bytes(honest[p].handle(Stage.UPLOAD, fwd))
    h1, h2 = hon[:h1_size], hon[h1_size:]
    s1 = tuple(p for p in ids if p in h1 or p in coll)
    s2 = tuple(p for p in ids if p in h2 or p in coll)
    sig: dict[str, tuple[tuple[str, bytes], ...]] = {}
    refusals = []
    for group, s in ((h1, s1), (h2, s2)):
        got = {}
        for p in group:
            try:
                reply = honest[p].handle(Stage.CONSISTENCY, ConsistencyRequest(1, sid, s).to_bytes())
            except ProtocolAbort as exc:
                refusals.append(str(exc))
                continue
            got[p] = ConsistencySignature.from_bytes(reply).signature
        got.update({k: coll[k].sign(sid, s) for k in coll})
        for p in group:
            if p in got:
                sig[p] = tuple((q, got[q]) for q in s if q != p and q in got)
    released: dict[int, list[Share]] = {SHARE_KIND_SELF_MASK: [], SHARE_KIND_MASK_KEY: []}
    for group, s, ask in ((h1, s1, "self"), (h2, s2, "key")):
        for p in group:
            if p not in sig:
                continue
            req = UnmaskRequest(1, sid, s, sig[p], (victim,) if ask == "self" else (),
                                (victim,) if ask == "key" else ())
            try:
                resp = UnmaskResponse.from_bytes(honest[p].handle(Stage.UNMASK, req.to_bytes()))
            except ProtocolAbort as exc:
                refusals.append(str(exc))
                continue
            for _o, kind, raw in resp.shares:
                released[kind].append(Share.from_bytes(raw))
    # The colluders add the shares of the victim they hold.
    for k in coll:
        b, s = coll[k].open_shares(victim, shares[victim], adverts[victim].cipher_key, sid)
        released[SHARE_KIND_SELF_MASK].append(b)
        released[SHARE_KIND_MASK_KEY].append(s)
    if min(len(v) for v in released.values()) < t:
        return released, refusals, None
    b_v = combine_shares(released[SHARE_KIND_SELF_MASK][:t], threshold=t)
    s_v = X25519KeyPair.from_private_bytes(combine_shares(released[SHARE_KIND_MASK_KEY][:t], threshold=t))
    y = np.frombuffer(uploads[victim].vector, dtype="<u8").astype(np.uint64)
    masks = [(derive_key(b_v, session_id=sid, purpose=LABEL_SELF_MASK), -1)]
    for q in ids[1:]:
        seed = derive_key(agree(s_v, adverts[q].mask_key), session_id=sid, purpose=LABEL_PAIRWISE_MASK)
        masks.append((seed, -1))  # the victim is first in spec order: it added +PRG for each peer
    apply_masks(y, masks)
    return released, refusals, float(np.max(np.abs(decode(y, scale_bits=spec.scale_bits) - updates[victim])))


def test_tolerated_colluders_formula() -> None:
    assert tolerated_colluders(3, 2) == 1  # the 3-enterprise demo: one colluder
    assert tolerated_colluders(4, 3) == 2 and tolerated_colluders(4, 2) == 1
    assert tolerated_colluders(6, 3) == 1
    assert tolerated_colluders(10, 7) == 5 and tolerated_colluders(10, 6) == 3
    assert tolerated_colluders(30, default_threshold(30)) == 11
    assert tolerated_colluders(9, 3) < 0  # a coordinator alone could split these views
    # The default threshold never leaves the coordinator alone a split, for any n >= 3.
    assert all(tolerated_colluders(n, default_threshold(n)) >= 1 for n in range(3, 400))
    # Brute force over group sizes: a split exists iff c >= 2t + 2 - n (for c <= t - 1).
    for n in range(3, 16):
        for t in range(2, n):
            for c in range(0, t):
                split = any(a - 1 + c >= t and b - 1 + c >= t
                            for a in range(1, n - c) for b in range(1, n - c - a + 1))
                assert split == (c > tolerated_colluders(n, t)), (n, t, c)


@pytest.mark.parametrize("n, t, c, h1_size", [(6, 3, 1, 2), (6, 3, 1, 3), (10, 7, 5, 2), (10, 7, 5, 3)])
def test_split_view_within_the_bound_releases_no_pair(n: int, t: int, c: int, h1_size: int) -> None:
    # c = tolerated_colluders(n, t): one group always lacks t signatures from others.
    assert c == tolerated_colluders(n, t)
    released, refusals, recovered = _split_view(n, t, c, h1_size)
    assert recovered is None and refusals
    assert all(f"below the threshold {t}" in r for r in refusals)
    assert min(len(v) for v in released.values()) < t


@pytest.mark.parametrize("n, t, c", [(6, 3, 2), (10, 7, 6)])
def test_split_view_one_colluder_beyond_the_bound_recovers_the_victim(n: int, t: int, c: int) -> None:
    # The bound is exact: one colluder more than tolerated_colluders(n, t) and the split works
    # (n=10, t=7: the 6 colluders still win this way, though no longer by self-count).
    assert c == tolerated_colluders(n, t) + 1
    released, refusals, err = _split_view(n, t, c, 2)
    assert refusals == [] and err is not None and err < 1e-6


# -- item 1: SecAgg+ graph grinding ----------------------------------------------------------------


N_PLUS = 12
VICTIM, BAD = "org-0", ("org-5", "org-9")
# The attack's k = 2 is below the default floor (default_neighbours(12) = 10); a federation that
# pinned k = 2 lowers the floor explicitly, which is the setting the grinding attack needs.
K2 = ParticipantPolicy(min_neighbours=2)


def _plus_spec(**kw) -> RoundSpec:
    return RoundSpec.create(federation="f", round_number=7, mode="secagg+",
                            participants=[f"org-{i}" for i in range(N_PLUS)], vector_length=16,
                            neighbours=2, **kw)


def test_grinding_attack_spec_is_refused() -> None:
    # The attack announced k=2 with t=3 (the neighbourhood size): a victim could then only ever
    # complete by counting itself. Now t must be <= k, and a site refuses before any key exists.
    ids = [f"org-{i}" for i in range(N_PLUS)]
    spec = RoundSpec("f", 7, "secagg+", tuple(ids), 3, 16, neighbours=2, min_participants=9)
    idk = IdentityKey.generate()
    roster = {p: IdentityKey.generate().public_bytes() for p in ids} | {VICTIM: idk.public_bytes()}
    party = ParticipantRound(spec, me=VICTIM, identity=idk, roster=roster, policy=ParticipantPolicy())
    with pytest.raises(ProtocolAbort, match=r"threshold must be in \[2, 2\]") as info:
        party.start()
    assert info.value.stage == "advertise" and party._mask_keys is None


def _grind(max_tries: int = 3000):
    """The script's loop: mint fresh colluder adverts until the graph the coordinator can compute
    from what it holds (every advert) makes the colluders the victim's only neighbours."""
    spec = _plus_spec()
    ids = list(spec.participants)
    idk = {p: IdentityKey.generate() for p in ids}
    roster = {p: k.public_bytes() for p, k in idk.items()}
    rng = np.random.default_rng(1)
    upd = {p: rng.standard_normal(16).astype(np.float32) for p in ids}

    def mk(p: str) -> ParticipantRound:
        r = ParticipantRound(spec, me=p, identity=idk[p], roster=roster, policy=K2)
        r.set_update(upd[p])
        return r

    parties = {p: mk(p) for p in ids if p not in BAD}
    adv = {p: parties[p].start() for p in parties}
    for tries in range(1, max_tries + 1):
        for c in BAD:
            parties[c] = mk(c)
            adv[c] = parties[c].start()
        ads = [decode_message(adv[p]) for p in ids]
        predicted = neighbour_graph(spec, session_id(spec, [(a.sender, roster[a.sender], a.cipher_key, a.mask_key) for a in ads]))
        if predicted[VICTIM] == frozenset(BAD):
            return spec, roster, parties, adv, predicted, tries
    raise AssertionError("grinding never hit (p = 1/55 per try)")


def test_grinding_does_not_choose_the_graph() -> None:
    spec, roster, parties, adv, predicted, _tries = _grind()
    coord = CoordinatorRound(spec, roster=roster)
    for p in spec.participants:
        coord.receive(p, adv[p])
    while coord.stage not in (Stage.DONE, Stage.ABORTED):
        out = coord.close_stage()
        st = coord.stage
        for p, pl in out.items():
            rep = parties[p].handle(st, pl)
            if rep is not None:
                coord.receive(p, rep)
    # The round completes, but on a graph the grinder could not compute when it chose the
    # adverts: it depends on every party's coin, revealed only after the adverts were fixed.
    # (Two random 12-node Harary graphs coincide with probability about 5e-8.)
    real = {p: parties[p]._holders - {p} for p in spec.participants}
    assert real != predicted
    coins = [decode_message(b).coin for s, _p, b in coord.records if s == "reveal"]
    assert len(coins) == N_PLUS
    assert real == neighbour_graph(spec, graph_seed(coord.session_id, coins))


def test_victim_neighbourhood_is_fixed_once_it_revealed() -> None:
    spec = _plus_spec()
    ids = list(spec.participants)
    idk = {p: IdentityKey.generate() for p in ids}
    roster = {p: k.public_bytes() for p, k in idk.items()}
    victim = ParticipantRound(spec, me=VICTIM, identity=idk[VICTIM], roster=roster, policy=K2)
    victim.set_update(np.zeros(16, np.float32))
    adverts = {VICTIM: AdvertiseKeys.from_bytes(victim.start())}
    coll = {p: Colluder(spec, p, idk[p]) for p in ids if p != VICTIM}
    adverts.update({p: c.advert for p, c in coll.items()})
    roster_msg = commit_roster(spec, {p: adverts[p] for p in ids}, roster).commitment_for(VICTIM).to_bytes()
    reveal = CoinReveal.from_bytes(victim.handle(Stage.REVEAL, roster_msg))
    assert victim.stage is Stage.SHARE
    assert reveal.session_id == victim.session_id and reveal.sender == VICTIM
    # The coordinator now knows every coin; grinding would need new colluder adverts. The victim
    # takes no second key roster (its neighbourhood was fixed by the first) ...
    fresh = {p: Colluder(spec, p, idk[p]) for p in BAD}
    again = commit_roster(spec, {p: fresh[p].advert if p in fresh else adverts[p] for p in ids}, roster)
    with pytest.raises(ProtocolAbort, match="message must be NeighbourRoster"):
        victim.handle(Stage.SHARE, again.commitment_for(VICTIM).to_bytes())
    assert victim.stage is Stage.ABORTED and victim._self_seed is None


@pytest.mark.parametrize("lie", ["changed-coin", "withheld", "own-coin"])
def test_coin_roster_lies_abort_before_any_share(lie: str) -> None:
    spec = _plus_spec()
    ids = list(spec.participants)
    idk = {p: IdentityKey.generate() for p in ids}
    roster = {p: k.public_bytes() for p, k in idk.items()}
    victim = ParticipantRound(spec, me=VICTIM, identity=idk[VICTIM], roster=roster, policy=K2)
    victim.set_update(np.zeros(16, np.float32))
    adverts = {VICTIM: AdvertiseKeys.from_bytes(victim.start())}
    coll = {p: Colluder(spec, p, idk[p]) for p in ids if p != VICTIM}
    adverts.update({p: c.advert for p, c in coll.items()})
    committed = commit_roster(spec, {p: adverts[p] for p in ids}, roster)
    reveal = CoinReveal.from_bytes(victim.handle(Stage.REVEAL, committed.commitment_for(VICTIM).to_bytes()))
    coins = {p: c.coin for p, c in coll.items()} | {VICTIM: reveal.coin}
    if lie == "changed-coin":  # a colluder wants another coin after its commitment
        coins[BAD[0]] = Colluder(spec, BAD[0], idk[BAD[0]]).coin
        match = "does not match the commitment"
    elif lie == "withheld":  # a colluder withholds its reveal; the coordinator drops it
        del coins[BAD[0]]
        match = "withheld reveal aborts the round"
    else:
        coins[VICTIM] = bytes(32)
        match = "does not match the commitment"
    listed = tuple(coins[p] for p in ids if p in coins)
    graph = neighbour_graph(spec, graph_seed(reveal.session_id, listed))
    msg = committed.neighbours_for(VICTIM, listed, graph[VICTIM]).to_bytes()
    with pytest.raises(ProtocolAbort, match=match) as info:
        victim.handle(Stage.SHARE, msg)
    assert info.value.stage == "share" and victim._self_seed is None and victim._held == {}


def test_coordinator_refuses_a_changed_coin_and_aborts_on_a_withheld_one() -> None:
    spec = _plus_spec()
    ids = list(spec.participants)
    idk = {p: IdentityKey.generate() for p in ids}
    roster = {p: k.public_bytes() for p, k in idk.items()}
    coll = {p: Colluder(spec, p, idk[p]) for p in ids}
    coord = CoordinatorRound(spec, roster=roster)
    for p in ids:
        coord.receive(p, coll[p].advert.to_bytes())
    coord.close_stage()
    assert coord.stage is Stage.REVEAL
    sid = coord.session_id
    other = Colluder(spec, BAD[0], idk[BAD[0]]).coin
    with pytest.raises(ProtocolError, match="does not match the commitment"):
        coord.receive(BAD[0], CoinReveal(7, sid, BAD[0], other).to_bytes())
    for p in ids:
        if p != BAD[0]:
            coord.receive(p, CoinReveal(7, sid, p, coll[p].coin).to_bytes())
    # Never "exclude" the silent party: with c colluders that would offer 2^c graphs to pick from.
    with pytest.raises(ProtocolAbort, match="did not reveal their graph coin") as info:
        coord.close_stage()
    assert info.value.stage == "reveal" and coord.stage is Stage.ABORTED


def test_withheld_reveal_aborts_the_simulated_round() -> None:
    from secfed.protocol import simulate

    updates = [np.ones(8, np.float32) * i for i in range(10)]
    with pytest.raises(ProtocolAbort, match="did not reveal") as info:
        simulate(updates, mode="secagg+", dropouts={"reveal": [4]})
    assert info.value.stage == "reveal"


def test_coordinator_replay_covers_the_reveal_stage() -> None:
    from .harness import make_harness, make_updates, plain_sum

    h = make_harness(n=8, d=20, mode="secagg+")
    h.advertise()
    h.step()  # key roster -> coin reveals
    assert h.coord.stage is Stage.REVEAL
    mid_reveal = CoordinatorRound.replay(h.spec, roster=h.roster, records=h.coord.records)
    assert mid_reveal.stage is Stage.REVEAL and mid_reveal.received() == h.coord.received()
    h.step()  # coin roster -> shares
    rebuilt = CoordinatorRound.replay(h.spec, roster=h.roster, records=h.coord.records)
    assert rebuilt.stage is Stage.SHARE and rebuilt._graph == h.coord._graph
    h.coord = rebuilt
    while h.coord.stage is not Stage.DONE:
        h.step()
    res = h.coord.result()
    assert np.max(np.abs(res.aggregate - plain_sum(make_updates(8, 20, seed=0), range(8)))) < 1e-6


def test_residual_random_graph_probability() -> None:
    # What aborting and retrying buys a coordinator now: each attempt is a fresh random graph.
    # n=12, k=2: the victim's 2 neighbours are a uniform pair of the 11 others -> 1/55.
    assert math.comb(11, 2) == 55
    spec = _plus_spec()
    rng = np.random.default_rng(3)
    hits = sum(neighbour_graph(spec, rng.bytes(32))[VICTIM] == frozenset(BAD) for _ in range(11000))
    assert 130 < hits < 270  # 200 expected
    # n=30 defaults (k=20, t=14): all 14 colluders among the victim's 20 of 29 neighbours.
    assert (default_neighbours(30), default_threshold(21)) == (20, 14)
    p = math.comb(15, 6) / math.comb(29, 20)
    assert 4.9e-4 < p < 5.1e-4
