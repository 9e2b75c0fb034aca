"""A malicious coordinator: every attack ends in a typed abort before any secret leaves."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from secfed.crypto.encoding import decode, encode
from secfed.errors import InvalidSignature, ProtocolAbort, ProtocolError, SecfedError
from secfed.protocol import CoordinatorRound, ParticipantRound, Stage, simulate
from secfed.protocol.messages import (
    ConsistencyRequest,
    ForwardedShares,
    MaskedAggregate,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
)

from .harness import make_harness, make_updates

UPDATES = make_updates(10, 32, seed=21)


def _attack(name: str, mode: str = "secagg"):
    """Run the attack; any typed error ends it (callers check what was released *first*, then
    that it was the participants' ProtocolAbort)."""
    sent: list = []
    with pytest.raises(SecfedError) as info:
        simulate(UPDATES, mode=mode, adversary=name, transcript=sent)
    kinds = [(stage, i, kind) for stage, i, kind, _ in sent]
    return info.value, kinds


def _released_shares(kinds) -> list:
    return [k for k in kinds if k[2] == "UnmaskResponse"]


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_request_both_shares(mode: str) -> None:
    # The property, not the message: every holder is asked for the mask-key share of a survivor
    # whose self-mask share it is also asked for; the round ends at unmask and no holder
    # releases any share, so the coordinator never holds both kinds of any owner. (Which check
    # fires -- "both shares" or "mask-key shares of survivors" -- does not matter.)
    sent: list = []
    with pytest.raises(SecfedError) as info:
        simulate(UPDATES, mode=mode, adversary="request-both-shares", transcript=sent)
    released = [payload for _stage, _i, kind, payload in sent if kind == "UnmaskResponse"]
    assert released == []
    assert isinstance(info.value, ProtocolAbort) and info.value.stage == "unmask"


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_inconsistent_survivors(mode: str) -> None:
    exc, kinds = _attack("inconsistent-survivors", mode)
    assert _released_shares(kinds) == []
    assert isinstance(exc, ProtocolAbort)
    assert exc.stage == "unmask" and "consistency signatures" in str(exc)


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_substitute_key(mode: str) -> None:
    sent: list = []
    with pytest.raises(SecfedError) as info:
        simulate(UPDATES, mode=mode, adversary="substitute-key", transcript=sent)
    # No one sealed a share to the victim under the coordinator's substituted key; in secagg+
    # parties that are not the victim's neighbours never use its key at all.
    victim = "enterprise-0000"
    for _stage, i, kind, payload in sent:
        if kind == "ShareKeys" and i != 0:
            assert victim not in {receiver for receiver, _ in decode_message(payload).sealed}
            assert mode == "secagg+"
    assert [k for k in sent if k[2] == "UnmaskResponse"] == []
    exc = info.value
    # secagg checks the key roster before its shares; secagg+ sends the victim's advert only to
    # its neighbours, with the coins that fix the graph, and each checks it before its shares
    # (issue 18: the committed roster): both stage share.
    assert isinstance(exc, ProtocolAbort) and exc.stage == "share"
    if mode == "secagg":
        assert {i for _s, i, kind, _p in sent if kind == "CoinReveal"} <= {0}
    else:
        # every neighbour of the victim (shown the substituted key) refused before any share left it
        own = [decode_message(p) for _s, i, kind, p in sent if kind == "ShareKeys" and i == 0]
        neighbours = {r for m in own for r, _ in m.sealed}
        senders = {f"enterprise-{i:04d}" for _s, i, kind, _p in sent if kind == "ShareKeys"}
        assert neighbours and not neighbours & senders
    assert isinstance(exc.__cause__, ProtocolAbort)
    assert isinstance(exc.__cause__.__cause__, InvalidSignature)


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_below_threshold(mode: str) -> None:
    exc, kinds = _attack("below-threshold", mode)
    assert [k for k in kinds if k[2] in ("ConsistencySignature", "UnmaskResponse")] == []
    assert isinstance(exc, ProtocolAbort)
    # default t = floor(2 * 9 / 3) = 6 (secagg+: of a 9-party neighbourhood; secagg: n = 10)
    assert exc.stage == "consistency" and "below the threshold 6" in str(exc)


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_replay_previous_round(mode: str) -> None:
    exc, kinds = _attack("replay-previous-round", mode)
    assert [k for k in kinds if k[2] != "AdvertiseKeys"] == []
    assert isinstance(exc, ProtocolAbort)
    # secagg+ checks the key roster in stage reveal, before its coin leaves
    assert exc.stage == ("reveal" if mode == "secagg+" else "share") and "another round" in str(exc)


# -- the participant's unmask rules, one by one, on a hand-driven round ---------------------------


def _to_unmask(n: int = 5, drop_upload=()):
    h = make_harness(n=n, d=16)
    h.advertise()
    h.step()  # key roster -> shares
    h.step(skip=drop_upload)  # forwarded shares -> uploads
    h.step()  # consistency request -> signatures
    requests = h.coord.close_stage()  # unmask requests (not delivered yet)
    assert h.coord.stage is Stage.UNMASK
    return h, {p: decode_message(b) for p, b in requests.items()}


def _forge(req: UnmaskRequest, **changes) -> bytes:
    fields = dict(
        round_number=req.round_number, session_id=req.session_id, survivors=req.survivors,
        signatures=req.signatures, self_mask_of=req.self_mask_of, mask_key_of=req.mask_key_of,
    )
    fields.update(changes)
    return UnmaskRequest(**fields).to_bytes()


def test_participant_refuses_both_shares_of_a_dropout() -> None:
    h, reqs = _to_unmask(drop_upload=("org-4",))
    req = reqs["org-0"]
    assert req.mask_key_of == ("org-4",)
    with pytest.raises(ProtocolAbort, match="both shares"):
        h.parties["org-0"].handle("unmask", _forge(req, self_mask_of=(*req.self_mask_of, "org-4")))


def test_participant_refuses_a_survivor_set_differing_from_the_signed_one() -> None:
    h, reqs = _to_unmask()
    req = reqs["org-1"]
    with pytest.raises(ProtocolAbort, match="differs from the set"):
        h.parties["org-1"].handle("unmask", _forge(req, survivors=req.survivors[:-1]))


def test_participant_refuses_too_few_signatures() -> None:
    h, reqs = _to_unmask()
    req = reqs["org-2"]
    t = h.spec.threshold
    with pytest.raises(ProtocolAbort, match="valid consistency signatures"):
        h.parties["org-2"].handle("unmask", _forge(req, signatures=req.signatures[: t - 1]))


def test_participant_refuses_a_forged_signature() -> None:
    h, reqs = _to_unmask()
    req = reqs["org-2"]
    signer, sig = req.signatures[0]
    bad = ((signer, bytes([sig[0] ^ 1]) + sig[1:]),) + req.signatures[1:]
    with pytest.raises(ProtocolAbort):
        h.parties["org-2"].handle("unmask", _forge(req, signatures=bad))


def test_participant_refuses_to_sign_fewer_than_t_survivors() -> None:
    h = make_harness(n=5, d=16)
    h.advertise()
    h.step()
    h.step()
    out = h.coord.close_stage()
    req = decode_message(out["org-0"])
    assert isinstance(req, ConsistencyRequest)
    few = ConsistencyRequest(req.round_number, req.session_id, req.survivors[: h.spec.threshold - 1])
    with pytest.raises(ProtocolAbort, match="below the threshold"):
        h.parties["org-0"].handle("consistency", few.to_bytes())


def test_participant_answers_unmask_once_and_forgets_secrets() -> None:
    h, reqs = _to_unmask()
    party = h.parties["org-3"]
    reply = party.handle("unmask", reqs["org-3"].to_bytes())
    assert reply is not None
    assert party._self_seed is None and party._mask_keys is None and party._held == {}
    with pytest.raises(ProtocolAbort):
        party.handle("unmask", reqs["org-3"].to_bytes())


def test_tampered_sealed_share_aborts() -> None:
    h = make_harness(n=4, d=8)
    h.advertise()
    h.step()
    out = h.coord.close_stage()
    fwd = decode_message(out["org-1"])
    assert isinstance(fwd, ForwardedShares)
    sender, blob = fwd.sealed[0]
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    bad = ForwardedShares(fwd.round_number, fwd.session_id, fwd.receiver, ((sender, flipped),) + fwd.sealed[1:])
    with pytest.raises(ProtocolAbort, match="DecryptionError"):
        h.parties["org-1"].handle("upload", bad.to_bytes())


def test_share_redirected_to_another_receiver_aborts() -> None:
    h = make_harness(n=4, d=8)
    h.advertise()
    h.step()
    out = h.coord.close_stage()
    fwd1, fwd2 = decode_message(out["org-1"]), decode_message(out["org-2"])
    # the share org-0 sealed for org-2, delivered to org-1: AD binds the receiver
    stolen = dict(fwd2.sealed)["org-0"]
    sealed = tuple((s, stolen if s == "org-0" else b) for s, b in fwd1.sealed)
    bad = ForwardedShares(fwd1.round_number, fwd1.session_id, "org-1", sealed)
    with pytest.raises(ProtocolAbort, match="DecryptionError"):
        h.parties["org-1"].handle("upload", bad.to_bytes())


def test_coordinator_refuses_previous_round_messages() -> None:
    old = make_harness(n=3, d=8, round_number=4)
    old.run()
    # Round 5 with the same enterprises and identities.
    new = make_harness(n=3, d=8, round_number=5)
    new.identities = old.identities
    new.coord = CoordinatorRound(new.spec, roster=old.roster)
    for p, k in zip(new.ids, old.identities):
        new.parties[p] = ParticipantRound(new.spec, me=p, identity=k, roster=old.roster)
        new.parties[p].set_update(make_updates(1, 8)[0])
    old_advert = next(b for stage, p, b in old.sent if stage == "advertise" and p == "org-0")
    with pytest.raises(ProtocolError, match="another round"):
        new.coord.receive("org-0", old_advert)
    assert new.coord.records == []
    new.advertise()
    new.step()
    new.step(skip=("org-0",))  # org-0 has not uploaded in round 5 yet
    old_upload = next(b for stage, p, b in old.sent if stage == "upload" and p == "org-0")
    before = list(new.coord.records)
    with pytest.raises(ProtocolError, match="another round"):
        new.coord.receive("org-0", old_upload)
    assert new.coord.records == before


def test_wrong_share_from_a_holder_aborts_instead_of_corrupting_the_sum() -> None:
    from secfed.crypto.shamir import PRIME, Share

    h, reqs = _to_unmask()
    replies = {p: h.parties[p].handle("unmask", reqs[p].to_bytes()) for p in reqs}
    bad = decode_message(replies["org-0"])
    assert isinstance(bad, UnmaskResponse)
    owner, kind, raw = bad.shares[1]
    assert kind == 0  # a survivor's self-mask seed share
    share = Share.from_bytes(raw)
    forged = Share(share.x, (share.y + 1) % PRIME).to_bytes()
    shares = (bad.shares[0], (owner, kind, forged), *bad.shares[2:])
    h.coord.receive("org-0", UnmaskResponse(bad.round_number, bad.session_id, "org-0", shares).to_bytes())
    for p in ("org-1", "org-2", "org-3", "org-4"):
        h.coord.receive(p, replies[p])
    with pytest.raises(ProtocolAbort, match=f"self-mask seed of '{owner}' do not match its commitment"):
        h.coord.close_stage()


def _masked_final(h):
    """Run a mask-mode round honestly up to the coordinator's final payloads."""
    h.advertise()
    while h.coord.stage is not Stage.UNMASK:
        h.step()
    out = h.coord.close_stage()
    agg = decode_message(out[h.ids[0]])
    assert isinstance(agg, MaskedAggregate)
    return out, agg


def _ring(agg: MaskedAggregate) -> np.ndarray:
    return np.frombuffer(agg.vector, dtype="<u8").astype(np.uint64)


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_participant_refuses_an_inflated_masked_sum(mode: str) -> None:
    # The coordinator alone unmasks, so it can return any ring vector as "the sum": here three
    # times the true sum, and the true sum plus a spike. Inputs are clipped, so both exceed
    # survivors x clip and are refused; the honest sum passes. (The check cannot refuse what
    # stays within survivors x clip: six random-direction inputs sum to ~sqrt(6) x clip, so a
    # factor up to ~sqrt(6) would pass -- the bound, not exactness, is what holds.)
    updates = make_updates(6, 64, seed=4)
    clip = max(float(np.linalg.norm(u)) for u in updates)
    h = make_harness(n=6, d=64, mode=mode, clip_bound=clip, seed=4)
    out, agg = _masked_final(h)
    assert float(np.linalg.norm(decode(_ring(agg) * np.uint64(3), scale_bits=24))) > 6 * clip
    doubled = _ring(agg) * np.uint64(3)
    spike = _ring(agg).copy()
    spike[0] += np.uint64(int(6 * clip * 2**24))
    for party, vec in (("org-1", doubled), ("org-2", spike)):
        forged = dataclasses.replace(agg, vector=vec.astype("<u8").tobytes())
        with pytest.raises(ProtocolAbort, match="L2 norm .* above the bound"):
            h.parties[party].handle(Stage.DONE, forged.to_bytes())
    assert h.parties["org-0"].handle(Stage.DONE, out["org-0"]) is None
    np.testing.assert_allclose(h.parties["org-0"].result().aggregate, np.sum(updates, axis=0, dtype=np.float64), atol=1e-5)


def test_masked_sum_of_aligned_inputs_at_the_clip_bound_passes() -> None:
    # The bound is tight but sound: n identical inputs of norm exactly the clip bound sum to
    # n x clip (plus fixed-point rounding), which must pass.
    u = make_updates(1, 4096, seed=8)[0]
    clip = float(np.linalg.norm(u.astype(np.float64)))
    h = make_harness(n=5, d=4096, clip_bound=clip)
    for p in h.ids:
        h.parties[p].set_update(u)
    out, _ = _masked_final(h)
    for p in h.ids:
        assert h.parties[p].handle(Stage.DONE, out[p]) is None
    # ... and one more input's worth is refused
    h2 = make_harness(n=5, d=4096, clip_bound=clip)
    for p in h2.ids:
        h2.parties[p].set_update(u)
    _, agg = _masked_final(h2)
    one_more = _ring(agg) + encode(u, scale_bits=24)
    with pytest.raises(ProtocolAbort, match="L2 norm"):
        h2.parties["org-3"].handle(Stage.DONE, dataclasses.replace(agg, vector=one_more.astype("<u8").tobytes()).to_bytes())


def test_participant_refuses_an_inflated_sum_with_distributed_dp_noise() -> None:
    # With distributed DP the sum carries Skellam noise; the hook's bound covers the clipped
    # inputs plus the noise (honest sums fail it with probability <= 2^-64), and doubling the
    # noisy sum is still refused.
    from secfed.privacy.distributed import DistributedDP

    n, d = 4, 20_000
    h = make_harness(n=n, d=d, seed=2)
    hooks = {p: DistributedDP(clip_norm=1.0, noise_multiplier=1.0, min_participants=1, norm_units=256) for p in h.ids}
    for p in h.ids:
        h.parties[p] = ParticipantRound(
            h.spec, me=p, identity=h.identities[h.ids.index(p)], roster=h.roster, noise_hook=hooks[p],
        )
        h.parties[p].set_update(make_updates(1, d, seed=h.ids.index(p), scale=0.05)[0])
    out, agg = _masked_final(h)
    bound = hooks["org-0"].sum_l2_bound(spec=h.spec, members=n)
    honest = decode(_ring(agg), scale_bits=24)
    assert float(np.linalg.norm(honest)) <= bound < 1.3 * float(np.linalg.norm(honest))  # tight at this d
    for p in ("org-0", "org-1"):
        assert h.parties[p].handle(Stage.DONE, out[p]) is None
    forged = dataclasses.replace(agg, vector=(_ring(agg) * np.uint64(2)).astype("<u8").tobytes())
    with pytest.raises(ProtocolAbort, match="noise shares"):
        h.parties["org-2"].handle(Stage.DONE, forged.to_bytes())


def test_participant_refuses_another_sessions_message() -> None:
    # Same round number, same enterprises, another session (another set of advertisements):
    # a message of that session is refused before anything is signed or released.
    h = make_harness(n=4, d=8)
    h.advertise()
    h.step()
    h.step()
    out = h.coord.close_stage()
    req = decode_message(out["org-0"])
    assert isinstance(req, ConsistencyRequest)
    other = ConsistencyRequest(req.round_number, bytes(32), req.survivors)
    with pytest.raises(ProtocolAbort, match="session_id does not match"):
        h.parties["org-0"].handle(Stage.CONSISTENCY, other.to_bytes())
    assert h.parties["org-0"].stage is Stage.ABORTED and h.parties["org-0"]._held == {}
