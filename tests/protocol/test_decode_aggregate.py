"""decode_aggregate is the one decoder of a round's final message (ParticipantRound and a site
catching up use it); ParticipantRound.done says when the round finished for a party."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from secfed.errors import MessageFormatError, ProtocolAbort
from secfed.protocol import Stage, decode_aggregate
from secfed.protocol.messages import MaskedAggregate, decode_message
from secfed.protocol.participant import SumShape

from .harness import make_harness, make_updates, plain_sum


def _final_payloads(mode: str = "secagg"):
    h = make_harness(n=4, d=32, mode=mode)
    h.advertise()
    out = {}
    while h.coord.stage is not Stage.DONE:
        assert not any(p.done for p in h.parties.values())
        out = h.step()
    return h, out


def test_done_turns_true_exactly_when_the_result_exists() -> None:
    h, _ = _final_payloads()
    for party in h.parties.values():
        assert party.done and party.stage is Stage.DONE
        assert party.result().survivors == tuple(h.ids)


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_decode_aggregate_is_what_the_party_decoded(mode: str) -> None:
    h, out = _final_payloads(mode)
    want = plain_sum(make_updates(4, 32, 0), range(4))
    for p, payload in out.items():
        got = decode_aggregate(h.spec, payload)
        mine = h.parties[p].result()
        assert np.array_equal(got.aggregate, mine.aggregate) and got.survivors == mine.survivors
        assert np.allclose(got.aggregate, want, atol=1e-4)
        # without a spec (catch-up): the ring comes from the message; the same sum
        shape = SumShape(h.spec.round_number, mode, 32, h.spec.scale_bits)
        assert np.array_equal(decode_aggregate(shape, payload).aggregate, mine.aggregate)


def test_decode_aggregate_refuses_other_rounds_modes_and_lengths() -> None:
    h, out = _final_payloads()
    payload = out[h.ids[0]]
    agg = decode_message(payload)
    assert isinstance(agg, MaskedAggregate)
    spec = h.spec
    with pytest.raises(ProtocolAbort, match="must be for round"):
        decode_aggregate(dataclasses.replace(spec, round_number=spec.round_number + 1), payload)
    with pytest.raises(ProtocolAbort, match="must match its mode"):
        decode_aggregate(SumShape(spec.round_number, "ckks", 32, spec.scale_bits), payload)
    short = dataclasses.replace(agg, vector=agg.vector[:-8])
    with pytest.raises(ProtocolAbort, match="words"):
        decode_aggregate(spec, short.to_bytes())
    with pytest.raises(ProtocolAbort, match="words"):
        decode_aggregate(SumShape(spec.round_number, "secagg", 32, spec.scale_bits, ring_bits=32),
                         payload)
    with pytest.raises(MessageFormatError):
        decode_aggregate(spec, payload[:-3])
