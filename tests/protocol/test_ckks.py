"""CKKS rounds: signatures checked before any parsing, signed member sets, the norm check."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tenseal import ckks_vector_from

from secfed.crypto import ckks
from secfed.crypto.keys import IdentityKey
from secfed.errors import CkksError, InvalidSignature, ProtocolAbort, SecfedError
from secfed.protocol import CoordinatorRound, ParticipantRound, RoundSpec, Stage
from secfed.protocol.messages import (
    CkksAggregate,
    CkksUpload,
    ciphertext_digest,
    ckks_upload_signed_bytes,
    decode_message,
)

from .harness import Harness, make_updates, plain_sum

CTX = ckks.new_context()
PUBLIC = CTX.serialize(secret=False)


def ckks_harness(n: int = 3, d: int = 5000, clip: float = 1e3) -> tuple[Harness, list[np.ndarray]]:
    ids = [f"org-{i}" for i in range(n)]
    identities = [IdentityKey.generate() for _ in ids]
    roster = {p: k.public_bytes() for p, k in zip(ids, identities)}
    spec = RoundSpec.create(
        federation="f", round_number=1, mode="ckks", participants=ids, vector_length=d, clip_bound=clip
    )
    parties = {
        p: ParticipantRound(spec, me=p, identity=k, roster=roster, ckks_context=CTX)
        for p, k in zip(ids, identities)
    }
    updates = make_updates(n, d, seed=9, scale=0.1)
    for p, u in zip(ids, updates):
        parties[p].set_update(u, ledger_head=b"head:" + p.encode())
    coord = CoordinatorRound(spec, roster=roster, ckks_public_context=PUBLIC)
    return Harness(spec, ids, identities, parties, coord), updates


def test_ckks_round_sums_and_keeps_ledger_heads() -> None:
    h, updates = ckks_harness()
    h.run()
    res = h.coord.result()
    assert res.aggregate is None and res.ciphertexts is not None  # the coordinator cannot decrypt
    assert res.ledger_heads == {p: b"head:" + p.encode() for p in h.ids}
    for p in h.ids:
        out = h.parties[p].result()
        np.testing.assert_allclose(out.aggregate, plain_sum(updates, range(3)), atol=1e-6)
        assert out.survivors == tuple(h.ids)
    # Each kept head is the one its owner signed with its upload: moved onto another upload, a
    # head does not verify; and the driver's head rules see every head before the sum does.
    seen: list[tuple[str, bytes]] = []
    again = CoordinatorRound.replay(
        h.spec, roster=h.roster, ckks_public_context=PUBLIC,
        records=[r for r in h.coord.records if r[0] == "advertise"],
        head_check=lambda sender, head: seen.append((sender, head)),
    )
    again.close_stage()
    assert again.stage is Stage.UPLOAD
    up = CkksUpload.from_bytes(_upload_of(h, "org-0"))
    with pytest.raises(InvalidSignature):
        again.receive("org-0", dataclasses.replace(up, ledger_head=b"head:org-1").to_bytes())
    for p in h.ids:
        again.receive(p, _upload_of(h, p))
    assert seen == [(p, b"head:" + p.encode()) for p in h.ids]


def test_public_context_with_secret_is_refused() -> None:
    h, _ = ckks_harness()
    with pytest.raises(Exception, match="ckks_public_context"):
        CoordinatorRound(h.spec, roster=h.roster, ckks_public_context=CTX.serialize(secret=True))


def _upload_of(h: Harness, p: str) -> bytes:
    return next(b for stage, q, b in h.sent if stage == "upload" and q == p)


def test_signature_checked_before_ciphertexts_are_parsed() -> None:
    h, _ = ckks_harness()
    h.advertise()
    h.step(skip=("org-0",))
    up = decode_message(_upload_of(h, "org-1"))
    assert isinstance(up, CkksUpload)
    garbage = dataclasses.replace(up, sender="org-0", ciphertexts=(b"\xff" * 10,) * len(up.ciphertexts))
    # garbage that would crash a parser: refused as a bad signature, never parsed
    with pytest.raises(InvalidSignature):
        h.coord.receive("org-0", garbage.to_bytes())
    assert "org-0" not in h.coord.received()


def _final(h: Harness) -> tuple[dict[str, bytes], CkksAggregate]:
    """Run advertise + upload honestly; the coordinator's final payloads and the aggregate."""
    h.advertise()
    h.step()
    out = h.coord.close_stage()
    agg = decode_message(out["org-0"])
    assert isinstance(agg, CkksAggregate)
    return out, agg


def _with_member(agg: CkksAggregate, i: int, cts: tuple[bytes, ...]) -> CkksAggregate:
    sender, head, _, sig = agg.members[i]
    members = list(agg.members)
    members[i] = (sender, head, cts, sig)
    return dataclasses.replace(agg, members=tuple(members))


def _homomorphic(parts: list[tuple[bytes, ...]], signs: list[int], d: int) -> tuple[bytes, ...]:
    """What a coordinator can compute from uploads without any key: a signed sum of them."""
    pub = ckks.load_context(PUBLIC, expect_secret=False).tenseal
    out = []
    for pos in range(len(parts[0])):
        total = None
        for cts, sign in zip(parts, signs):
            vec = ckks_vector_from(pub, cts[pos])
            vec = vec if sign > 0 else vec.neg()
            total = vec if total is None else total + vec
        out.append(bytes(total.serialize()))
    return tuple(out)


def test_forged_member_in_the_set_is_refused() -> None:
    # Another member's ciphertexts under org-1's (valid) signature: the digest is recomputed
    # from the bytes shown, so org-1's signature no longer verifies.
    h, _ = ckks_harness()
    _, agg = _final(h)
    forged = _with_member(agg, 1, agg.members[2][2])
    with pytest.raises(ProtocolAbort, match="InvalidSignature"):
        h.parties["org-0"].handle(Stage.DONE, forged.to_bytes())


def test_coordinator_cannot_send_twice_a_victims_upload() -> None:
    # The attack: make the others decrypt 2 x the victim's update and nothing else, while the
    # member list still names signed uploads. Every way to carry it is refused.
    h, updates = ckks_harness(n=4)
    _, agg = _final(h)
    victim = agg.members[0][2]
    doubled = _homomorphic([victim, victim], [1, 1], h.spec.vector_length)
    m = agg.members
    attacks = {
        # the victim's upload again in org-1's slot (org-1's signature kept): sum = 2 x victim
        "org-1": dataclasses.replace(agg, members=(m[0], (*m[1][:2], victim, m[1][3]))),
        # 2 x the victim's ciphertexts under the victim's own signature
        "org-2": dataclasses.replace(agg, members=((*m[0][:2], doubled, m[0][3]), m[2])),
        # the victim's entry listed twice
        "org-3": dataclasses.replace(agg, members=(m[0], m[0], m[3])),
    }
    for party, forged in attacks.items():
        with pytest.raises(ProtocolAbort, match="InvalidSignature|repeated"):
            h.parties[party].handle(Stage.DONE, forged.to_bytes())
        assert h.parties[party].stage is Stage.ABORTED
    # the honest aggregate gives the sum of the four uploads
    h.parties["org-0"].handle(Stage.DONE, agg.to_bytes())
    np.testing.assert_allclose(h.parties["org-0"].result().aggregate, plain_sum(updates, range(4)), atol=1e-6)


def test_coordinator_cannot_send_a_subset_sum_as_the_members_sum() -> None:
    # The attack: members {0,1,2} listed, but org-2's slot carries minus org-1's ciphertexts
    # (the coordinator can negate without a key), so the sum is org-0's alone: refused.
    h, _ = ckks_harness()
    _, agg = _final(h)
    minus = _homomorphic([agg.members[1][2]], [-1], h.spec.vector_length)
    forged = _with_member(agg, 2, minus)
    with pytest.raises(ProtocolAbort, match="InvalidSignature"):
        h.parties["org-0"].handle(Stage.DONE, forged.to_bytes())
    # Naming only the subset is a smaller, honest member set (like a dropout): its sum is
    # exactly the subset's, counted as two members -- never passed off as three.
    subset = dataclasses.replace(agg, members=agg.members[:2])
    h.parties["org-1"].handle(Stage.DONE, subset.to_bytes())
    assert h.parties["org-1"].result().survivors == ("org-0", "org-1")


def test_norm_check_refuses_an_inflated_sum() -> None:
    # A malicious enterprise signs an update far above the clip bound: the members' sum then
    # exceeds members x clip, and every honest participant refuses it (the coordinator cannot
    # inflate the sum any more: it only relays signed uploads).
    same = make_updates(1, 4096, seed=3, scale=0.1)[0]
    h2, _ = ckks_harness(d=4096, clip=float(np.linalg.norm(same)) * 1.0001)
    for p in h2.ids:  # every enterprise uploads the same clipped vector: norm of the sum = 3 x |u|
        h2.parties[p].set_update(same)
    h2.parties["org-0"].set_update(same * 2.5)  # org-0 does not clip
    out, _ = _final(h2)
    with pytest.raises(ProtocolAbort, match="L2 norm"):
        h2.parties["org-1"].handle(Stage.DONE, out["org-1"])
    # at exactly the bound (three aligned inputs at the clip) an honest sum passes
    h3, _ = ckks_harness(d=4096, clip=float(np.linalg.norm(same)))
    for p in h3.ids:
        h3.parties[p].set_update(same)
    out3, _ = _final(h3)
    assert h3.parties["org-2"].handle(Stage.DONE, out3["org-2"]) is None


def test_signed_garbage_is_rejected_and_the_round_goes_on() -> None:
    h, updates = ckks_harness()
    h.advertise()
    out = h.coord.close_stage()
    # org-0 (a malicious enterprise) signs ciphertext bytes that are not a ciphertext
    good = decode_message(h.parties["org-0"].handle(Stage.UPLOAD, out["org-0"]))
    assert isinstance(good, CkksUpload)
    garbage_cts = tuple(b"\x00" * len(ct) for ct in good.ciphertexts)
    unsigned = dataclasses.replace(good, ciphertexts=garbage_cts)
    identity = h.identities[0]
    signed = dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))
    with pytest.raises(CkksError):
        h.coord.receive("org-0", signed.to_bytes())
    assert "org-0" not in h.coord.received()
    for p in ("org-1", "org-2"):
        h.coord.receive(p, h.parties[p].handle(Stage.UPLOAD, out[p]))
    final = h.coord.close_stage()
    assert h.coord.result().survivors == ("org-1", "org-2")
    res = h.parties["org-1"].handle(Stage.DONE, final["org-1"])
    assert res is None
    np.testing.assert_allclose(h.parties["org-1"].result().aggregate, plain_sum(updates, [1, 2]), atol=1e-6)


def _record_parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every ciphertext blob handed to TenSEAL's parser from now on."""
    parsed: list[bytes] = []
    real = ckks.ts.ckks_vector_from

    def spy(ctx, blob):  # type: ignore[no-untyped-def]
        parsed.append(bytes(blob))
        return real(ctx, blob)

    monkeypatch.setattr(ckks.ts, "ckks_vector_from", spy)
    return parsed


def test_participant_parses_only_ciphertexts_under_a_verified_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    h, _ = ckks_harness()
    out, agg = _final(h)
    signed = {ct for _, _, cts, _ in agg.members for ct in cts}
    parsed = _record_parses(monkeypatch)
    # A coordinator's own bytes (here: hostile garbage) in org-2's slot are never parsed.
    garbage = tuple(b"\x5e\xa1" + bytes(len(ct) - 2) for ct in agg.members[2][2])
    with pytest.raises(ProtocolAbort, match="InvalidSignature"):
        h.parties["org-0"].handle(Stage.DONE, _with_member(agg, 2, garbage).to_bytes())
    assert parsed == []
    # The honest aggregate: every blob parsed is one a member signed, each exactly once.
    h.parties["org-1"].handle(Stage.DONE, out["org-1"])
    assert sorted(parsed) == sorted(ct for _, _, cts, _ in agg.members for ct in cts)
    assert set(parsed) <= signed


def test_ckks_result_is_exactly_on_the_announced_grid() -> None:
    # Uploads are quantised to 2^-scale_bits before encryption and the decrypted sum is rounded
    # to that grid: the result is exactly the sum of the quantised updates, so none of the CKKS
    # decryption noise (which can reveal the key, Li & Micciancio 2021) reaches the adapter.
    h, updates = ckks_harness(n=3, d=9000)
    h.run()
    s = h.spec.scale_bits
    want = np.sum([np.rint(u.astype(np.float64) * 2.0**s) * 2.0**-s for u in updates], axis=0)
    for p in h.ids:
        got = h.parties[p].result().aggregate
        assert np.array_equal(got * 2.0**s, np.rint(got * 2.0**s))  # on the grid
        assert np.array_equal(got, want)  # bit for bit: no decryption noise left


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    kind = int(rng.integers(6))
    if kind == 0:  # a few bit flips anywhere
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # truncation
        del b[int(rng.integers(len(b))):]
    elif kind == 2:  # trailing bytes
        b += rng.bytes(int(rng.integers(1, 65)))
    elif kind == 3:  # a random 16-byte window
        p = int(rng.integers(len(b)))
        b[p : p + 16] = rng.bytes(16)
    elif kind == 4:  # one byte in the header region (lengths, protobuf tags, SEAL header)
        b[int(rng.integers(min(len(b), 256)))] = int(rng.integers(256))
    else:  # a window deleted from the middle
        p = int(rng.integers(len(b)))
        del b[p : p + int(rng.integers(1, 64))]
    return bytes(b)


def test_fuzz_ckks_aggregate_and_ciphertext_parser_only_typed_errors() -> None:
    # 1500 mutated aggregate messages (as a coordinator could send), and 1000 aggregates whose
    # member re-signed mutated ciphertexts (as a malicious enterprise could), each through a
    # participant waiting for the result: only ProtocolAbort (wrapping a SecfedError), never
    # another exception or a crash. Seeded: the same inputs every run.
    import copy

    h, _ = ckks_harness(n=3, d=300)
    _, agg = _final(h)
    payload = agg.to_bytes()
    waiting = h.parties["org-1"]
    rng = np.random.default_rng(20)
    outcomes = {"abort": 0, "accepted": 0}

    def feed(data: bytes) -> None:
        party = copy.copy(waiting)
        try:
            party.handle(Stage.DONE, data)
            outcomes["accepted"] += 1
        except ProtocolAbort as exc:
            assert isinstance(exc.__cause__, SecfedError | type(None)), repr(exc.__cause__)
            outcomes["abort"] += 1

    for _ in range(1500):
        feed(_mutate(payload, rng))
    identity = h.identities[2]
    sender, head, cts, _ = agg.members[2]
    for _ in range(1000):
        i = int(rng.integers(len(cts)))
        bad = tuple(_mutate(ct, rng) if j == i else ct for j, ct in enumerate(cts))
        sig = identity.sign(
            ckks_upload_signed_bytes(
                session_id=agg.session_id, round_number=agg.round_number, sender=sender,
                ledger_head=head, ct_digest=ciphertext_digest(bad),
            )
        )
        members = (*agg.members[:2], (sender, head, bad, sig))
        feed(dataclasses.replace(agg, members=members).to_bytes())
    # most are refused; a bit flip in a re-signed ciphertext's coefficients is still a valid
    # ciphertext (decrypts to garbage, then fails or passes the norm check): never untyped
    assert outcomes["abort"] + outcomes["accepted"] == 2500 and outcomes["abort"] > 2000


def test_catch_up_rebuilds_the_sum_from_signed_uploads_only() -> None:
    # A site that missed a CKKS round decodes the stored aggregate the same way: signatures
    # first, its own addition, rounding, norm; a forged aggregate is refused with ProtocolAbort.
    from types import SimpleNamespace

    from secfed.participant.loop import Participant

    h, updates = ckks_harness(n=3, d=5000, clip=1e3)
    _, agg = _final(h)
    model = SimpleNamespace(vector_length=5000, scale_bits=24, clip_bound=1e3)
    site = SimpleNamespace(fed=SimpleNamespace(model=model, dp=SimpleNamespace(distributed=None)),
                           roster=h.roster, _ckks_context=lambda: CTX)
    total, count = Participant._decode_aggregate(site, agg.to_bytes(), mode="ckks", round_number=1)
    want = np.sum([np.rint(u.astype(np.float64) * 2.0**24) * 2.0**-24 for u in updates], axis=0)
    assert count == 3 and np.array_equal(total, want)
    doubled = dataclasses.replace(agg, members=(agg.members[0], (*agg.members[1][:2], agg.members[0][2], agg.members[1][3])))
    with pytest.raises(ProtocolAbort, match="InvalidSignature"):
        Participant._decode_aggregate(site, doubled.to_bytes(), mode="ckks", round_number=1)
    with pytest.raises(ProtocolAbort):
        Participant._decode_aggregate(site, agg.to_bytes()[:-7], mode="ckks", round_number=1)
