"""Ledger heads travel signed with the upload in every mode, and the driver's head rules run
before an upload touches the sum (issue 20, item 5)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from secfed.errors import InvalidSignature, ProtocolError
from secfed.protocol import CoordinatorRound, Stage
from secfed.protocol.messages import MaskedUpload, decode_message

from .harness import Harness, make_harness, make_updates, plain_sum


def _to_upload_stage(h: Harness) -> dict[str, bytes]:
    """Advertise, share, close the share stage; returns each party's masked upload (unsent)."""
    h.advertise()
    h.step()  # adverts -> shares
    out = h.coord.close_stage()
    assert h.coord.stage is Stage.UPLOAD
    return {p: h.parties[p].handle(Stage.UPLOAD, payload) for p, payload in out.items()}


def test_masked_upload_signature_binds_the_ledger_head_to_this_upload() -> None:
    h = make_harness(n=4, d=32)
    uploads = _to_upload_stage(h)
    mine = decode_message(uploads["org-0"])
    other = decode_message(uploads["org-1"])
    assert isinstance(mine, MaskedUpload) and isinstance(other, MaskedUpload)
    forged = [
        # org-1's head moved onto org-0's upload (a head "not bound to this upload")
        dataclasses.replace(mine, ledger_head=other.ledger_head),
        # the same head on another vector
        dataclasses.replace(mine, vector=bytes([mine.vector[0] ^ 1]) + mine.vector[1:]),
        # the head stripped
        dataclasses.replace(mine, ledger_head=b""),
        # a signature of another upload
        dataclasses.replace(mine, signature=other.signature),
    ]
    for bad in forged:
        with pytest.raises(InvalidSignature):
            h.coord.receive("org-0", bad.to_bytes())
        assert "org-0" not in h.coord.received()  # refused before it touched the sum
    for p, payload in uploads.items():
        h.coord.receive(p, payload)
    while h.coord.stage is not Stage.DONE:
        h.step()
    res = h.coord.result()
    assert res.ledger_heads == {p: f"head-{p}".encode() for p in h.ids}
    assert np.max(np.abs(res.aggregate - plain_sum(make_updates(4, 32), range(4)))) < 1e-6


def test_head_check_runs_before_the_sum_and_a_refusal_leaves_the_round_unchanged() -> None:
    h = make_harness(n=4, d=32)
    seen: list[tuple[str, bytes]] = []

    def head_check(sender: str, head: bytes) -> None:
        seen.append((sender, head))
        if sender == "org-3":
            raise ProtocolError("ledger head must move forward")

    h.coord = CoordinatorRound(h.spec, roster=h.roster, head_check=head_check)
    uploads = _to_upload_stage(h)
    for p, payload in uploads.items():
        if p == "org-3":
            with pytest.raises(ProtocolError, match="move forward"):
                h.coord.receive(p, payload)
        else:
            h.coord.receive(p, payload)
    assert seen == [(p, f"head-{p}".encode()) for p in h.ids]
    assert h.coord.received() == frozenset({"org-0", "org-1", "org-2"})
    while h.coord.stage is not Stage.DONE:
        h.step()
    res = h.coord.result()
    assert res.survivors == ("org-0", "org-1", "org-2")
    assert np.max(np.abs(res.aggregate - plain_sum(make_updates(4, 32), range(3)))) < 1e-6
