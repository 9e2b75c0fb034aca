"""What the coordinator sees: uniform-looking masked vectors, never both shares of one party,
never a raw secret."""

from __future__ import annotations

import numpy as np
import pytest

from secfed.protocol import Stage, simulate
from secfed.protocol.messages import UnmaskResponse, decode_message

from .harness import make_harness, make_updates


def test_masked_upload_of_zero_looks_uniform() -> None:
    h = make_harness(n=4, d=20_000)
    h.parties["org-0"].set_update(np.zeros(20_000, dtype=np.float32))
    h.run()
    upload = decode_message(next(b for st, p, b in h.sent if st == "upload" and p == "org-0"))
    words = np.frombuffer(upload.vector, dtype="<u8")
    bits = np.unpackbits(words.view(np.uint8))
    # 1.28 M bits: a fair coin stays within 0.5 +- 0.002 (over 4 sigma)
    assert abs(bits.mean() - 0.5) < 0.002
    assert np.count_nonzero(words == 0) < 3


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
@pytest.mark.parametrize(
    "drops",  # two dropouts: within what a secagg+ neighbourhood of 9 with t = 7 tolerates
    [{"upload": [0, 3]}, {"share": [1], "unmask": [5]}, {"upload": [2], "consistency": [4]}],
)
def test_no_party_ever_has_both_shares_released(mode: str, drops) -> None:
    sent: list = []
    result = simulate(make_updates(10, 16), mode=mode, dropouts=drops, transcript=sent)
    released: dict[str, set[int]] = {}
    for _stage, _, kind, payload in sent:
        if kind == "UnmaskResponse":
            msg = decode_message(payload)
            assert isinstance(msg, UnmaskResponse)
            for owner, share_kind, _ in msg.shares:
                released.setdefault(owner, set()).add(share_kind)
    assert released, "the round must have unmasked something"
    assert all(len(kinds) == 1 for kinds in released.values()), released
    survivors = {f"enterprise-{i:04d}" for i in result.survivors}
    for owner, kinds in released.items():
        assert kinds == ({0} if owner in survivors else {1})


def test_raw_secrets_never_appear_on_the_wire() -> None:
    h = make_harness(n=4, d=32)
    h.advertise()
    h.step()  # shares created here
    secrets_ = []
    for party in h.parties.values():
        secrets_.append(party._self_seed)
        secrets_.append(party._mask_keys.private_bytes())
        secrets_.append(party._cipher_keys.private_bytes())
    while h.coord.stage is not Stage.DONE:
        h.step()
    wire = b"".join(payload for _, _, payload in h.sent)
    assert all(s is not None and len(s) == 32 for s in secrets_)
    assert not any(s in wire for s in secrets_)
