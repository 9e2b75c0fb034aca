"""CKKS rounds: signatures checked before any parsing, signed member sets, the norm check."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from secfed.crypto import ckks
from secfed.crypto.keys import IdentityKey
from secfed.errors import CkksError, InvalidSignature, ProtocolAbort
from secfed.protocol import CoordinatorRound, ParticipantRound, RoundSpec, Stage
from secfed.protocol.messages import CkksAggregate, CkksUpload, decode_message

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


def test_forged_member_in_the_set_is_refused() -> None:
    h, _ = ckks_harness()
    h.advertise()
    h.step()
    out = h.coord.close_stage()
    agg = decode_message(out["org-0"])
    assert isinstance(agg, CkksAggregate)
    sender, head, digest, sig = agg.members[1]
    forged = dataclasses.replace(agg, members=(agg.members[0], (sender, head, bytes(32), sig), agg.members[2]))
    with pytest.raises(ProtocolAbort, match="InvalidSignature"):
        h.parties["org-0"].handle(Stage.DONE, forged.to_bytes())


def test_norm_check_refuses_an_inflated_sum() -> None:
    # A coordinator that adds one member's ciphertexts twice: the signed set says 3 members,
    # so the sum of 4 clipped updates can exceed 3 x clip. Here clip equals the largest norm.
    same = make_updates(1, 4096, seed=3, scale=0.1)[0]
    h2, _ = ckks_harness(d=4096, clip=float(np.linalg.norm(same)) * 1.0001)
    for p in h2.ids:  # every enterprise uploads the same clipped vector: norm of the sum = 3 x |u|
        h2.parties[p].set_update(same)
    h2.advertise()
    h2.step()
    out = h2.coord.close_stage()
    agg = decode_message(out["org-0"])
    assert isinstance(agg, CkksAggregate)
    up = decode_message(_upload_of(h2, "org-0"))
    inflated = ckks.add_encrypted(ckks.load_context(PUBLIC, expect_secret=False), [list(agg.ciphertexts), list(up.ciphertexts)])
    bad = dataclasses.replace(agg, ciphertexts=tuple(inflated))
    with pytest.raises(ProtocolAbort, match="L2 norm"):
        h2.parties["org-1"].handle(Stage.DONE, bad.to_bytes())
    assert h2.parties["org-2"].handle(Stage.DONE, out["org-2"]) is None  # the honest sum passes


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
